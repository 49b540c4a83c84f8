"""The SFT loop: a readable function, resumable from its workdir.

Resume order: the config and tokenizer are rebuilt exactly as the first time (both are
deterministic), the model is initialised (or loaded) and sharded, then, if
<workdir>/checkpoints holds a checkpoint, the whole TrainState and the data iterator are
restored from it, so the run continues with the batch it would have seen next.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from atlas_jax import checkpoint as checkpoint_lib
from atlas_jax import sharding
from atlas_jax.data import pipeline
from atlas_jax.eval import in_training
from atlas_jax.train import metrics as metrics_lib
from atlas_jax.train import optimizer as optimizer_lib
from atlas_jax.train import plots, setup
from atlas_jax.train.sft import sft_step
from atlas_jax.train.state import TrainState


def resolve_optim(c):
  """The optim group with total_steps filled in (-1 = train.steps / grad_accum)."""
  optim = c.optim.copy_and_resolve_references()
  with optim.unlocked():
    if optim.total_steps < 0:
      optim.total_steps = max(c.train.steps // optim.grad_accum, 1)
  return optim


def stop_step(c, start_step: int) -> int:
  """The step this job stops at: train.steps, or sooner by train.stop_after (resumable)."""
  if c.train.stop_after < 0:
    return c.train.steps
  return min(c.train.steps, start_step + c.train.stop_after)


def data_options(c, tokenizer, *, shuffle=True, seed=None):
  return dict(tokenizer=tokenizer, min_pixels=c.data.min_pixels, max_pixels=c.data.max_pixels,
              max_length=c.data.max_length, length_buckets=tuple(c.data.length_buckets),
              max_images=c.data.max_images, max_patches=c.data.max_patches,
              batch_size=c.data.batch_size // jax.process_count(),
              seed=c.seed if seed is None else seed, shuffle=shuffle,
              prompt_suffix=c.data.prompt_suffix)


@dataclasses.dataclass
class Run:
  """What a recipe's loop works with, built by `start`."""

  config: object
  workdir: str
  mesh: object
  tokenizer: object
  model_config: object
  table: object
  data_report: dict
  writer: metrics_lib.MetricWriter
  checkpointer: checkpoint_lib.Checkpointer


def start(c, workdir: str, total_steps: int) -> tuple[Run, object]:
  """Validation, distributed init, mesh, tokenizer, model (+ functional tokens), data,
  metric writer and checkpointer. Returns (Run, params)."""
  setup.validate_config(c)
  setup.maybe_initialize_distributed(c)
  mesh = setup.make_mesh(c)
  tokenizer = setup.load_tokenizer(c, workdir)
  model_config, params, table = setup.load_model(c, tokenizer, mesh)
  if jax.process_index() == 0:
    tokenizer.save_pretrained(os.path.join(workdir, "tokenizer"))
  report = setup.prepare_data(c, workdir)
  writer = metrics_lib.MetricWriter(workdir, total_steps)
  writer.text(0, "data", str(report))
  ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                                     save_every=c.checkpoint.every, keep=c.checkpoint.keep,
                                     async_save=c.checkpoint.async_save)
  return Run(c, workdir, mesh, tokenizer, model_config, table, report, writer, ckpt), params


def create_state(run: Run, params, optimizer):
  """A TrainState born sharded (params are donated), and its shardings."""
  param_sh = sharding.param_shardings(run.mesh, run.model_config)
  create = functools.partial(TrainState.create, optimizer=optimizer, seed=run.config.seed)
  abstract = jax.eval_shape(create, params)
  state_sh = sharding.state_shardings(run.mesh, abstract, param_sh)
  state = jax.jit(create, out_shardings=state_sh, donate_argnums=0)(params)
  return state, state_sh


def maybe_restore(run: Run, state, state_sh, iterator):
  """Restores state and iterator from the latest checkpoint, if any. Returns the state."""
  step = run.checkpointer.latest_step()
  if step is None:
    return state
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          state, state_sh)
  state, data_state, extra = run.checkpointer.restore(step, abstract_state=abstract)
  saved = extra.get("functional_tokens")
  if saved != run.table.to_json():
    raise ValueError(f"checkpoint at step {step} has functional tokens {saved}; this run "
                     f"assigns {run.table.to_json()}")
  if data_state is not None:
    iterator.set_state(data_state)
  run.writer.text(step, "resume", f"restored step {step} from {run.checkpointer.directory}")
  return state


BATCH_RANKS = {"input_ids": 2, "attention_mask": 2, "loss_mask": 2, "position_ids": 3,
               "pixel_values": 3, "image_grid_thw": 3, "valid": 1}


def batch_shardings(mesh) -> dict:
  """Shardings of a device batch (the pipeline's numeric fields), batch-major."""
  return {k: sharding.batch_sharding(mesh, n) for k, n in BATCH_RANKS.items()}


def checkpoint_extra(run: Run) -> dict:
  return {"functional_tokens": run.table.to_json(),
          "model_config": dataclasses.asdict(run.model_config),
          "config": run.config.to_dict()}


def train_sft(c, workdir: str, on_start=None):
  """Runs (or resumes) SFT in `workdir`. `on_start(run, state)` is called once the state
  is ready (e.g. to evaluate before training). Returns (final TrainState, last logged
  metrics, Run)."""
  evals = in_training.TrainingEval.create(c)  # config.eval; None when off
  run, params = start(c, workdir, c.train.steps)
  optim = resolve_optim(c)
  optimizer = optimizer_lib.make_optimizer(optim)
  schedule = optimizer_lib.learning_rate_schedule(optim)
  state, state_sh = create_state(run, params, optimizer)
  source = pipeline.open_source(run.data_report, "train")
  iterator = pipeline.sft_pipeline(source, **data_options(c, run.tokenizer))
  state = maybe_restore(run, state, state_sh, iterator)
  if on_start is not None:
    on_start(run, state)

  step_fn = jax.jit(
      functools.partial(sft_step, config=run.model_config, optimizer=optimizer,
                        functional_ids=jnp.asarray(run.table.id_array),
                        lr_schedule=lambda s: schedule(s // optim.grad_accum),
                        chunk=c.train.logprob_chunk),
      in_shardings=(state_sh, batch_shardings(run.mesh)),
      out_shardings=(state_sh, sharding.replicated(run.mesh)), donate_argnums=0)

  last: dict = {}
  window: list = []
  tokens = 0
  t0 = time.perf_counter()
  with sharding.with_rules(run.mesh, sharding.RULES):
    start_step = int(state.step)
    end = stop_step(c, start_step)
    for step in range(start_step, end):
      batch = next(iterator)
      tokens += int(batch["attention_mask"].sum())
      state, metrics = step_fn(state, setup.host_batch_to_device(batch, run.mesh))
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
                            extra=checkpoint_extra(run), force=done == end)
      if evals is not None:
        evals.maybe_run(run, state, done, end)
      if done % c.train.log_every == 0 or done == end:
        plots.refresh(run.workdir, force=done == end)
  run.checkpointer.wait()
  run.writer.text(int(state.step), "skipped_records", pipeline.report_skipped(iterator.skipped))
  run.checkpointer.close()
  run.writer.close()
  return state, last, run
