"""The run machinery every loop shares (SFT, RL, and the evaluator, ablation and AOT report
where they build the same pieces): start a run, build its optimizer and sharded state,
restore from the workdir, and the metadata checkpoints carry.

Resume order: the config and tokenizer are rebuilt exactly as the first time (both are
deterministic), the model is initialised (or loaded) and sharded, then, if
<workdir>/checkpoints holds a checkpoint, the whole TrainState and the data iterator are
restored from it, so the run continues with the batch it would have seen next.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax

from atlas_jax import checkpoint as checkpoint_lib
from atlas_jax import sharding
from atlas_jax.train import metrics as metrics_lib
from atlas_jax.train import optimizer as optimizer_lib
from atlas_jax.train import setup
from atlas_jax.train.state import TrainState


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
  writer.text(0, "data", str(report), console=False)  # the build printed its own line
  ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                                     save_every=c.checkpoint.every, keep=c.checkpoint.keep,
                                     async_save=c.checkpoint.async_save)
  return Run(c, workdir, mesh, tokenizer, model_config, table, report, writer, ckpt), params


def resolve_optim(c):
  """The optim group with total_steps filled in (-1 = train.steps / grad_accum)."""
  optim = c.optim.copy_and_resolve_references()
  with optim.unlocked():
    if optim.total_steps < 0:
      optim.total_steps = max(c.train.steps // optim.grad_accum, 1)
  return optim


def abstract_state(mesh, model_config, optimizer, params, seed: int):
  """(TrainState of ShapeDtypeStructs, its shardings) for `params` (arrays or
  ShapeDtypeStructs) under `optimizer`; allocates nothing."""
  param_sh = sharding.param_shardings(mesh, model_config)
  create = functools.partial(TrainState.create, optimizer=optimizer, seed=seed)
  shapes = jax.eval_shape(create, params)
  return shapes, sharding.state_shardings(mesh, shapes, param_sh)


def create_state(run: Run, params, optimizer):
  """A TrainState born sharded (params are donated), and its shardings."""
  _, state_sh = abstract_state(run.mesh, run.model_config, optimizer, params, run.config.seed)
  create = functools.partial(TrainState.create, optimizer=optimizer, seed=run.config.seed)
  state = jax.jit(create, out_shardings=state_sh, donate_argnums=0)(params)
  return state, state_sh


def _check_optimizer(step: int, saved: dict | None, optim) -> None:
  """The optimizer state's layout (frozen groups, moments dtype) must be the one saved; the
  groups' rates may change on resume, as optim.lr may."""
  if saved is None:  # written before the grouping was saved
    return
  ours = optimizer_lib.describe(optim)
  layout = lambda d: ({g: s["trainable"] for g, s in d["groups"].items()}, d["moments_dtype"])
  if layout(saved) != layout(ours):
    (trainable, moments), (our_trainable, our_moments) = layout(saved), layout(ours)
    raise ValueError(f"checkpoint at step {step} was trained with trainable groups "
                     f"{trainable} and optim.moments_dtype {moments!r}; this run has "
                     f"{our_trainable} and {our_moments!r} (config.optim.vision/merger/llm."
                     "trainable, optim.moments_dtype): use the checkpoint's settings or a "
                     "new workdir")


def maybe_restore(run: Run, state, state_sh, iterator):
  """Restores state and iterator from the latest checkpoint, if any. Returns the state."""
  step = run.checkpointer.latest_step()
  if step is None:
    return state
  saved = checkpoint_lib.read_extra(run.checkpointer.directory, step)
  _check_optimizer(step, saved.get("optimizer"), resolve_optim(run.config))
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          state, state_sh)
  state, data_state, extra = run.checkpointer.restore(step, abstract_state=abstract)
  tokens = extra.get("functional_tokens")
  if tokens != run.table.to_json():
    raise ValueError(f"checkpoint at step {step} has functional tokens {tokens}; this run "
                     f"assigns {run.table.to_json()}")
  if data_state is not None:
    iterator.set_state(data_state)
  run.writer.text(step, "resume", f"restored step {step} from {run.checkpointer.directory}")
  return state


def checkpoint_extra(run: Run) -> dict:
  """The JSON a checkpoint carries besides the state."""
  return {"functional_tokens": run.table.to_json(),
          "model_config": dataclasses.asdict(run.model_config),
          "optimizer": optimizer_lib.describe(resolve_optim(run.config)),
          "config": run.config.to_dict()}


def stop_step(c, start_step: int) -> int:
  """The step this job stops at: train.steps, or sooner by train.stop_after (resumable)."""
  if c.train.stop_after < 0:
    return c.train.steps
  return min(c.train.steps, start_step + c.train.stop_after)


def data_options(c, tokenizer, *, shuffle=True, seed=None) -> dict:
  """The pipeline keyword arguments of config.data; batch_size is this process's share."""
  return dict(tokenizer=tokenizer, min_pixels=c.data.min_pixels, max_pixels=c.data.max_pixels,
              max_length=c.data.max_length, length_buckets=tuple(c.data.length_buckets),
              max_images=c.data.max_images, max_patches=c.data.max_patches,
              batch_size=c.data.batch_size // jax.process_count(),
              seed=c.seed if seed is None else seed, shuffle=shuffle,
              prompt_suffix=c.data.prompt_suffix)


BATCH_RANKS = {"input_ids": 2, "attention_mask": 2, "loss_mask": 2, "position_ids": 3,
               "pixel_values": 3, "image_grid_thw": 3, "valid": 1}


def batch_shardings(mesh) -> dict:
  """Shardings of a device batch (the pipeline's numeric fields), batch-major."""
  return {k: sharding.batch_sharding(mesh, n) for k, n in BATCH_RANKS.items()}
