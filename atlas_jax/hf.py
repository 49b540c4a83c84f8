"""Hugging Face Qwen2.5-VL checkpoints <-> atlas_jax parameter pytrees.

Conversion is one table (`param_table`): each row names an atlas_jax leaf, the Hugging Face
key in the published layout (`model.*`, `visual.*`, `lm_head.weight`; `{l}` marks a
per-layer key whose tensors stack on the leaf's leading `layers` axis) and how the tensor
changes shape. Import reads the table one way; export reads it the other way.

Tensors are read one at a time from memory-mapped safetensors files, converted, placed on
device (sharded, when shardings are given) and dropped, so host memory never holds a second
copy of the model. Nothing is ever unpickled.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from atlas_jax.model import config as config_lib
from atlas_jax.model import vlm

# ---------------------------------------------------------------------------------------
# The table


@dataclasses.dataclass(frozen=True)
class Rule:
  """One atlas_jax leaf <-> one HF key (or L keys, one per layer).

  kind: "copy" (same shape), "flat" (HF keeps it flat: biases [N*H] <-> [N, H]),
  "linear" (HF [out, in] <-> ours [*in, *out], the first `in_dims` dims are the input),
  "conv" (HF Conv3d [D, C, T, p, p] <-> ours [C*T*p*p, D]).
  """

  path: tuple[str, ...]
  hf_key: str
  kind: str
  in_dims: int = 1

  @property
  def per_layer(self) -> bool:
    return "{l}" in self.hf_key


def param_table(config: config_lib.ModelConfig) -> list[Rule]:
  """The conversion table for this config (lm_head only when embeddings are untied)."""
  vis = [
      (("patch_embed", "kernel"), "patch_embed.proj.weight", "conv", 1),
      (("blocks", "norm1", "scale"), "blocks.{l}.norm1.weight", "copy", 1),
      (("blocks", "norm2", "scale"), "blocks.{l}.norm2.weight", "copy", 1),
      (("blocks", "qkv", "kernel"), "blocks.{l}.attn.qkv.weight", "linear", 1),
      (("blocks", "qkv", "bias"), "blocks.{l}.attn.qkv.bias", "flat", 1),
      (("blocks", "out", "kernel"), "blocks.{l}.attn.proj.weight", "linear", 2),
      (("blocks", "out", "bias"), "blocks.{l}.attn.proj.bias", "copy", 1),
      (("merger_norm", "scale"), "merger.ln_q.weight", "copy", 1),
      (("merger_fc1", "kernel"), "merger.mlp.0.weight", "linear", 1),
      (("merger_fc1", "bias"), "merger.mlp.0.bias", "copy", 1),
      (("merger_fc2", "kernel"), "merger.mlp.2.weight", "linear", 1),
      (("merger_fc2", "bias"), "merger.mlp.2.bias", "copy", 1),
  ]
  for proj in ("gate", "up", "down"):
    vis += [(("blocks", "mlp", proj, "kernel"), f"blocks.{{l}}.mlp.{proj}_proj.weight",
             "linear", 1),
            (("blocks", "mlp", proj, "bias"), f"blocks.{{l}}.mlp.{proj}_proj.bias", "copy", 1)]
  text = [
      (("embed", "embedding"), "model.embed_tokens.weight", "copy", 1),
      (("decoder", "final_norm", "scale"), "model.norm.weight", "copy", 1),
      (("decoder", "layers", "input_norm", "scale"), "model.layers.{l}.input_layernorm.weight",
       "copy", 1),
      (("decoder", "layers", "post_attn_norm", "scale"),
       "model.layers.{l}.post_attention_layernorm.weight", "copy", 1),
      (("decoder", "layers", "o", "kernel"), "model.layers.{l}.self_attn.o_proj.weight",
       "linear", 2),
  ]
  for proj in ("q", "k", "v"):
    text += [(("decoder", "layers", proj, "kernel"),
              f"model.layers.{{l}}.self_attn.{proj}_proj.weight", "linear", 1),
             (("decoder", "layers", proj, "bias"),
              f"model.layers.{{l}}.self_attn.{proj}_proj.bias", "flat", 1)]
  for proj in ("gate", "up", "down"):
    text.append((("decoder", "layers", "mlp", proj, "kernel"),
                 f"model.layers.{{l}}.mlp.{proj}_proj.weight", "linear", 1))
  if not config.text.tie_word_embeddings:
    text.append((("lm_head", "kernel"), "lm_head.weight", "linear", 1))
  rules = [Rule(("visual",) + p, "visual." + k, kind, n) for p, k, kind, n in vis]
  return rules + [Rule(p, k, kind, n) for p, k, kind, n in text]


def hf_shape(rule: Rule, shape: tuple[int, ...]) -> tuple[int, ...]:
  """The HF tensor shape of one (per-layer) slice of an atlas_jax leaf of `shape`."""
  if rule.kind == "copy":
    return tuple(shape)
  if rule.kind == "flat":
    return (int(np.prod(shape)),)
  if rule.kind == "linear":
    return (int(np.prod(shape[rule.in_dims:])), int(np.prod(shape[:rule.in_dims])))
  if rule.kind == "conv":
    # ours [C*T*p*p, D]; HF [D, C, T, p, p] with C*T*p*p = 3*2*p*p.
    patch = int(round((shape[0] / 6)**0.5))
    return (shape[1], shape[0] // (2 * patch * patch), 2, patch, patch)
  raise ValueError(f"unknown rule kind {rule.kind!r}")


def to_ours(rule: Rule, tensor: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  if rule.kind == "linear":
    return tensor.T.reshape(shape)
  if rule.kind == "conv":
    return tensor.reshape(tensor.shape[0], -1).T
  return tensor.reshape(shape)


def to_hf(rule: Rule, leaf: np.ndarray) -> np.ndarray:
  shape = hf_shape(rule, leaf.shape)
  if rule.kind == "linear":
    return leaf.reshape(shape[::-1]).T
  if rule.kind == "conv":
    return leaf.T.reshape(shape)
  return leaf.reshape(shape)


def _get(tree, path):
  for p in path:
    tree = tree[p]
  return tree


def _set(tree, path, value):
  for p in path[:-1]:
    tree = tree.setdefault(p, {})
  tree[path[-1]] = value


# ---------------------------------------------------------------------------------------
# Reading safetensors

_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
              "BF16": ml_dtypes.bfloat16, "I64": np.int64, "I32": np.int32, "I16": np.int16,
              "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


class SafetensorsDir:
  """Memory-mapped tensors of a HF model directory (single file or sharded with an index).

  The safetensors format is a little-endian u64 header length, a JSON header of
  {name: {dtype, shape, data_offsets}}, then the raw data; mapping it directly keeps every
  dtype (the numpy backend of the safetensors package cannot return bfloat16) and reads no
  tensor until asked.
  """

  def __init__(self, path: str):
    if not os.path.isdir(path):
      raise FileNotFoundError(f"{path} is not a directory; expected a Hugging Face model "
                              "directory with config.json and *.safetensors")
    index = os.path.join(path, "model.safetensors.index.json")
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(index):
      with open(index) as f:
        weight_map = json.load(f)["weight_map"]
      files = sorted(set(weight_map.values()))
    elif os.path.isfile(single):
      files = ["model.safetensors"]
    else:
      raise FileNotFoundError(f"{path} has neither model.safetensors nor "
                              "model.safetensors.index.json (pickled .bin checkpoints are "
                              "not loaded: convert them to safetensors first)")
    self.entries: dict[str, tuple[str, dict[str, Any], int]] = {}
    for name in files:
      file = os.path.join(path, name)
      if not os.path.isfile(file):
        raise FileNotFoundError(f"{file} is listed in the index but does not exist")
      with open(file, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
      header.pop("__metadata__", None)
      for key, meta in header.items():
        self.entries[key] = (file, meta, 8 + n)

  def keys(self) -> list[str]:
    return list(self.entries)

  def shape(self, key: str) -> tuple[int, ...]:
    return tuple(self.entries[key][1]["shape"])

  def get(self, key: str) -> np.ndarray:
    file, meta, base = self.entries[key]
    if meta["dtype"] not in _ST_DTYPES:
      raise ValueError(f"{key} in {file} has dtype {meta['dtype']}; expected one of "
                       f"{sorted(_ST_DTYPES)}")
    start, end = meta["data_offsets"]
    dtype = np.dtype(_ST_DTYPES[meta["dtype"]])
    data = np.memmap(file, dtype=np.uint8, mode="r", offset=base + start, shape=(end - start,))
    return data.view(dtype).reshape(meta["shape"])


def published_key(key: str) -> str:
  """Maps transformers-5 keys (`model.language_model.*`, `model.visual.*`) to the published
  layout (`model.*`, `visual.*`); published keys pass through."""
  if key.startswith("model.language_model."):
    return "model." + key[len("model.language_model."):]
  if key.startswith("model.visual."):
    return key[len("model."):]
  return key


def _expand(rule: Rule, num_layers: int) -> Iterator[str]:
  if rule.per_layer:
    for l in range(num_layers):
      yield rule.hf_key.format(l=l)
  else:
    yield rule.hf_key


def _num_layers(config, rule: Rule) -> int:
  return config.vision.depth if rule.path[0] == "visual" else config.text.num_hidden_layers


# ---------------------------------------------------------------------------------------
# Import


def load(path: str, dtype=jnp.float32, *, shardings=None, **runtime):
  """Loads a local Hugging Face Qwen2.5-VL directory.

  Args:
    path: directory with config.json and model.safetensors (or a sharded index), in the
      published layout or transformers 5's.
    dtype: dtype of the returned parameters (master weights; fp32 by default).
    shardings: optional pytree of `jax.sharding.Sharding` matching the params; each leaf is
      placed with its sharding as soon as it is read.
    runtime: ModelConfig run-time fields (`dtype` of compute as `compute_dtype`, `remat`).
  Returns:
    (ModelConfig, params pytree).
  Raises:
    ValueError naming the key for a missing, unexpected or mis-shaped tensor, before any
    tensor is converted.
  """
  if "compute_dtype" in runtime:
    runtime["dtype"] = runtime.pop("compute_dtype")
  config = config_lib.from_hf_dir(path, **runtime)
  reader = SafetensorsDir(path)
  keys = {published_key(k): k for k in reader.keys()}
  abstract = vlm.abstract_params(config)
  table = param_table(config)

  expected: dict[str, tuple[int, ...]] = {}
  for rule in table:
    leaf_shape = _get(abstract, rule.path).shape
    slice_shape = leaf_shape[1:] if rule.per_layer else leaf_shape
    for key in _expand(rule, _num_layers(config, rule)):
      expected[key] = hf_shape(rule, slice_shape)
  if config.text.tie_word_embeddings:
    keys.pop("lm_head.weight", None)  # some tied checkpoints still store the copy
  missing = sorted(set(expected) - set(keys))
  if missing:
    raise ValueError(f"{path}: checkpoint is missing {len(missing)} tensor(s), first "
                     f"{missing[0]!r} (expected shape {expected[missing[0]]})")
  unexpected = sorted(set(keys) - set(expected))
  if unexpected:
    raise ValueError(f"{path}: checkpoint has {len(unexpected)} unexpected tensor(s), first "
                     f"{keys[unexpected[0]]!r} with shape {reader.shape(keys[unexpected[0]])}")
  for key, shape in expected.items():
    found = reader.shape(keys[key])
    if found != shape:
      raise ValueError(f"{path}: tensor {keys[key]!r} has shape {found}; expected {shape} "
                       "from config.json")

  np_dtype = np.dtype(dtype)
  params: dict = {}
  for rule in table:
    leaf = _get(abstract, rule.path)
    slice_shape = leaf.shape[1:] if rule.per_layer else leaf.shape
    value = np.empty(leaf.shape, np_dtype)
    for i, key in enumerate(_expand(rule, _num_layers(config, rule))):
      part = to_ours(rule, reader.get(keys[key]), slice_shape)
      if rule.per_layer:
        value[i] = part
      else:
        value[...] = part
    sharding = _get(shardings, rule.path) if shardings is not None else None
    _set(params, rule.path, jax.device_put(value, sharding))
    del value
  return config, params


# ---------------------------------------------------------------------------------------
# Export

_SIZE_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(size: int | str) -> int:
  """Bytes from an int or a string like "5GB", "500MB", "100KB"."""
  if isinstance(size, int):
    return size
  s = size.strip().upper()
  for unit in sorted(_SIZE_UNITS, key=len, reverse=True):
    if s.endswith(unit):
      return int(float(s[:-len(unit)]) * _SIZE_UNITS[unit])
  return int(s)


def _to_host(x) -> np.ndarray:
  """One tensor to host memory; gathers across processes when it is not fully local."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils
    x = multihost_utils.process_allgather(x, tiled=True)
  return np.asarray(jax.device_get(x))


def iter_hf_tensors(config: config_lib.ModelConfig, params) -> Iterator[tuple[str, np.ndarray]]:
  """(HF key, tensor) in table order, gathering one (per-layer) tensor at a time."""
  abstract = vlm.abstract_params(config)
  for rule in param_table(config):
    leaf = _get(params, rule.path)
    want = _get(abstract, rule.path).shape
    if tuple(leaf.shape) != tuple(want):
      raise ValueError(f"params leaf {'/'.join(rule.path)} has shape {tuple(leaf.shape)}; the "
                       f"config expects {tuple(want)}")
    if rule.per_layer:
      for l, key in enumerate(_expand(rule, _num_layers(config, rule))):
        yield key, to_hf(rule, _to_host(leaf[l]))
    else:
      yield rule.hf_key, to_hf(rule, _to_host(leaf))


def _write_weights(config, params, path: str, dtype, max_shard_size: int, progress) -> int:
  from safetensors.numpy import save_file
  np_dtype = np.dtype(dtype)
  shards: list[dict[str, np.ndarray]] = [{}]
  written: list[str] = []
  weight_map: dict[str, int] = {}
  total = size = 0

  def flush():
    name = os.path.join(path, f"tmp-shard-{len(written):05d}.safetensors")
    save_file(shards[-1], name, metadata={"format": "pt"})
    written.append(name)
    shards[-1] = {}

  for key, tensor in iter_hf_tensors(config, params):
    tensor = np.ascontiguousarray(tensor.astype(np_dtype))
    if size and size + tensor.nbytes > max_shard_size:
      flush()
      size = 0
    shards[-1][key] = tensor
    weight_map[key] = len(written)
    size += tensor.nbytes
    total += tensor.nbytes
    if progress is not None:
      progress(key)
  flush()
  if len(written) == 1:
    os.replace(written[0], os.path.join(path, "model.safetensors"))
    return total
  names = [f"model-{i + 1:05d}-of-{len(written):05d}.safetensors" for i in range(len(written))]
  for tmp, name in zip(written, names):
    os.replace(tmp, os.path.join(path, name))
  index = {"metadata": {"total_size": total},
           "weight_map": {k: names[i] for k, i in sorted(weight_map.items())}}
  with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
    json.dump(index, f, indent=2)
  return total


def save(config: config_lib.ModelConfig, params, tokenizer, path: str, dtype=jnp.bfloat16,
         max_shard_size: int | str = "5GB", *, image_processor: dict | None = None,
         progress=None) -> None:
  """Writes a Hugging Face Qwen2.5-VL directory that transformers and vLLM load.

  Writes safetensors in the published key layout (sharded with an index above
  `max_shard_size`), config.json (with the current vocab_size), generation_config.json,
  the tokenizer (functional tokens stay normal added tokens) and the image-processor
  config. Params may be sharded over a mesh: they are gathered one tensor at a time. In a
  multi-process run every process must call this (gathers are collective); only process 0
  writes. `progress(key)` is called after each tensor.
  """
  from transformers import GenerationConfig
  from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import \
      Qwen2VLImageProcessorPil

  writer = jax.process_index() == 0
  if writer:
    os.makedirs(path, exist_ok=True)
  np_dtype = np.dtype(dtype)
  if writer:
    _write_weights(config, params, path, np_dtype, parse_size(max_shard_size), progress)
  else:  # take part in the gathers
    for _ in iter_hf_tensors(config, params):
      pass
  if not writer:
    return
  hf_config = config_lib.to_hf_dict(config)
  hf_config["torch_dtype"] = {"bfloat16": "bfloat16", "float32": "float32",
                              "float16": "float16"}[np_dtype.name]
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(hf_config, f, indent=2, sort_keys=True)
  eos = [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
  GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=eos,
                   pad_token_id=tokenizer.pad_token_id, do_sample=False).save_pretrained(path)
  tokenizer.save_pretrained(path)
  Qwen2VLImageProcessorPil(**(image_processor or {})).save_pretrained(path)
