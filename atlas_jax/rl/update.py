"""The LA-GRPO update: rollouts in, one optimizer step out.

Letters: R rollouts, T prompt length, N completion length, L = T + N.

A rollout batch is batch-major: `input_ids`/`attention_mask` int32[R, L] (left-padded
prompt, then the completion), `completion_mask` int32[R, L] (1 on generated tokens),
`advantages` float32[R], optional `pixel_values` float32[R, P, C] / `image_grid_thw`
int32[R, I, 3], and per-token arrays in *prediction layout* float32[R, L] (entry j belongs
to the token at j + 1, the one predicted from position j): `old_logp` (trainer log-probs
before this batch's updates), `sampler_logp`, optional `ref_logp`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from atlas_jax.model import rope
from atlas_jax.model.config import ModelConfig
from atlas_jax.rl import grpo
from atlas_jax.train import sft
from atlas_jax.train.state import TrainState


def with_positions(config: ModelConfig, batch: dict) -> dict:
  """Adds M-RoPE position_ids int32[R, 3, L] (computed in-graph) if absent."""
  if "position_ids" in batch:
    return batch
  grid = batch.get("image_grid_thw")
  pos, _ = rope.get_rope_index(
      batch["input_ids"], batch["attention_mask"], None if grid is None else grid.reshape(-1, 3),
      image_token_id=config.image_token_id,
      spatial_merge_size=config.vision.spatial_merge_size, xp=jnp)
  return dict(batch, position_ids=jnp.transpose(pos, (1, 0, 2)))


def prediction_mask(batch: dict):
  """float32[R, L]: 1 where position j predicts a completion token (j + 1)."""
  m = batch["completion_mask"]
  return jnp.concatenate([m[:, 1:], jnp.zeros_like(m[:, :1])], axis=1).astype(jnp.float32)


def token_logps(config: ModelConfig, params, batch: dict, *, chunk: int,
                temperature: float = 1.0, completion_length: int | None = None):
  """Trainer log-probs and entropies float32[R, L] (prediction layout) of a rollout batch.

  completion_length (static): the rows end in a completion of this many tokens (the
  rollout layout: `rl.max_new_tokens`, `rollout.assemble`). The LM head and the softmax
  then run only on the N positions that predict them, j = L - N - 1 .. L - 2, and every
  other entry is 0; the prompt's positions predict nothing the loss reads (its
  completion_mask is 0). None: every position.
  """
  batch = with_positions(config, batch)
  hidden = sft.model_hidden(config, params, batch)
  targets = _targets(batch)
  length = hidden.shape[1]
  start = 0 if completion_length is None else length - completion_length - 1
  if start < 0:
    raise ValueError(f"completion_length {completion_length} leaves no prompt in rows of "
                     f"length {length}")
  stop = length if completion_length is None else length - 1
  stats = sft.chunked_token_stats(config, params, hidden[:, start:stop], targets[:, start:stop],
                                  chunk, temperature)
  place = lambda x: jnp.pad(x, ((0, 0), (start, length - stop)))
  return place(stats["logp"]), place(stats["entropy"])


# rl fields added after the first recipes, with the values an older rl group means.
_RL_DEFAULTS = dict(clip_ratio_c=3.0, log_ratio_clamp=20.0, importance_level="token",
                    max_new_tokens=None)


def _rl_field(rl, name):
  return rl.get(name, _RL_DEFAULTS[name])


def _targets(batch: dict):
  """int32[R, L]: the token each position predicts (prediction layout)."""
  ids = batch["input_ids"]
  return jnp.concatenate([ids[:, 1:], jnp.zeros_like(ids[:, :1])], axis=1)


def rl_loss(config: ModelConfig, params, batch: dict, *, rl, functional_ids, chunk: int,
            completion_length: int | None = None):
  """LA-GRPO loss and metrics. `rl` is the config's rl group (fields missing from an
  older group take `_RL_DEFAULTS`); completion_length as in `token_logps`."""
  logp, entropy = token_logps(config, params, batch, chunk=chunk, temperature=rl.temperature,
                              completion_length=completion_length)
  mask = prediction_mask(batch)
  functional_mask = jnp.isin(_targets(batch), functional_ids).astype(jnp.float32) * mask
  loss, metrics = grpo.grpo_loss(
      logp, batch["old_logp"], batch["advantages"], mask, clip_low=rl.clip_low,
      clip_high=rl.clip_high, loss_agg=rl.loss_agg, beta=rl.beta,
      ref_logp=batch.get("ref_logp"), kl_estimator=rl.kl_estimator,
      sampler_logp=batch["sampler_logp"] if rl.tis_cap > 0 else None,
      tis_cap=rl.tis_cap if rl.tis_cap > 0 else None, functional_mask=functional_mask,
      alpha=rl.alpha, anchor=rl.anchor, clip_ratio_c=_rl_field(rl, "clip_ratio_c"),
      log_ratio_clamp=_rl_field(rl, "log_ratio_clamp"),
      importance_level=_rl_field(rl, "importance_level"),
      max_length=_rl_field(rl, "max_new_tokens"))
  n = jnp.maximum(jnp.sum(mask), 1.0)
  metrics = dict(metrics, loss=loss, entropy=jnp.sum(jax.lax.stop_gradient(entropy) * mask) / n)
  return loss, metrics


def row_grad_norms(grads, batch: dict, functional_ids) -> dict:
  """The gradient-dilution diagnostic, from the update's own gradient (no extra pass).

  A vocabulary row's gradient norm is that of its embedding row and LM-head column
  together (the embedding alone when tied). Over the tokens the batch's completions
  contain: functional_row_grad_norm is the mean norm of the functional tokens' rows (0 if
  none occurs), other_row_grad_norm_mean that of every other token's row, and
  dilution_ratio = functional / other (< 1: the functional rows get less than an ordinary
  token's share, the dilution LA-GRPO's anchor counters). Returns float32[] each.
  """
  sq = jnp.sum(jnp.square(grads["embed"]["embedding"].astype(jnp.float32)), axis=1)  # [V]
  if "lm_head" in grads:
    sq = sq + jnp.sum(jnp.square(grads["lm_head"]["kernel"].astype(jnp.float32)), axis=0)
  row = jnp.sqrt(sq)
  vocab = row.shape[0]
  present = jnp.zeros(vocab, jnp.float32).at[_targets(batch).reshape(-1)].max(
      prediction_mask(batch).reshape(-1))
  functional = jnp.zeros(vocab, jnp.float32).at[functional_ids].set(1.0)
  mean_over = lambda w: jnp.sum(row * w) / jnp.maximum(jnp.sum(w), 1.0)
  func_norm = mean_over(present * functional)
  other_norm = mean_over(present * (1.0 - functional))
  return dict(functional_row_grad_norm=func_norm, other_row_grad_norm_mean=other_norm,
              dilution_ratio=func_norm / jnp.maximum(other_norm, 1e-30))


def rl_step(state: TrainState, batch: dict, *, config: ModelConfig, optimizer, rl,
            functional_ids, chunk: int, completion_length: int | None = None,
            skip: str = "select"):
  """One LA-GRPO optimizer update. Pure; jit with donated state. A non-finite loss or
  gradient skips the update (counted in state.skipped; `skip` as in
  `sft.apply_if_finite`). Metrics: rl_loss's, grad_norm, skipped_step and the dilution
  diagnostic (`row_grad_norms`). completion_length as in `token_logps`."""
  grad_fn = jax.value_and_grad(
      functools.partial(rl_loss, config, batch=batch, rl=rl, functional_ids=functional_ids,
                        chunk=chunk, completion_length=completion_length), has_aux=True)
  (loss, metrics), grads = grad_fn(state.params)
  grad_norm = optax.global_norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  diagnostic = row_grad_norms(grads, batch, functional_ids)
  state = sft.apply_if_finite(state, grads, optimizer, finite, skip)
  return state, dict(metrics, **diagnostic, grad_norm=grad_norm,
                     skipped_step=(~finite).astype(jnp.float32))
