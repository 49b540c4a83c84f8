"""The SFT update: one optimizer step on one micro-batch, and its jitted builder.

  sft_step     (state, batch) -> (state, metrics), pure
  sft_step_fn  the jitted step a recipe trains with (state donated; shardings from the
               mesh), the one `launch.train` runs and `launch.aot_report` compiles
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from atlas_jax import sharding
from atlas_jax.model.config import ModelConfig
from atlas_jax.run import optimizer as optimizer_lib
from atlas_jax.run import setup
from atlas_jax.run import steps as steps_lib
from atlas_jax.run.state import TrainState
from atlas_jax.sft.loss import sft_loss


def sft_step(state: TrainState, batch, *, config: ModelConfig, optimizer, functional_ids,
             lr_schedule=None, chunk: int = 512, skip: str = "select"):
  """One SFT update: (state, batch) -> (state, metrics). Pure; jit it with donated state.

  A non-finite loss or gradient norm skips the update (params and optimizer state stay as
  they were), counts it in `state.skipped` and reports `skipped_step = 1`; `skip` as in
  `steps.apply_if_finite`.
  """
  grad_fn = jax.value_and_grad(
      functools.partial(sft_loss, config, batch=batch, functional_ids=functional_ids,
                        chunk=chunk), has_aux=True)
  (loss, metrics), grads = grad_fn(state.params)
  grad_norm = optax.global_norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  new_state = steps_lib.apply_if_finite(state, grads, optimizer, finite, skip)
  metrics = dict(metrics, grad_norm=grad_norm, skipped_step=(~finite).astype(jnp.float32))
  if lr_schedule is not None:
    metrics["learning_rate"] = lr_schedule(state.step)
  return new_state, metrics


def sft_step_fn(c, model_config, mesh, optimizer, state_sh, functional_ids, *,
                cache: steps_lib.StepCache | None = None):
  """The jitted SFT step (state donated): one micro-batch of data.batch_size rows (grad
  accumulation is optax.MultiSteps inside the optimizer: optim.grad_accum micro-steps per
  update). The batch is the pipeline's device batch (`setup.BATCH_RANKS` fields), sharded
  over data x fsdp. With `cache`, an equal call returns the step built before."""
  optim = setup.resolve_optim(c)
  platform = steps_lib.platform(mesh)

  def build():
    schedule = optimizer_lib.learning_rate_schedule(optim)
    return jax.jit(
        functools.partial(sft_step, config=model_config, optimizer=optimizer,
                          functional_ids=functional_ids,
                          lr_schedule=lambda s: schedule(s // optim.grad_accum),
                          chunk=c.train.logprob_chunk, skip=steps_lib.skip_mode(platform)),
        in_shardings=(state_sh, setup.batch_shardings(mesh)),
        out_shardings=(state_sh, sharding.replicated(mesh)), donate_argnums=0,
        compiler_options=steps_lib.gradient_compiler_options(platform))
  key = ("sft", model_config, optimizer_lib.config_key(optim), mesh,
         steps_lib.sharding_key(state_sh), tuple(np.asarray(functional_ids).tolist()),
         c.train.logprob_chunk)
  return steps_lib.cached(cache, key, build)
