"""The LA-GRPO update: rollouts in, one optimizer step out; and the jitted RL steps a recipe
trains with (the ones `launch.train` runs and `launch.aot_report` compiles).

Letters: R rollouts, T prompt length, N completion length, L = T + N.

A rollout batch is batch-major: `input_ids`/`attention_mask` int32[R, L] (left-padded
prompt, then the completion), `completion_mask` int32[R, L] (1 on generated tokens),
`advantages` float32[R], optional `pixel_values` float32[R, P, C] / `image_grid_thw`
int32[R, I, 3], and per-token arrays in the prediction layout (`run.logprobs`) float32[R, L]:
`old_logp` (trainer log-probs before this batch's updates), `sampler_logp`, optional
`ref_logp`.

With rl.shared_prefix the batch is in the grouped form instead (`run.shared_prefix`:
prompts and images once [B, ...], completions [R, N], per-token arrays in the completion
layout float32[R, N]); every function here takes either form, and the losses, metrics and
gradients are the same (tests/test_shared_prefix.py).

  old_logps_fn     the jitted trainer log-prob pass (the "old" policy, and the reference)
  rl_update_fn     the jitted LA-GRPO update: (state, rollout batch) -> (state, metrics)
  micro_batches    a rollout batch split into optim.grad_accum micro-batches
  batch_logps      a log-prob pass over a whole rollout batch, in micro-batches of its own

Both steps are traced under `sharding.training_rules(rl.sequence_parallel)`.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from atlas_jax import sharding
from atlas_jax.model.config import ModelConfig
from atlas_jax.rl import grpo
from atlas_jax.run import logprobs
from atlas_jax.run import optimizer as optimizer_lib
from atlas_jax.run import shared_prefix
from atlas_jax.run import steps as steps_lib
from atlas_jax.run.state import TrainState


def prediction_mask(batch: dict):
  """float32[R, L]: 1 where position j predicts a completion token (j + 1); in the grouped
  form float32[R, N], the completion mask itself."""
  if shared_prefix.is_grouped(batch):
    return batch["completion_mask"].astype(jnp.float32)
  return logprobs.shifted_mask(batch["completion_mask"]).astype(jnp.float32)


def predicted_tokens(batch: dict):
  """int32[R, L]: the token each position predicts (`logprobs.targets`); in the grouped
  form the completion tokens int32[R, N]."""
  if shared_prefix.is_grouped(batch):
    return batch["completion_ids"]
  return logprobs.targets(batch)


def rl_loss(config: ModelConfig, params, batch: dict, *, settings: grpo.LossSettings,
            temperature: float, functional_ids, chunk: int,
            completion_length: int | None = None):
  """LA-GRPO loss and metrics of the params on a rollout batch: the trainer's log-probs at
  the sampling `temperature` (completion_length as in `token_logps`), then
  `grpo.grpo_loss` with `settings`, M_func the completion positions whose target is one
  of functional_ids int32[F]. A grouped batch (`run.shared_prefix`) runs each prompt once
  (completion_length is then its N); a constant the aggregation would take from the row
  length (settings.max_length None) is still T + N."""
  if shared_prefix.is_grouped(batch):
    logp, entropy = shared_prefix.token_logps(config, params, batch, chunk=chunk,
                                              temperature=temperature)
    if settings.max_length is None:
      length = batch["prompt_ids"].shape[1] + batch["completion_ids"].shape[1]
      settings = dataclasses.replace(settings, max_length=length)
  else:
    logp, entropy = logprobs.token_logps(config, params, batch, chunk=chunk,
                                         temperature=temperature,
                                         completion_length=completion_length)
  mask = prediction_mask(batch)
  functional_mask = jnp.isin(predicted_tokens(batch), functional_ids).astype(jnp.float32) * mask
  loss, metrics = grpo.grpo_loss(
      logp, batch["old_logp"], batch["advantages"], mask, settings,
      ref_logp=batch.get("ref_logp"), sampler_logp=batch.get("sampler_logp"),
      functional_mask=functional_mask)
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
  present = jnp.zeros(vocab, jnp.float32).at[predicted_tokens(batch).reshape(-1)].max(
      prediction_mask(batch).reshape(-1))
  functional = jnp.zeros(vocab, jnp.float32).at[functional_ids].set(1.0)
  mean_over = lambda w: jnp.sum(row * w) / jnp.maximum(jnp.sum(w), 1.0)
  func_norm = mean_over(present * functional)
  other_norm = mean_over(present * (1.0 - functional))
  return dict(functional_row_grad_norm=func_norm, other_row_grad_norm_mean=other_norm,
              dilution_ratio=func_norm / jnp.maximum(other_norm, 1e-30))


def rl_step(state: TrainState, batch: dict, *, config: ModelConfig, optimizer,
            settings: grpo.LossSettings, temperature: float, functional_ids, chunk: int,
            completion_length: int | None = None, skip: str = "select"):
  """One LA-GRPO optimizer update (`rl_loss`'s arguments). Pure; jit with donated state. A
  non-finite loss or gradient skips the update (counted in state.skipped; `skip` as in
  `steps.apply_if_finite`). Metrics: rl_loss's, grad_norm, skipped_step and the dilution
  diagnostic (`row_grad_norms`)."""
  grad_fn = jax.value_and_grad(
      functools.partial(rl_loss, config, batch=batch, settings=settings,
                        temperature=temperature, functional_ids=functional_ids, chunk=chunk,
                        completion_length=completion_length), has_aux=True)
  (loss, metrics), grads = grad_fn(state.params)
  grad_norm = optax.global_norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  diagnostic = row_grad_norms(grads, batch, functional_ids)
  state = steps_lib.apply_if_finite(state, grads, optimizer, finite, skip)
  return state, dict(metrics, **diagnostic, grad_norm=grad_norm,
                     skipped_step=(~finite).astype(jnp.float32))


def old_logps_fn(c, model_config, *, cache: steps_lib.StepCache | None = None):
  """The jitted trainer log-prob pass: (params, rollout batch) -> (logp, entropy)
  float32[R, L] each (prediction layout); with rl.shared_prefix, of a grouped batch,
  float32[R, N] (completion layout, `run.shared_prefix`). Shardings follow the
  arguments."""
  chunk, temperature, n = c.train.logprob_chunk, c.rl.temperature, c.rl.max_new_tokens
  shared = bool(c.rl.shared_prefix)
  rules = sharding.training_rules(c.rl.sequence_parallel)
  key = ("old_logps", model_config, chunk, temperature, n, shared, rules)
  if shared:
    fn = functools.partial(shared_prefix.token_logps, model_config, chunk=chunk,
                           temperature=temperature)
  else:
    fn = functools.partial(logprobs.token_logps, model_config, chunk=chunk,
                           temperature=temperature, completion_length=n)
  return steps_lib.cached(cache, key, lambda: jax.jit(sharding.traced_under(fn, rules)))


def rl_update_fn(c, model_config, mesh, optimizer, state_sh, functional_ids, *,
                 cache: steps_lib.StepCache | None = None):
  """The jitted LA-GRPO update (state donated) on one rollout batch (`rollout.assemble`'s
  fields, or `rollout.assemble_grouped`'s with rl.shared_prefix, plus old_logp, and
  ref_logp when rl.beta > 0)."""
  platform = steps_lib.platform(mesh)
  settings = grpo.LossSettings.from_rl(c.rl)
  chunk, temperature, n = c.train.logprob_chunk, c.rl.temperature, c.rl.max_new_tokens
  rules = sharding.training_rules(c.rl.sequence_parallel)
  key = ("rl_update", model_config, optimizer_lib.config_key(c.optim), mesh,
         steps_lib.sharding_key(state_sh), tuple(np.asarray(functional_ids).tolist()),
         settings, chunk, temperature, n, rules)
  return steps_lib.cached(cache, key, lambda: jax.jit(sharding.traced_under(
      functools.partial(rl_step, config=model_config, optimizer=optimizer, settings=settings,
                        temperature=temperature, functional_ids=functional_ids, chunk=chunk,
                        completion_length=n, skip=steps_lib.skip_mode(platform)), rules),
      out_shardings=(state_sh, sharding.replicated(mesh)), donate_argnums=0,
      compiler_options=steps_lib.gradient_compiler_options(platform)))


def micro_batches(batch: dict, count: int, mesh) -> list[dict]:
  """A rollout batch (R rows, sharded over data x fsdp) as `count` micro-batches of R /
  count rows: row r goes to micro-batch r % count, so each batch shard keeps its own rows
  and no rows move between chips. count 1: [batch] itself.

  A grouped batch splits by prompt: prompt b and its G completions go to micro-batch
  b % count. Each micro-batch holds whole groups, so each prompt is computed once per
  update (splitting a group would recompute its prompt, vision tower included, in every
  micro-batch holding one of its completions); B must then split into count x shards.
  For smaller micro-batches, rl.shared_prefix_parts makes smaller groups, each with its
  own copy of the prompt (`rollout.assemble_grouped`)."""
  if count == 1:
    return [batch]
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  if shared_prefix.is_grouped(batch):
    prompts = batch["prompt_ids"].shape[0]
    if prompts % (count * shards):
      raise ValueError(f"rl.shared_prefix keeps each group's completions in one "
                       f"micro-batch: the rollout batch's {prompts} groups "
                       f"(rl.prompts_per_step x rl.shared_prefix_parts) do not split into "
                       f"optim.grad_accum = {count} micro-batches over {shards} batch "
                       f"shards")
    return list(_split_grouped(batch, count, mesh))
  rows = batch["input_ids"].shape[0]
  if rows % (count * shards):
    raise ValueError(f"the rollout batch's {rows} rows (rl.prompts_per_step x rl.group_size) "
                     f"do not split into optim.grad_accum = {count} micro-batches over "
                     f"{shards} batch shards")
  return list(_split(batch, count, mesh))


def batch_logps(logps_fn, params, batch: dict, count: int, mesh):
  """float32[R, ...]: the log-probs `logps_fn` (`old_logps_fn`'s) gives a whole rollout
  batch, run in `count` micro-batches (`micro_batches`: whole groups for a grouped batch)
  and put back in the batch's row order (the prediction layout, or the completion layout
  of a grouped batch). The log-prob passes have no backward pass: they can take fewer,
  larger micro-batches than the update (rl.logprob_micro_batches), and a grouped batch
  each prompt once, whatever rl.shared_prefix_parts the update runs."""
  micro = micro_batches(batch, count, mesh)
  return _join(tuple(logps_fn(params, mb)[0] for mb in micro), _group(batch), mesh)


def _group(batch: dict) -> int:
  """Rows per micro-batch unit: a grouped batch's completions per prompt, else 1."""
  if shared_prefix.is_grouped(batch):
    return batch["completion_ids"].shape[0] // batch["prompt_ids"].shape[0]
  return 1


@functools.partial(jax.jit, static_argnums=(1, 2))
def _join(parts: tuple, group: int, mesh):
  """The inverse of `_split` / `_split_grouped` on per-row arrays [R / count, ...]: unit u
  (a row, or a prompt's `group` completions) of part i back to unit u * count + i."""
  if len(parts) == 1:
    return parts[0]
  units = [x.reshape(x.shape[0] // group, group, *x.shape[1:]) for x in parts]
  x = jnp.stack(units, axis=1)  # [R / count / group, count, group, ...]
  x = x.reshape(-1, *x.shape[3:])
  return jax.lax.with_sharding_constraint(x, sharding.batch_sharding(mesh, x.ndim))


@functools.partial(jax.jit, static_argnums=(1, 2))
def _split(batch: dict, count: int, mesh) -> tuple[dict, ...]:
  pick = lambda x, i: jax.lax.with_sharding_constraint(
      x.reshape(x.shape[0] // count, count, *x.shape[1:])[:, i],
      sharding.batch_sharding(mesh, x.ndim))
  return tuple({k: pick(v, i) for k, v in batch.items()} for i in range(count))


@functools.partial(jax.jit, static_argnums=(1, 2))
def _split_grouped(batch: dict, count: int, mesh) -> tuple[dict, ...]:
  prompts = batch["prompt_ids"].shape[0]

  def pick(x, i):  # x: [B, ...] per prompt or [B * G, ...] per completion
    g = x.shape[0] // prompts
    x = x.reshape(prompts // count, count, g, *x.shape[1:])[:, i]
    return jax.lax.with_sharding_constraint(x.reshape(-1, *x.shape[2:]),
                                            sharding.batch_sharding(mesh, x.ndim - 1))
  return tuple({k: pick(v, i) for k, v in batch.items()} for i in range(count))
