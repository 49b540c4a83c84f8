"""optax AdamW with warmup + cosine decay, global-norm clipping, gradient accumulation, and
per-module settings: each of three parameter groups trains (at its own multiple of the
learning rate) or stays frozen, and the Adam moments can be stored in bfloat16.

Groups, by parameter path: `vision` is the vision tower without its patch merger
(params["visual"] minus the merger_* leaves), `merger` the 2x2 patch merger (merger_norm,
merger_fc1, merger_fc2), `llm` everything else (embedding, decoder, LM head).
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import optax

from atlas_jax.config import OPTIM_GROUPS

MERGER = ("merger_norm", "merger_fc1", "merger_fc2")


def learning_rate_schedule(optim) -> optax.Schedule:
  """Linear warmup from 0 to `optim.lr` over `warmup_steps`, cosine decay to
  `lr * final_lr_fraction` at `total_steps` (counted in optimizer updates)."""
  warmup = min(optim.warmup_steps, max(optim.total_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=optim.lr, warmup_steps=warmup,
      decay_steps=max(optim.total_steps, warmup + 1),
      end_value=optim.lr * optim.final_lr_fraction)


def param_groups(params):
  """The group name (one of OPTIM_GROUPS) of every leaf of a model's params, as a like tree."""
  def label(path, _):
    keys = [getattr(k, "key", None) for k in path]
    if keys[0] != "visual":
      return "llm"
    return "merger" if keys[1] in MERGER else "vision"
  return jax.tree_util.tree_map_with_path(label, params)


def group_settings(optim) -> dict[str, dict]:
  """{group: {"trainable": bool, "lr_scale": float}} of an optim config group. Groups the
  config leaves out train at the full rate."""
  settings = {}
  for name in OPTIM_GROUPS:
    group = optim.get(name) or {}
    settings[name] = {"trainable": bool(group.get("trainable", True)),
                      "lr_scale": float(group.get("lr_scale", 1.0))}
  return settings


def describe(optim) -> dict:
  """What the optimizer state's layout depends on, as JSON (saved with checkpoints)."""
  return {"groups": group_settings(optim),
          "moments_dtype": optim.get("moments_dtype", "float32")}


def _decay_mask(params):
  """Weight decay on weight matrices and embeddings only (not norm scales, not biases)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: getattr(path[-1], "key", None) in ("kernel", "embedding"), params)


def _stored_in(dtype, inner: optax.GradientTransformation) -> optax.GradientTransformation:
  """`inner` with its floating-point state kept in `dtype` between updates and computed in
  float32 (the Adam moments in bfloat16: half the memory)."""
  def cast(tree, to):
    return jax.tree.map(
        lambda x: x.astype(to) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)

  def init(params):
    return cast(inner.init(params), dtype)

  def update(updates, state, params=None):
    updates, state = inner.update(updates, cast(state, jnp.float32), params)
    return updates, cast(state, dtype)
  return optax.GradientTransformation(init, update)


def _adamw(optim, scale: float) -> optax.GradientTransformation:
  """optax.adamw's chain at `scale` times the schedule, moments in optim.moments_dtype."""
  adam = optax.scale_by_adam(b1=optim.b1, b2=optim.b2, eps=optim.eps)
  moments = optim.get("moments_dtype", "float32")
  if moments != "float32":
    adam = _stored_in(jnp.dtype(moments), adam)
  schedule = learning_rate_schedule(optim)
  return optax.chain(
      adam, optax.add_decayed_weights(optim.weight_decay, mask=_decay_mask),
      optax.scale_by_learning_rate(schedule if scale == 1.0 else lambda s: schedule(s) * scale))


def make_optimizer(optim) -> optax.GradientTransformation:
  """The optimizer described by an `optim` config group.

  Fields: lr, warmup_steps, total_steps, final_lr_fraction, weight_decay, b1, b2, eps,
  clip_norm, grad_accum (micro-batches per update; 1 = none), vision / merger / llm
  (each {trainable, lr_scale}; see `group_settings`), moments_dtype (float32 | bfloat16).
  Frozen groups get zero updates, hold no moments and are left out of the clipping norm.
  """
  settings = group_settings(optim)
  frozen = {name for name, s in settings.items() if not s["trainable"]}
  per_group = {name: optax.set_to_zero() if name in frozen else _adamw(optim, s["lr_scale"])
               for name, s in settings.items()}
  tx = optax.chain(
      optax.masked(optax.set_to_zero(),
                   lambda p: jax.tree.map(lambda g: g in frozen, param_groups(p))),
      clip_by_global_norm(optim.clip_norm),
      optax.multi_transform(per_group, param_groups))
  if optim.grad_accum > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=optim.grad_accum)
  return tx


def config_key(group) -> str:
  """A config group's fields as one string: equal groups, equal keys."""
  return json.dumps(group.to_dict(), sort_keys=True, default=repr)


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
  """optax.clip_by_global_norm's transform, applied as one scalar product: every update is
  multiplied by min(1, max_norm / global norm) (exactly 1 below the threshold).

  optax divides each element by the norm and selects; XLA:CPU materialises that quotient
  as its own pass over every gradient (the Adam moments and the update each read it); a
  product by a scalar fuses into the Adam update.
  """
  def update(updates, state, params=None):
    del params
    scale = jnp.minimum(1.0, max_norm / optax.global_norm(updates))
    return jax.tree.map(lambda g: g * scale.astype(g.dtype), updates), state
  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)
