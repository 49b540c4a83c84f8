"""The run machinery both loops share (SFT and RL; the evaluator, ablation and AOT report
build the same pieces), in the order a run takes it: validate the config, start
multi-host JAX, build the mesh, load the tokenizer and the model (functional tokens
added), build the data, then the optimizer and the sharded state, and restore from the
workdir. Each function is usable on its own from a notebook; `start` runs the first steps
for a loop.

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
from transformers import AutoTokenizer

from atlas_jax import checkpoint as checkpoint_lib
from atlas_jax import config as config_lib
from atlas_jax import functional_tokens, hf, multihost, sharding
from atlas_jax.data import chat, synthetic, tfds_builder
from atlas_jax.data.tokenizer import build_tokenizer
from atlas_jax.model import abstract_params, attention, from_size, init_params, \
    param_shardings
from atlas_jax.model import config as model_config_lib
from atlas_jax.run import metrics as metrics_lib
from atlas_jax.run import optimizer as optimizer_lib
from atlas_jax.run.state import TrainState


# 2. Multi-host JAX ----------------------------------------------------------------------------

def maybe_initialize_distributed(c) -> None:
  """`jax.distributed.initialize` when the config asks (fields left empty/-1 come from the
  environment: TPU metadata, SLURM, or JAX_COORDINATOR_ADDRESS etc.)."""
  d = c.distributed
  if not d.initialize:
    return
  kwargs = {}
  if d.coordinator_address:
    kwargs["coordinator_address"] = d.coordinator_address
  if d.num_processes > 0:
    kwargs["num_processes"] = d.num_processes
  if d.process_id >= 0:
    kwargs["process_id"] = d.process_id
  jax.distributed.initialize(**kwargs)


# 3. The mesh -------------------------------------------------------------------------------

def make_mesh(c, devices=None):
  """config.mesh over `devices` (default: all; a TPU slice's for the AOT report), checked
  against the batch size."""
  mesh = sharding.make_mesh({"data": c.mesh.data, "fsdp": c.mesh.fsdp, "tensor": c.mesh.tensor},
                            devices=devices)
  batch_ways = mesh.shape["data"] * mesh.shape["fsdp"]
  if c.data.batch_size % batch_ways:
    raise ValueError(f"config.data.batch_size {c.data.batch_size} is not divisible by the "
                     f"mesh's data x fsdp = {batch_ways} batch shards")
  return mesh


# 4. The tokenizer ---------------------------------------------------------------------------

def load_tokenizer(c, workdir: str):
  """The tokenizer from config.tokenizer.path or model.hf_path; else the tiny BPE built (once)
  under <workdir>/base_tokenizer."""
  path = c.tokenizer.path or c.model.hf_path
  if path:
    return AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
  out = os.path.join(workdir, "base_tokenizer")
  saved = os.path.join(out, "tokenizer.json")

  def read():
    if not os.path.isfile(saved):
      raise FileNotFoundError(f"no tokenizer at {out}: process 0 builds it, so the workdir "
                              "must be storage every process sees")
    return AutoTokenizer.from_pretrained(out, local_files_only=True)
  return multihost.process_0_first("base_tokenizer",
                         lambda: read() if os.path.isfile(saved) else build_tokenizer(out), read)


# 5. The model (functional tokens added) ------------------------------------------------------

def runtime_options(c, platform: str) -> dict:
  """The ModelConfig fields config.model sets on top of the architecture (from_size's
  keyword arguments), for devices of `platform` ("tpu", "gpu", "cpu": what "auto"
  attention resolves by)."""
  return dict(dtype=c.model.dtype, remat=c.model.remat,
              attention_chunk=c.model.attention_chunk,
              attention_impl=attention.for_platform(c.model.get("attention_impl", "xla"),
                                                    platform))


def load_model(c, tokenizer, mesh):
  """(ModelConfig, params sharded over `mesh`, TokenTable), functional tokens added.

  Every path is born sharded: a Hugging Face directory is read as the blocks each
  process's devices hold (`load_hf_sharded`), a fresh init is jitted with out_shardings,
  and the vocabulary grows on the sharded arrays; the final device_put moves nothing
  unless the grown vocabulary changed a sharding."""
  runtime = runtime_options(c, mesh.devices.flat[0].platform)
  if c.model.init_checkpoint:
    return _load_checkpoint_model(c, tokenizer, mesh, runtime)
  if c.model.hf_path:
    image_id = functional_tokens.token_id(tokenizer, "<|image_pad|>")
    expected = model_config_lib.from_hf_dir(c.model.hf_path).image_token_id
    if image_id != expected:  # before any tensor is read
      raise ValueError(f"tokenizer's <|image_pad|> id {image_id} differs from config.json's "
                       f"image_token_id {expected}")
    config, params = load_hf_sharded(c.model.hf_path, mesh, runtime)
  else:
    config = functional_tokens.fit_to_tokenizer(from_size(c.model.size, **runtime), tokenizer)
    shardings = param_shardings(mesh, config)
    params = jax.jit(lambda: init_params(config, jax.random.key(c.seed)),
                     out_shardings=shardings)()
  params, config, table = functional_tokens.extend_vocab(
      tokenizer, params, config, tuple(c.functional_tokens.tokens), c.functional_tokens.init)
  params = jax.device_put(params, param_shardings(mesh, config))
  return config, params, table


def load_hf_sharded(path: str, mesh, runtime: dict, dtype="float32"):
  """(ModelConfig, params) of a Hugging Face directory, born sharded over `mesh`: the
  shardings come from config.json (read alone) before any tensor is, and each process
  reads only its devices' blocks (`hf.load`). `runtime`: `runtime_options`."""
  config = model_config_lib.from_hf_dir(path, **runtime)
  compute = {("compute_dtype" if k == "dtype" else k): v for k, v in runtime.items()}
  return hf.load(path, dtype, shardings=param_shardings(mesh, config), **compute)


def _load_checkpoint_model(c, tokenizer, mesh, runtime):
  """Params (only) from an atlas_jax checkpoint, e.g. RL from SFT; the tokenizer must be the
  one that run saved (same functional-token ids)."""
  extra = checkpoint_lib.read_extra(c.model.init_checkpoint, None)
  config = dataclasses.replace(model_config_lib.from_dict(extra["model_config"]), **runtime)
  table = functional_tokens.TokenTable.from_json(extra["functional_tokens"])
  for token, tid in table.ids.items():
    if tokenizer.convert_tokens_to_ids(token) != tid:
      raise ValueError(f"config.tokenizer maps {token} to "
                       f"{tokenizer.convert_tokens_to_ids(token)}, but checkpoint "
                       f"{c.model.init_checkpoint} was trained with id {tid}; use the tokenizer "
                       "saved with that run")
  shardings = param_shardings(mesh, config)
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          abstract_params(config), shardings)
  params = checkpoint_lib.restore_params_only(c.model.init_checkpoint, None, abstract)
  return config, params, table


# 6. The data --------------------------------------------------------------------------------

def prepare_data(c, workdir: str):
  """Builds (once) the TFDS dataset from the configured data files (any `formats.FORMATS`),
  or from a generated synthetic suite; a later run whose sources or data options changed
  rebuilds it or stops (config.data.on_source_change). Returns the build report dict
  (`tfds_builder.build_dataset`). In multi-host runs process 0 builds it and the others
  read it."""
  root = c.data.dataset_dir or os.path.join(workdir, "data")
  data_dir = os.path.join(root, "tfds")

  def build():
    splits = {}
    if c.data.train_jsonl:
      splits["train"] = c.data.train_jsonl
      if c.data.test_jsonl:
        splits["test"] = c.data.test_jsonl
    else:
      raw = os.path.join(root, "synthetic")
      splits["train"] = synthetic.generate_suite(
          raw, n_per_family=c.data.synthetic_per_family, seed=c.data.synthetic_seed,
          split="train")
      splits["test"] = synthetic.generate_suite(
          raw, n_per_family=c.data.synthetic_test_per_family, seed=c.data.synthetic_seed + 1,
          split="test")
    options = tfds_builder.BuildOptions(
        format=c.data.format if c.data.train_jsonl else "atlas", image_root=c.data.image_root,
        min_pixels=c.data.min_pixels, max_pixels=c.data.max_pixels,
        max_images=c.data.max_images, max_patches=c.data.max_patches,
        allowed_tokens=tuple(c.functional_tokens.tokens))
    return tfds_builder.build_dataset(splits=splits, data_dir=data_dir, options=options,
                                      on_source_change=c.data.on_source_change)
  return multihost.process_0_first("prepare_data", build,
                         lambda: tfds_builder.build_dataset(splits={}, data_dir=data_dir,
                                                            build=False))


def prompt_suffix_report(setting: str, report: dict) -> str:
  """What config.data.prompt_suffix does to the built splits, in one line."""
  if setting != chat.AUTO_SUFFIX:
    return f"{setting!r} appended to every record's last user turn"
  parts = []
  for split, kinds in sorted(report.get("answers", {}).items()):
    boxed = kinds.get("boxed", 0) + kinds.get("none", 0)
    parts.append(f"{split}: {boxed} of {boxed + kinds.get('unboxed', 0)} records get the "
                 f"boxed suffix ({kinds.get('boxed', 0)} boxed answers, {kinds.get('none', 0)} "
                 f"prompts without one; {kinds.get('unboxed', 0)} unboxed answers get none)")
  return "'auto': " + ("; ".join(parts) or "decided per record by its answer")


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


# 7. Everything a loop starts with ----------------------------------------------------------

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
  config_lib.validate(c)
  maybe_initialize_distributed(c)
  mesh = make_mesh(c)
  tokenizer = load_tokenizer(c, workdir)
  model_config, params, table = load_model(c, tokenizer, mesh)
  if jax.process_index() == 0:
    tokenizer.save_pretrained(os.path.join(workdir, "tokenizer"))
  report = prepare_data(c, workdir)
  writer = metrics_lib.MetricWriter(workdir, total_steps)
  writer.text(0, "data", str(report), console=False)  # the build printed its own line
  writer.text(0, "prompt_suffix", prompt_suffix_report(c.data.prompt_suffix, report))
  ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                                     save_every=c.checkpoint.every, keep=c.checkpoint.keep,
                                     async_save=c.checkpoint.async_save)
  return Run(c, workdir, mesh, tokenizer, model_config, table, report, writer, ckpt), params


# 8. The optimizer and the sharded state ----------------------------------------------------

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
  param_sh = param_shardings(mesh, model_config)
  create = functools.partial(TrainState.create, optimizer=optimizer, seed=seed)
  shapes = jax.eval_shape(create, params)
  return shapes, sharding.state_shardings(mesh, shapes, param_sh)


def create_state(run: Run, params, optimizer):
  """A TrainState born sharded (params are donated), and its shardings."""
  _, state_sh = abstract_state(run.mesh, run.model_config, optimizer, params, run.config.seed)
  create = functools.partial(TrainState.create, optimizer=optimizer, seed=run.config.seed)
  state = jax.jit(create, out_shardings=state_sh, donate_argnums=0)(params)
  return state, state_sh


# 9. Restore -------------------------------------------------------------------------------

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
  """Restores state and iterator from the newest checkpoint that verifies, if any: damaged
  newer steps are skipped (said, and moved aside to <step>.damaged); when none restores it
  stops naming the directory. Returns the state."""
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          state, state_sh)
  optim = resolve_optim(run.config)

  def check(step, extra):  # before the state is read
    _check_optimizer(step, extra.get("optimizer"), optim)
    tokens = extra.get("functional_tokens")
    if tokens != run.table.to_json():
      raise ValueError(f"checkpoint at step {step} has functional tokens {tokens}; this run "
                       f"assigns {run.table.to_json()}")

  restored = run.checkpointer.restore_latest(abstract, check=check)
  if restored is None:
    return state
  for step, why in restored.skipped:
    run.writer.text(restored.step, "resume_skipped", f"skipped damaged checkpoint step {step} "
                    f"in {run.checkpointer.directory} ({why}); moved aside, not deleted")
  if restored.data_state is not None:
    iterator.set_state(restored.data_state)
  run.writer.text(restored.step, "resume", f"restored step {restored.step} from "
                  f"{run.checkpointer.directory}")
  return restored.state


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


