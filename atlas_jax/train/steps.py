"""The jitted step functions a recipe trains with, built in one place from its config.

`launch.train` (through `train_sft` and `train_rl`) and the AOT report (`atlas_jax.aot`)
both call these builders, so the steps the report compiles for a TPU slice are the ones a
run executes: same functions, same static settings, same shardings and donation.

  sft_step_fn      SFT: (state, batch) -> (state, metrics), one micro-batch of
                   data.batch_size rows (grad accumulation is optax.MultiSteps inside the
                   optimizer: optim.grad_accum micro-steps per update)
  old_logps_fn     RL: trainer log-probs of a rollout batch (the "old" policy)
  rl_update_fn     RL: (state, rollout batch) -> (state, metrics), the LA-GRPO update
  micro_batches    RL: a rollout batch split into optim.grad_accum micro-batches
  sampler_settings RL: the sampler's static settings from the rl group

The gradient steps also take two choices by the mesh's platform (`skip_mode`,
`gradient_compiler_options`): what is cheap on XLA:CPU can cost an accelerator memory, so
the AOT report, which compiles for a TPU mesh, sees the TPU choices.

A builder called again with equal settings (the same model config, optimizer, mesh,
shardings and config fields) returns the jitted function it built before, so runs in one
process (an ablation's variants and seeds, a resume, an evaluation) trace and compile each
distinct step once. `optimizer.make_optimizer` returns one object per optim config for the
same reason.
"""

from __future__ import annotations

import collections
import contextlib
import functools

import jax
import numpy as np

from atlas_jax import sharding
from atlas_jax.rl.sampler import SamplerSettings
from atlas_jax.rl.update import rl_step, token_logps
from atlas_jax.train import optimizer as optimizer_lib
from atlas_jax.train import run as run_lib
from atlas_jax.train.sft import sft_step


_BUILT: collections.OrderedDict = collections.OrderedDict()
_KEEP = 8  # jitted steps kept (each holds its compiled executables)


_SHARED = [True]


@contextlib.contextmanager
def unshared():
  """Inside, the builders return new jitted steps, not the shared ones: for a lowering that
  must trace afresh (the AOT report's cost pass with the layer scans unrolled)."""
  _SHARED[0] = False
  try:
    yield
  finally:
    _SHARED[0] = True


def _memo(key, build):
  """build(), or what it returned for an equal key before (the newest _KEEP are kept)."""
  if not _SHARED[0]:
    return build()
  if key in _BUILT:
    _BUILT.move_to_end(key)
    return _BUILT[key]
  _BUILT[key] = fn = build()
  while len(_BUILT) > _KEEP:
    _BUILT.popitem(last=False)
  return fn


def _platform(mesh) -> str:
  return mesh.devices.flat[0].platform


def skip_mode(platform: str) -> str:
  """How the gradient steps keep the old state on a non-finite update
  (`sft.apply_if_finite`): a branch on CPU, a select elsewhere."""
  return "branch" if platform == "cpu" else "select"


def gradient_compiler_options(platform: str) -> dict | None:
  """XLA options for the steps with a backward pass, by platform ("cpu", "tpu", ...).

  CPU: YNNPACK fuses the dots only. Its default also fuses elementwise producers into
  them, and then the backward pass recomputes each weight gradient's elementwise producer
  a second time as a transposing copy (15% of the op time of the bench model's fwd + bwd);
  without, the SFT step ran 5-7% faster (the same step compiled both ways, timed
  alternately in one process). Other platforms: none.
  """
  if platform != "cpu":
    return None
  return {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"}


def _sharding_key(tree):
  leaves, treedef = jax.tree.flatten(tree)
  return treedef, tuple(leaves)


def sft_step_fn(c, model_config, mesh, optimizer, state_sh, functional_ids):
  """The jitted SFT step (state donated). The batch is the pipeline's device batch
  (`run.BATCH_RANKS` fields), sharded over data x fsdp."""
  optim = run_lib.resolve_optim(c)
  key = ("sft", model_config, optimizer, mesh, _sharding_key(state_sh),
         tuple(np.asarray(functional_ids).tolist()), optimizer_lib.config_key(optim),
         c.train.logprob_chunk)
  return _memo(key, lambda: _sft_step_fn(c, model_config, mesh, optimizer, state_sh,
                                         functional_ids, optim))


def _sft_step_fn(c, model_config, mesh, optimizer, state_sh, functional_ids, optim):
  schedule = optimizer_lib.learning_rate_schedule(optim)
  return jax.jit(
      functools.partial(sft_step, config=model_config, optimizer=optimizer,
                        functional_ids=functional_ids,
                        lr_schedule=lambda s: schedule(s // optim.grad_accum),
                        chunk=c.train.logprob_chunk, skip=skip_mode(_platform(mesh))),
      in_shardings=(state_sh, run_lib.batch_shardings(mesh)),
      out_shardings=(state_sh, sharding.replicated(mesh)), donate_argnums=0,
      compiler_options=gradient_compiler_options(_platform(mesh)))


def old_logps_fn(c, model_config):
  """The jitted trainer log-prob pass: (params, rollout batch) -> (logp, entropy)
  float32[R, L] each (prediction layout); shardings follow the arguments."""
  chunk, temperature, n = c.train.logprob_chunk, c.rl.temperature, c.rl.max_new_tokens
  return _memo(("old_logps", model_config, chunk, temperature, n), lambda: jax.jit(
      functools.partial(token_logps, model_config, chunk=chunk, temperature=temperature,
                        completion_length=n)))


def rl_update_fn(c, model_config, mesh, optimizer, state_sh, functional_ids):
  """The jitted LA-GRPO update (state donated) on one rollout batch (`rollout.assemble`'s
  fields plus old_logp, and ref_logp when rl.beta > 0)."""
  key = ("rl_update", model_config, optimizer, mesh, _sharding_key(state_sh),
         tuple(np.asarray(functional_ids).tolist()), optimizer_lib.config_key(c.rl),
         c.train.logprob_chunk)
  return _memo(key, lambda: jax.jit(
      functools.partial(rl_step, config=model_config, optimizer=optimizer, rl=c.rl,
                        functional_ids=functional_ids, chunk=c.train.logprob_chunk,
                        completion_length=c.rl.max_new_tokens, skip=skip_mode(_platform(mesh))),
      out_shardings=(state_sh, sharding.replicated(mesh)), donate_argnums=0,
      compiler_options=gradient_compiler_options(_platform(mesh))))


def sampler_settings(rl, *, stop_ids, pad_id: int, greedy: bool = False,
                     group_size: int | None = None) -> SamplerSettings:
  """The rollout sampler's static settings from an rl group (group_size: samples per
  prompt, default rl.group_size)."""
  return SamplerSettings(
      max_new_tokens=rl.max_new_tokens, temperature=rl.temperature, top_k=rl.top_k,
      top_p=rl.top_p, greedy=greedy, stop_ids=tuple(stop_ids), pad_id=pad_id,
      samples_per_prompt=rl.group_size if group_size is None else group_size)


def micro_batches(batch: dict, count: int, mesh) -> list[dict]:
  """A rollout batch (R rows, sharded over data x fsdp) as `count` micro-batches of R /
  count rows: row r goes to micro-batch r % count, so each batch shard keeps its own rows
  and no rows move between chips. count 1: [batch] itself."""
  if count == 1:
    return [batch]
  rows = batch["input_ids"].shape[0]
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  if rows % (count * shards):
    raise ValueError(f"the rollout batch's {rows} rows (rl.prompts_per_step x rl.group_size) "
                     f"do not split into optim.grad_accum = {count} micro-batches over "
                     f"{shards} batch shards")
  return list(_split(batch, count, mesh))


@functools.partial(jax.jit, static_argnums=(1, 2))
def _split(batch: dict, count: int, mesh) -> tuple[dict, ...]:
  pick = lambda x, i: jax.lax.with_sharding_constraint(
      x.reshape(x.shape[0] // count, count, *x.shape[1:])[:, i],
      sharding.batch_sharding(mesh, x.ndim))
  return tuple({k: pick(v, i) for k, v in batch.items()} for i in range(count))
