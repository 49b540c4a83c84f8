"""The SFT loop: a readable function, resumable from its workdir (resume order: see
atlas_jax/run/setup.py)."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from atlas_jax import config as config_lib
from atlas_jax import multihost, sharding
from atlas_jax.data import pipeline
from atlas_jax.eval import in_training
from atlas_jax.run import optimizer as optimizer_lib
from atlas_jax.run import plots, setup
from atlas_jax.run.steps import StepCache
from atlas_jax.sft.update import sft_step_fn


def train_sft(c, workdir: str, on_start=None, cache: StepCache | None = None):
  """Runs (or resumes) SFT in `workdir`. `on_start(run, state)` is called once the state
  is ready (e.g. to evaluate before training); `cache` shares built steps between runs in
  one process. Returns (final TrainState, last logged metrics, Run)."""
  config_lib.validate(c)
  evals = in_training.TrainingEval.create(c)  # config.eval; None when off
  run, params = setup.start(c, workdir, c.train.steps)
  optimizer = optimizer_lib.make_optimizer(setup.resolve_optim(c))
  state, state_sh = setup.create_state(run, params, optimizer)
  source = pipeline.open_source(run.data_report, "train")
  iterator = pipeline.sft_pipeline(source, **setup.data_options(c, run.tokenizer))
  state = setup.maybe_restore(run, state, state_sh, iterator)
  if on_start is not None:
    on_start(run, state)

  step_fn = sft_step_fn(c, run.model_config, run.mesh, optimizer, state_sh,
                        jnp.asarray(run.table.id_array), cache=cache)

  last: dict = {}
  window: list = []
  tokens = 0
  t0 = time.perf_counter()
  with sharding.with_rules(run.mesh, sharding.RULES):
    start_step = int(state.step)
    end = setup.stop_step(c, start_step)
    for step in range(start_step, end):
      batch = next(iterator)
      tokens += int(batch["attention_mask"].sum())
      state, metrics = step_fn(state, multihost.host_batch_to_device(batch, run.mesh))
      window.append(metrics)
      done = step + 1
      if done % c.train.log_every == 0 or done == end:
        stacked = jax.device_get(window)
        last = {k: float(np.mean([m[k] for m in stacked])) for k in stacked[0]}
        elapsed = time.perf_counter() - t0
        last["tokens_per_s"] = tokens * jax.process_count() / elapsed
        last["skipped_steps_total"] = float(state.skipped)
        run.writer.write(done, last)
        window, tokens, t0 = [], 0, time.perf_counter()
      run.checkpointer.save(done, state, data_state=iterator.get_state(),
                            extra=setup.checkpoint_extra(run), force=done == end)
      if evals is not None:
        evals.maybe_run(run, state, done, end)
      if done % c.train.log_every == 0 or done == end:
        plots.refresh(run.workdir, force=done == end)
  run.checkpointer.wait()
  run.writer.text(int(state.step), "skipped_records", pipeline.report_skipped(iterator.skipped))
  run.checkpointer.close()
  run.writer.close()
  return state, last, run
