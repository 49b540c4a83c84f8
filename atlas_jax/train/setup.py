"""What every recipe does before its first step: validate the config, start multi-host JAX,
build the mesh, load the tokenizer and the model (with the functional tokens added), and
build the datasets. Each function is usable on its own from a notebook.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np
from jax.experimental import multihost_utils

from atlas_jax import functional_tokens, hf, sharding
from atlas_jax.model import SIZES, ModelConfig, from_size, init_params
from atlas_jax.model import attention

RECIPES = ("sft", "rl", "demo")


def validate_config(c) -> None:
  """Stops before any work with one sentence naming the bad field and what was expected."""
  if c.recipe not in RECIPES:
    raise ValueError(f"config.recipe {c.recipe!r} is not one of {RECIPES}")
  if not c.model.hf_path and c.model.size not in SIZES:
    raise ValueError(f"config.model.size {c.model.size!r} is not one of {sorted(SIZES)} "
                     "(or set config.model.hf_path)")
  if c.model.hf_path and not os.path.isdir(c.model.hf_path):
    raise ValueError(f"config.model.hf_path {c.model.hf_path!r} is not a directory")
  for name in ("train_jsonl", "test_jsonl"):
    path = c.data[name]
    if path and not os.path.isfile(path):
      raise ValueError(f"config.data.{name} {path!r} does not exist")
  from atlas_jax.data import formats, tfds_builder
  if c.data.format not in formats.FORMATS:
    raise ValueError(f"config.data.format {c.data.format!r} is not one of {formats.FORMATS}")
  if c.data.on_source_change not in tfds_builder.ON_SOURCE_CHANGE:
    raise ValueError(f"config.data.on_source_change {c.data.on_source_change!r} is not one of "
                     f"{tfds_builder.ON_SOURCE_CHANGE}")
  if c.data.image_root and not os.path.isdir(c.data.image_root):
    raise ValueError(f"config.data.image_root {c.data.image_root!r} is not a directory")
  buckets = tuple(c.data.length_buckets)
  if not buckets or list(buckets) != sorted(set(buckets)) or buckets[-1] > c.data.max_length:
    raise ValueError(f"config.data.length_buckets {buckets} must be strictly increasing and end "
                     f"at or below data.max_length {c.data.max_length}")
  chunk = c.train.logprob_chunk
  if any(b % min(chunk, b) for b in buckets):
    raise ValueError(f"config.train.logprob_chunk {chunk} must divide every length bucket "
                     f"{buckets}")
  impl = c.model.get("attention_impl", "xla")
  if impl not in attention.CHOICES:
    raise ValueError(f"config.model.attention_impl {impl!r} is not one of {attention.CHOICES}")
  if c.data.max_patches % 4:
    raise ValueError(f"config.data.max_patches {c.data.max_patches} must be a multiple of 4")
  if c.data.max_pixels // 196 > c.data.max_patches * max(c.data.max_images, 1):
    raise ValueError(f"config.data.max_patches {c.data.max_patches} cannot hold an image of "
                     f"data.max_pixels {c.data.max_pixels} ({c.data.max_pixels // 196} patches)")
  tokens = tuple(c.functional_tokens.tokens)
  if len(set(tokens)) != len(tokens) or not all(t.startswith("<|") for t in tokens):
    raise ValueError(f"config.functional_tokens.tokens {tokens} must be distinct <|...|> "
                     "strings")
  if c.functional_tokens.init not in functional_tokens.INIT_MODES:
    raise ValueError(f"config.functional_tokens.init {c.functional_tokens.init!r} is not one "
                     f"of {functional_tokens.INIT_MODES}")
  if c.optim.grad_accum < 1 or c.train.steps < 1 or c.data.batch_size < 1:
    raise ValueError("config.optim.grad_accum, train.steps and data.batch_size must be >= 1")
  _validate_optim_groups(c.optim)
  rl = c.rl
  if c.recipe == "rl":
    if rl.max_new_tokens % min(chunk, rl.max_new_tokens):
      raise ValueError(f"config.rl.max_new_tokens {rl.max_new_tokens} must be a multiple of "
                       f"train.logprob_chunk {chunk}")
    if rl.group_size < 2:
      raise ValueError(f"config.rl.group_size {rl.group_size} must be >= 2 (advantages are "
                       "relative to the group)")
    from atlas_jax.rl import grpo
    for field, allowed in (("kl_estimator", grpo.KL_ESTIMATORS), ("anchor", grpo.ANCHORS),
                           ("loss_agg", grpo.AGGREGATIONS), ("adv_std", grpo.ADV_STDS),
                           ("importance_level", grpo.IMPORTANCE_LEVELS)):
      if rl[field] not in allowed:
        raise ValueError(f"config.rl.{field} {rl[field]!r} is not one of {allowed}")
    if rl.clip_ratio_c != 0 and rl.clip_ratio_c <= 1:
      raise ValueError(f"config.rl.clip_ratio_c {rl.clip_ratio_c} must be > 1 (the dual-clip "
                       "bound) or 0 (off)")
    if rl.log_ratio_clamp < 0:
      raise ValueError(f"config.rl.log_ratio_clamp {rl.log_ratio_clamp} must be >= 0 (0: off)")
    if rl.dynamic_sampling_max_draws < 1:
      raise ValueError(f"config.rl.dynamic_sampling_max_draws {rl.dynamic_sampling_max_draws} "
                       "must be >= 1")
    if not 0 <= rl.overlong_buffer <= rl.max_new_tokens:
      raise ValueError(f"config.rl.overlong_buffer {rl.overlong_buffer} must be in "
                       f"[0, rl.max_new_tokens {rl.max_new_tokens}]")
    if rl.overlong_penalty < 0:
      raise ValueError(f"config.rl.overlong_penalty {rl.overlong_penalty} must be >= 0")
    per_rollout = rl.inner_updates * c.optim.grad_accum  # optimizer micro-steps per rollout
    if c.train.steps % per_rollout:
      raise ValueError(f"config.train.steps {c.train.steps} must be a multiple of "
                       f"rl.inner_updates x optim.grad_accum = {per_rollout}")
  if c.model.dtype not in ("float32", "bfloat16", "float16"):
    raise ValueError(f"config.model.dtype {c.model.dtype!r} is not float32/bfloat16/float16")


def _validate_optim_groups(optim) -> None:
  from atlas_jax.train import optimizer as optimizer_lib
  for name in optimizer_lib.GROUPS:
    group = optim[name]
    if not isinstance(group.trainable, bool):
      raise ValueError(f"config.optim.{name}.trainable {group.trainable!r} must be True or "
                       "False")
    scale = group.lr_scale
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 <= scale < 1e6:
      raise ValueError(f"config.optim.{name}.lr_scale {scale!r} must be a number >= 0 (a "
                       "multiple of optim.lr)")
  if not any(optim[name].trainable for name in optimizer_lib.GROUPS):
    raise ValueError("config.optim.vision, merger and llm all have trainable=False: nothing "
                     "would train")
  if optim.moments_dtype not in optimizer_lib.MOMENTS_DTYPES:
    raise ValueError(f"config.optim.moments_dtype {optim.moments_dtype!r} is not one of "
                     f"{optimizer_lib.MOMENTS_DTYPES}")


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


def process_0_first(name: str, build, read):
  """`build()` on process 0 while the others wait at a barrier, then `read()` on the others:
  files a run makes once (tokenizer, dataset) are written by one process into the shared
  workdir, never by several at once. Every process must call it (it holds a barrier), so
  whether there is anything to build is `build`'s decision. One process: just `build()`."""
  if jax.process_count() == 1:
    return build()
  out = build() if jax.process_index() == 0 else None
  multihost_utils.sync_global_devices(f"atlas_jax:{name}")
  return out if jax.process_index() == 0 else read()


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


def load_tokenizer(c, workdir: str):
  """The tokenizer from config.tokenizer.path or model.hf_path; else the tiny BPE built (once)
  under <workdir>/base_tokenizer."""
  from transformers import AutoTokenizer
  path = c.tokenizer.path or c.model.hf_path
  if path:
    return AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
  from atlas_jax.data.tokenizer import build_tokenizer
  out = os.path.join(workdir, "base_tokenizer")
  saved = os.path.join(out, "tokenizer.json")

  def read():
    if not os.path.isfile(saved):
      raise FileNotFoundError(f"no tokenizer at {out}: process 0 builds it, so the workdir "
                              "must be storage every process sees")
    return AutoTokenizer.from_pretrained(out, local_files_only=True)
  return process_0_first("base_tokenizer",
                         lambda: read() if os.path.isfile(saved) else build_tokenizer(out), read)


def runtime_options(c, platform: str) -> dict:
  """The ModelConfig fields config.model sets on top of the architecture (from_size's
  keyword arguments), for devices of `platform` ("tpu", "gpu", "cpu": what "auto"
  attention resolves by)."""
  return dict(dtype=c.model.dtype, remat=c.model.remat,
              attention_chunk=c.model.attention_chunk,
              attention_impl=attention.for_platform(c.model.get("attention_impl", "xla"),
                                                    platform))


def load_model(c, tokenizer, mesh):
  """(ModelConfig, params sharded over `mesh`, TokenTable), functional tokens added."""
  runtime = runtime_options(c, mesh.devices.flat[0].platform)
  if c.model.init_checkpoint:
    return _load_checkpoint_model(c, tokenizer, mesh, runtime)
  if c.model.hf_path:
    config, params = hf.load(c.model.hf_path, compute_dtype=c.model.dtype, remat=c.model.remat)
    config = config.replace(attention_chunk=c.model.attention_chunk,
                            attention_impl=runtime["attention_impl"])
    image_id = functional_tokens.token_id(tokenizer, "<|image_pad|>")
    if image_id != config.image_token_id:
      raise ValueError(f"tokenizer's <|image_pad|> id {image_id} differs from config.json's "
                       f"image_token_id {config.image_token_id}")
  else:
    config = functional_tokens.fit_to_tokenizer(from_size(c.model.size, **runtime), tokenizer)
    shardings = sharding.param_shardings(mesh, config)
    params = jax.jit(lambda: init_params(config, jax.random.key(c.seed)),
                     out_shardings=shardings)()
  params, config, table = functional_tokens.extend_vocab(
      tokenizer, params, config, tuple(c.functional_tokens.tokens), c.functional_tokens.init)
  params = jax.device_put(params, sharding.param_shardings(mesh, config))
  return config, params, table


def _load_checkpoint_model(c, tokenizer, mesh, runtime):
  """Params (only) from an atlas_jax checkpoint, e.g. RL from SFT; the tokenizer must be the
  one that run saved (same functional-token ids)."""
  from atlas_jax import checkpoint as checkpoint_lib
  from atlas_jax.model import abstract_params
  from atlas_jax.model import config as config_lib
  extra = checkpoint_lib.read_extra(c.model.init_checkpoint, None)
  config = dataclasses.replace(config_lib.from_dict(extra["model_config"]), **runtime)
  table = functional_tokens.TokenTable.from_json(extra["functional_tokens"])
  for token, tid in table.ids.items():
    if tokenizer.convert_tokens_to_ids(token) != tid:
      raise ValueError(f"config.tokenizer maps {token} to "
                       f"{tokenizer.convert_tokens_to_ids(token)}, but checkpoint "
                       f"{c.model.init_checkpoint} was trained with id {tid}; use the tokenizer "
                       "saved with that run")
  shardings = sharding.param_shardings(mesh, config)
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          abstract_params(config), shardings)
  params = checkpoint_lib.restore_params_only(c.model.init_checkpoint, None, abstract)
  return config, params, table


def prepare_data(c, workdir: str):
  """Builds (once) the TFDS dataset from the configured data files (any `formats.FORMATS`),
  or from a generated synthetic suite; a later run whose sources or data options changed
  rebuilds it or stops (config.data.on_source_change). Returns the build report dict
  (`tfds_builder.build_dataset`). In multi-host runs process 0 builds it and the others
  read it."""
  from atlas_jax.data import synthetic, tfds_builder
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
  return process_0_first("prepare_data", build,
                         lambda: tfds_builder.build_dataset(splits={}, data_dir=data_dir,
                                                            build=False))


def host_batch_to_device(batch: dict, mesh) -> dict:
  """Process-local numpy batch -> global arrays sharded over the batch axes. Host-only
  fields (strings) stay behind."""
  out = {}
  for k, v in batch.items():
    if isinstance(v, np.ndarray) and v.dtype != object:
      out[k] = jax.make_array_from_process_local_data(sharding.batch_sharding(mesh, v.ndim), v)
  return out
