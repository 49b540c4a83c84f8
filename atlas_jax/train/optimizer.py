"""optax AdamW with warmup + cosine decay, global-norm clipping, gradient accumulation and an
optional frozen vision tower."""

from __future__ import annotations

import jax
import optax


def learning_rate_schedule(optim) -> optax.Schedule:
  """Linear warmup from 0 to `optim.lr` over `warmup_steps`, cosine decay to
  `lr * final_lr_fraction` at `total_steps` (counted in optimizer updates)."""
  warmup = min(optim.warmup_steps, max(optim.total_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=optim.lr, warmup_steps=warmup,
      decay_steps=max(optim.total_steps, warmup + 1),
      end_value=optim.lr * optim.final_lr_fraction)


def _decay_mask(params):
  """Weight decay on weight matrices and embeddings only (not norm scales, not biases)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: getattr(path[-1], "key", None) in ("kernel", "embedding"), params)


def make_optimizer(optim) -> optax.GradientTransformation:
  """The optimizer described by an `optim` config group.

  Fields: lr, warmup_steps, total_steps, final_lr_fraction, weight_decay, b1, b2, eps,
  clip_norm, grad_accum (micro-batches per update; 1 = none), freeze_vision (bool).
  """
  tx = optax.chain(
      optax.clip_by_global_norm(optim.clip_norm),
      optax.adamw(learning_rate_schedule(optim), b1=optim.b1, b2=optim.b2, eps=optim.eps,
                  weight_decay=optim.weight_decay, mask=_decay_mask))
  if optim.freeze_vision:
    tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()},
                               param_labels=lambda p: {k: ("frozen" if k == "visual" else "train")
                                                       for k in p})
  if optim.grad_accum > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=optim.grad_accum)
  return tx
