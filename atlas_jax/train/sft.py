"""SFT: next-token cross-entropy on assistant tokens, and the jitted update step.

Letters: B batch, T length, C sequence chunk, D width, V vocab.

A batch is a dict of batch-major arrays (the data pipeline's output):
  input_ids int32[B, T], attention_mask int32[B, T], loss_mask int32[B, T] (1 on tokens to
  be predicted), position_ids int32[B, 3, T], and optionally pixel_values
  float32[B, P, 1176] with image_grid_thw int32[B, I, 3].
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from atlas_jax.model import vlm
from atlas_jax.model.config import ModelConfig
from atlas_jax.train.state import TrainState


def model_hidden(config: ModelConfig, params, batch):
  """Final hidden states float[B, T, D] of a batch."""
  model = vlm.Qwen25VL(config)
  hidden, _ = model.apply(
      {"params": params}, batch["input_ids"], jnp.transpose(batch["position_ids"], (1, 0, 2)),
      vlm.text_mask(batch["attention_mask"]), batch.get("pixel_values"),
      batch.get("image_grid_thw"), method=vlm.Qwen25VL.hidden_states)
  return hidden


def chunked_token_stats(config: ModelConfig, params, hidden, targets, chunk: int,
                        temperature: float = 1.0):
  """Per-token statistics of `targets` under the model, one sequence chunk at a time.

  Never materialises float[B, T, V] (unless chunk >= T): each chunk's logits are computed,
  reduced and dropped (and recomputed in the backward pass). A single chunk is not
  rematerialised: the backward pass needs its softmax either way.
  Returns float32[B, T] dicts: `logp` (log-prob of the target), `entropy`, and int32[B, T]
  `argmax`.
  """
  b, t, d = hidden.shape
  chunk = min(chunk, t)
  if t % chunk:
    raise ValueError(f"sequence length {t} is not a multiple of the log-prob chunk {chunk}")
  model = vlm.Qwen25VL(config)

  def stats(h, y):  # h [B, C, D], y [B, C]
    logits = model.apply({"params": params}, h, method=vlm.Qwen25VL.logits) / temperature
    logz = jax.nn.logsumexp(logits, axis=-1)
    logp_all = logits - logz[..., None]
    logp = jnp.take_along_axis(logp_all, y[..., None], axis=-1)[..., 0]
    entropy = -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1)
    return logp, entropy, jnp.argmax(logits, axis=-1).astype(jnp.int32)

  if chunk == t:  # one chunk: its logits are needed anyway; no recompute in the backward
    logp, entropy, argmax = stats(hidden, targets)
    return {"logp": logp, "entropy": entropy, "argmax": argmax}
  stats = jax.checkpoint(stats)
  hs = hidden.reshape(b, t // chunk, chunk, d).swapaxes(0, 1)
  ys = targets.reshape(b, t // chunk, chunk).swapaxes(0, 1)
  logp, entropy, argmax = jax.lax.map(lambda a: stats(*a), (hs, ys))
  unchunk = lambda x: x.swapaxes(0, 1).reshape(b, t)
  return {"logp": unchunk(logp), "entropy": unchunk(entropy), "argmax": unchunk(argmax)}


def shift_targets(batch):
  """targets[t] = input_ids[t + 1]; mask[t] = loss_mask[t + 1]; the last position has none."""
  ids, mask = batch["input_ids"], batch["loss_mask"]
  targets = jnp.concatenate([ids[:, 1:], jnp.zeros_like(ids[:, :1])], axis=1)
  target_mask = jnp.concatenate([mask[:, 1:], jnp.zeros_like(mask[:, :1])], axis=1)
  return targets, target_mask.astype(jnp.float32)


def sft_loss(config: ModelConfig, params, batch, functional_ids, chunk: int = 512):
  """Token-mean cross-entropy over assistant tokens, plus functional-token metrics.

  functional_ids: int32[F] ids of the functional tokens (may be empty).
  Returns (loss, metrics dict of float32 scalars).
  """
  hidden = model_hidden(config, params, batch)
  targets, mask = shift_targets(batch)
  stats = chunked_token_stats(config, params, hidden, targets, chunk)
  n_tokens = jnp.sum(mask)
  loss = -jnp.sum(stats["logp"] * mask) / jnp.maximum(n_tokens, 1.0)
  is_func = jnp.isin(targets, functional_ids) & (mask > 0)
  n_func = jnp.sum(is_func)
  correct = stats["argmax"] == targets
  metrics = {
      "loss": loss,
      "tokens": n_tokens,
      "token_accuracy": jnp.sum(correct * mask) / jnp.maximum(n_tokens, 1.0),
      "functional_tokens": n_func.astype(jnp.float32),
      "functional_ce": -jnp.sum(jnp.where(is_func, stats["logp"], 0.0)) / jnp.maximum(n_func, 1),
      "functional_accuracy": jnp.sum(correct & is_func) / jnp.maximum(n_func, 1),
  }
  return loss, metrics


SKIPS = ("select", "branch")


def apply_if_finite(state: TrainState, grads, optimizer, finite, skip: str = "select"):
  """The optimizer update, or (when `finite` is False) the old params/opt_state.

  skip (static): how the old state is kept. "select": `jnp.where(finite, new, old)` over
  params and moments, which TPU and GPU fuse into the update (a branch costs them a copy
  of the state: +20 GiB per chip for 72B SFT on v5p:2x2x4). "branch": `lax.cond`, for
  XLA:CPU, where the select is a pass of its own over the state (95 ms of the bench
  model's update) and the branch runs the update alone. `steps` picks by platform.
  """
  if skip not in SKIPS:
    raise ValueError(f"skip {skip!r} is not one of {SKIPS}")

  def apply(state):
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                         opt_state=opt_state)

  def keep(state):
    return state.replace(step=state.step + 1, skipped=state.skipped + 1)
  if skip == "branch":
    return jax.lax.cond(finite, apply, keep, state)
  new, old = apply(state), keep(state)
  return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)


def sft_step(state: TrainState, batch, *, config: ModelConfig, optimizer, functional_ids,
             lr_schedule=None, chunk: int = 512, skip: str = "select"):
  """One SFT update: (state, batch) -> (state, metrics). Pure; jit it with donated state.

  A non-finite loss or gradient norm skips the update (params and optimizer state stay as
  they were), counts it in `state.skipped` and reports `skipped_step = 1`; `skip` as in
  `apply_if_finite`.
  """
  grad_fn = jax.value_and_grad(
      functools.partial(sft_loss, config, batch=batch, functional_ids=functional_ids,
                        chunk=chunk), has_aux=True)
  (loss, metrics), grads = grad_fn(state.params)
  grad_norm = optax.global_norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  new_state = apply_if_finite(state, grads, optimizer, finite, skip)
  metrics = dict(metrics, grad_norm=grad_norm, skipped_step=(~finite).astype(jnp.float32))
  if lr_schedule is not None:
    metrics["learning_rate"] = lr_schedule(state.step)
  return new_state, metrics
