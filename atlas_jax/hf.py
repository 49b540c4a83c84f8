"""Hugging Face Qwen2.5-VL checkpoints <-> atlas_jax parameter pytrees.

Conversion is one table (`param_table`): each row names an atlas_jax leaf, the Hugging Face
key in the published layout (`model.*`, `visual.*`, `lm_head.weight`; `{l}` marks a
per-layer key whose tensors stack on the leaf's leading `layers` axis) and how the tensor
changes shape. Import reads the table one way; export reads it the other way.

Import is born sharded: each process reads, tensor by tensor, only the rows and columns of
the safetensors data that its own devices hold, converts them and places them
(`jax.make_array_from_single_device_arrays`), so no device holds more than its shard and no
process more than its devices' shards plus one layer's slice in flight. Export gathers one
(per-layer) tensor at a time. Nothing is ever unpickled.
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


_CHUNK_BYTES = 8 * 2**20


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

  def dtype(self, key: str) -> np.dtype:
    file, meta, _ = self.entries[key]
    if meta["dtype"] not in _ST_DTYPES:
      raise ValueError(f"{key} in {file} has dtype {meta['dtype']}; expected one of "
                       f"{sorted(_ST_DTYPES)}")
    return np.dtype(_ST_DTYPES[meta["dtype"]])

  def check(self, key: str) -> None:
    """A known dtype, and data the header's shape fills, inside the file (a truncated or
    inconsistent file stops here, before any tensor is read)."""
    file, meta, base = self.entries[key]
    start, end = meta["data_offsets"]
    want = int(np.prod(meta["shape"])) * self.dtype(key).itemsize
    if end - start != want or base + end > os.path.getsize(file):
      raise ValueError(f"{file}: tensor {key!r} ({meta['dtype']} {meta['shape']}) needs "
                       f"{want} bytes at offsets {start}..{end} of a {os.path.getsize(file)}"
                       "-byte file; the file is truncated or its header inconsistent")

  def get(self, key: str) -> np.ndarray:
    """The whole tensor, memory-mapped (read lazily; export tests and tools)."""
    file, meta, base = self.entries[key]
    dtype = self.dtype(key)
    start, end = meta["data_offsets"]
    data = np.memmap(file, dtype=np.uint8, mode="r", offset=base + start, shape=(end - start,))
    return data.view(dtype).reshape(meta["shape"])

  def read(self, key: str, rows: slice, cols: slice | None = None, dtype=None,
           chunk_bytes: int = _CHUNK_BYTES) -> np.ndarray:
    """rows x cols of the tensor seen as a matrix [shape[0], prod(shape[1:])] (a 1-D tensor:
    `rows` of it, `cols` None), converted to `dtype` (default: the file's).

    Read with plain file reads, `chunk_bytes` of whole rows at a time, so host memory
    holds the block asked for plus one chunk: nothing is memory-mapped (mapped pages would
    count against the process) and no other part of the tensor is kept.
    """
    file, meta, base = self.entries[key]
    src = self.dtype(key)
    dtype = src if dtype is None else np.dtype(dtype)
    shape = meta["shape"]
    width = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    r0, r1, _ = rows.indices(shape[0])
    c0, c1 = (0, width) if cols is None else cols.indices(width)[:2]
    out = np.empty((r1 - r0, c1 - c0) if len(shape) > 1 else (r1 - r0,), dtype)
    row_bytes = width * src.itemsize
    step = max(1, chunk_bytes // max(row_bytes, 1))
    offset = base + meta["data_offsets"][0]
    with open(file, "rb", buffering=0) as f:
      for r in range(r0, r1, step):
        n = min(step, r1 - r)
        buf = np.empty(n * row_bytes, np.uint8)
        f.seek(offset + r * row_bytes)
        if f.readinto(memoryview(buf)) != buf.nbytes:
          raise ValueError(f"{file} ends inside tensor {key!r}; the file is truncated")
        block = buf.view(src)
        if len(shape) > 1:
          out[r - r0:r - r0 + n] = block.reshape(n, width)[:, c0:c1]
        else:
          out[r - r0:r - r0 + n] = block
    return out


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


def _group(dims, bounds) -> tuple[slice, tuple[int, ...], tuple[slice, ...]]:
  """Dims `dims` flattened row-major into one (an HF axis) and our `bounds` [(start, stop)]
  on them -> (the flat range to read: whole rows of the first dim, the read block's dims,
  the slices that cut it down to `bounds`)."""
  inner = int(np.prod(dims[1:]))
  (a, b), rest = bounds[0], bounds[1:]
  return (slice(a * inner, b * inner), (b - a,) + tuple(dims[1:]),
          (slice(None),) + tuple(slice(lo, hi) for lo, hi in rest))


def read_slice(reader: SafetensorsDir, key: str, rule: Rule, shape: tuple[int, ...], bounds,
               dtype) -> np.ndarray:
  """Our (per-layer) tensor of `shape`, cut to `bounds` [(start, stop) per dim], read from HF
  tensor `key` as only the rows (and columns) it needs, converted to `dtype`."""
  if rule.kind == "copy":
    if len(shape) == 1:
      return reader.read(key, slice(*bounds[0]), dtype=dtype)
    return reader.read(key, slice(*bounds[0]), slice(*bounds[1]), dtype=dtype)
  if rule.kind == "flat":  # HF [N*H] -> ours [N, H]
    rows, dims, cut = _group(shape, bounds)
    return reader.read(key, rows, dtype=dtype).reshape(dims)[cut]
  if rule.kind == "conv":  # HF [D, C, T, p, p] as [D, K] -> ours [K, D]
    return reader.read(key, slice(*bounds[1]), slice(*bounds[0]), dtype=dtype).T
  if rule.kind == "linear":  # HF [prod(out), prod(in)] -> ours [*in, *out]
    n = rule.in_dims
    rows, out_dims, out_cut = _group(shape[n:], bounds[n:])
    cols, in_dims, in_cut = _group(shape[:n], bounds[:n])
    block = reader.read(key, rows, cols, dtype=dtype).T
    return block.reshape(in_dims + out_dims)[in_cut + out_cut]
  raise ValueError(f"unknown rule kind {rule.kind!r}")


def _bounds(index, shape) -> tuple[tuple[int, int], ...]:
  return tuple(s.indices(n)[:2] for s, n in zip(index, shape))


def _read_shard(reader, keys: list[str], rule: Rule, shape, bounds, dtype) -> np.ndarray:
  """The block `bounds` of leaf `shape`: a stacked leaf is filled one layer's slice at a
  time, so no more than the block and one layer's slice are in host memory."""
  if not rule.per_layer:
    return np.ascontiguousarray(read_slice(reader, keys[0], rule, shape, bounds, dtype))
  (l0, l1), inner = bounds[0], bounds[1:]
  out = np.empty(tuple(b - a for a, b in bounds), dtype)
  for i, l in enumerate(range(l0, l1)):
    out[i] = read_slice(reader, keys[l], rule, shape[1:], inner, dtype)
  return out


def _place(reader, keys: list[str], rule: Rule, shape, dtype, sharding) -> jax.Array:
  """One leaf as a global jax.Array with `sharding`, built from the blocks this process's
  devices hold; a block that several local devices hold (replication) is read once."""
  by_block: dict[tuple, list] = {}
  for device, index in sharding.addressable_devices_indices_map(shape).items():
    by_block.setdefault(_bounds(index, shape), []).append(device)
  arrays = []
  for bounds, devices in by_block.items():
    block = _read_shard(reader, keys, rule, shape, bounds, dtype)
    arrays += jax.device_put([block] * len(devices), devices)
    del block
  return jax.make_array_from_single_device_arrays(shape, sharding, arrays)


def load(path: str, dtype=jnp.float32, *, shardings=None, **runtime):
  """Loads a local Hugging Face Qwen2.5-VL directory, born sharded.

  Each process reads, for each leaf, only the blocks its own devices hold (rows and columns
  of the safetensors data, with plain file reads), converts them to `dtype` block by block
  and places them; a stacked leaf (one weight of every layer) is filled one layer's slice
  at a time. A process holds at most its devices' shards plus one layer's slice in flight;
  nothing is gathered or built whole.

  Args:
    path: directory with config.json and model.safetensors (or a sharded index), in the
      published layout or transformers 5's.
    dtype: dtype of the returned parameters (master weights; fp32 by default).
    shardings: pytree of `jax.sharding.Sharding` matching the params (e.g.
      `model.param_shardings(mesh, config_lib.from_hf_dir(path))`); None: every leaf on
      the default device.
    runtime: ModelConfig run-time fields (`dtype` of compute as `compute_dtype`, `remat`).
  Returns:
    (ModelConfig, params pytree of jax.Arrays).
  Raises:
    ValueError naming the key for a missing, unexpected or mis-shaped tensor (or an
    unsupported dtype), before any tensor is read.
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
    reader.check(keys[key])

  np_dtype = np.dtype(dtype)
  default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  params: dict = {}
  for rule in table:
    shape = _get(abstract, rule.path).shape
    sharding = _get(shardings, rule.path) if shardings is not None else default
    names = [keys[k] for k in _expand(rule, _num_layers(config, rule))]
    _set(params, rule.path, _place(reader, names, rule, shape, np_dtype, sharding))
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
  """One tensor to host memory; gathers across processes when it is not fully local, in
  as many row blocks as the process has devices: the gather replicates what it gathers on
  every device, so a process holds about one more copy of the tensor on its devices, not
  one per device."""
  if not isinstance(x, jax.Array) or x.is_fully_addressable:
    return np.asarray(jax.device_get(x))
  from jax.experimental import multihost_utils
  gather = lambda y: np.asarray(multihost_utils.process_allgather(y, tiled=True))
  rows = x.shape[0] if x.ndim else 1
  step = -(-rows // jax.local_device_count())
  if step >= rows:
    return gather(x)
  return np.concatenate([gather(x[i:i + step]) for i in range(0, rows, step)])


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


def largest_tensor(config: config_lib.ModelConfig) -> int:
  """Elements of the largest tensor `iter_hf_tensors` gathers whole (of a per-layer leaf,
  one layer's slice): what an export holds in flight beside the params' shards."""
  abstract = vlm.abstract_params(config)
  return max(int(np.prod(_get(abstract, r.path).shape[1 if r.per_layer else 0:]))
             for r in param_table(config))


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
  config. Params may be sharded over a mesh: they are gathered one (per-layer) tensor at a
  time, so beside its devices' shards a process holds at most one whole per-layer tensor
  (the largest is the embedding or LM head, [V, D]) and its converted copy in `dtype`;
  process 0 also holds the safetensors shard it is filling, up to `max_shard_size`. In a
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
