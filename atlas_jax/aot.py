"""Ahead-of-time compilation of a recipe's steps for TPU slices, without TPUs.

libtpu (the `tpu` extra) lets `jax.experimental.topologies` describe a slice such as
"v5e:4x4" on any machine. `compile_recipe(c, topology)` builds, from a recipe config, the
very step functions `launch.train` runs (`sft.update.sft_step_fn`, `rl.update`'s
`old_logps_fn` and `rl_update_fn`, the sampler's jitted prefill and decode), lowers them with abstract, sharded arguments (abstract params, the
recipe's optimizer state, batches shaped by its data config) over the recipe's mesh on
that slice's devices, and compiles them; the executables report their per-chip memory,
FLOPs and bytes accessed. Nothing is allocated.

Steps: an sft recipe has `sft` (one micro-batch: data.batch_size rows of data.max_length;
optim.grad_accum of them make an update). An rl recipe has `prefill` and `decode` (the
sampler, rl.prompts_per_step prompts of data.max_length, rl.group_size samples of
rl.max_new_tokens each), `old-logp` (the trainer's log-prob pass) and `la-grpo` (the
update), each over one micro-batch of the rollout batch: prompts x group_size / k rows of
data.max_length + rl.max_new_tokens tokens, the length `rollout.assemble` gives them, k =
`config.logprob_micro_batches(c)` for old-logp and optim.grad_accum for la-grpo. With
rl.shared_prefix those two take the grouped batch instead (`rollout.assemble_grouped`:
prompts / k prompts of data.max_length with their images once per micro-batch, each with
G completions of rl.max_new_tokens; la-grpo's groups split by rl.shared_prefix_parts =
p, `rollout.split_groups`: prompts x p / grad_accum prompts with G / p completions each),
the report's attention column says "+shared", and the analytic FLOPs are the shared
computation's (`shared_prefix_flops`). Report.calls counts a step's calls per RL step;
`rl_step_totals` sums them. The training steps are traced under
`sharding.training_rules(rl.sequence_parallel)`.

Roofline: time = max(FLOPs / peak FLOP/s, bytes accessed / HBM bandwidth) per chip, and
MFU = analytic model FLOPs / (time x peak). XLA's cost analysis counts the body of a
while loop once, and the decoder and vision layers are scanned (and the "xla" attention's
query chunks mapped): the compiled counts are corrected by the ratio of the unoptimised
counts of the same step lowered twice, once as compiled and once with the layer scans and
the chunk map unrolled (`ModelConfig.unroll_loops`); the prefill's too (its layer scan
returns each layer's prompt keys and values: no cache rides in it). The decode step's
layers are unrolled already (per-layer caches): its counts are exact. The log-prob chunk loop (train.logprob_chunk) stays counted once;
its missing LM-head FLOPs are added analytically, and so are the splash attention kernels'
(`splash_flops`; XLA counts a Pallas kernel as next to nothing; their bytes, a flash
kernel's few reads of q, k and v, stay uncounted). The decode step's counts are those of
one generated token: the step compiled over weights already in the compute dtype (their
cast is loop-invariant and XLA hoists it out of the token loop); what the step as compiled
counts beyond that is counted once per call. Its roofline time is that of rl.max_new_tokens
tokens (every row generating to the end) plus the once-per-call part. Its floor
(`decode_floor`): per token, each chip reads its shards of the weights the matmuls use and
its rows' KV cache in the slots written so far; the report prints the step's count against
it. With "splash" the decode attends on a Pallas kernel (`attention.decode_kernel`), whose
bytes (`decode_kernel_bytes`) are added to XLA's count.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time

import jax
import jax.numpy as jnp

from atlas_jax import hf
from atlas_jax import sampler as sampler_lib
from atlas_jax import sharding
from atlas_jax import config as config_lib
from atlas_jax.config import base_config
from atlas_jax.model import abstract_params, from_size, param_shardings
from atlas_jax.model import attention as attention_lib
from atlas_jax.rl.update import old_logps_fn, rl_update_fn
from atlas_jax.run import optimizer as optimizer_lib
from atlas_jax.run import setup
from atlas_jax.sft.update import sft_step_fn

GIB = 2**30
# Per chip: HBM GiB, peak dense bf16 FLOP/s, HBM bytes/s. Published figures, Cloud TPU
# system-architecture pages (cloud.google.com/tpu/docs/v4, /v5e, /v5p, /v6e).
CHIPS = {
    "v4": (32, 275e12, 1228e9),
    "v5e": (16, 197e12, 819e9),
    "v5litepod": (16, 197e12, 819e9),
    "v5p": (95, 459e12, 2765e9),
    "v6e": (32, 918e12, 1640e9),
}


@dataclasses.dataclass
class Report:
  size: str
  topology: str
  step: str
  mesh: str
  rows: int
  argument_gib: float
  temp_gib: float
  output_gib: float
  alias_gib: float
  total_gib: float
  hbm_gib: float
  tflops: float             # XLA's count per chip, scanned layers counted once
  compile_s: float
  model_tflops: float = 0.0  # analytic, per chip, without remat
  attention: str = "xla"
  recipe: str = ""
  length: int = 0
  grad_accum: int = 1
  flops_tflops: float = 0.0  # XLA's count per chip, corrected for scanned layers
  xla_bytes_gb: float = 0.0  # XLA's bytes accessed per chip (1e9), layers counted once
  bytes_gb: float = 0.0      # the same, corrected for scanned layers
  roofline_s: float = 0.0
  mfu: float = 0.0
  compiled: bool = True      # False: the compiler rejected it for HBM (sizes from its message)
  import_gib: float = 0.0    # the HF import, per chip (`import_memory`), the same on every row
  import_host_gib: float = 0.0  # ... and host memory in flight per host
  calls: int = 1             # calls per RL step (old-logp: its micro-batches, x2 with the
                             # reference; la-grpo: grad_accum x inner_updates); sft: 1
  once_gb: float = 0.0       # decode: bytes per chip counted once per call, not per token
  weights_gb: float = 0.0    # decode's floor per token per chip: the weights it reads
  cache_gb: float = 0.0      # ... and the KV cache (`decode_floor`)

  @property
  def step_total_s(self) -> float:
    """The roofline time of the step's calls in one RL step."""
    return self.roofline_s * self.calls

  @property
  def fits(self) -> bool:
    return self.total_gib <= self.hbm_gib


def topology_devices(topology: str):
  """Devices of a TPU slice description, e.g. "v5e:4x4" (needs libtpu)."""
  from jax.experimental import topologies
  return topologies.get_topology_desc(topology, "tpu").devices


def chip_count(topology: str) -> int:
  """Chips in a slice description: "v5e:4x4" -> 16, "v5p:4x4x4" -> 64."""
  return math.prod(int(d) for d in topology.split(":")[1].split("x"))


def model_config(c):
  """The ModelConfig `setup.load_model` builds for a recipe on TPU, without weights (tiny's
  vocab is not refitted to a tokenizer here)."""
  return from_size(c.model.size, **setup.runtime_options(c, "tpu"))


def param_counts(config) -> tuple[int, int, int]:
  """Parameters doing matmuls: (text per token: decoder + LM head, vision per patch: patch
  embedding + blocks, patch merger per merged token, i.e. per 2 x 2 patches)."""
  params = abstract_params(config)
  size = lambda tree: sum(math.prod(x.shape) for x in jax.tree.leaves(tree))
  merger = size([v for k, v in params["visual"].items() if k.startswith("merger_fc")])
  vision = size(params["visual"]) - merger
  text = size(params) - vision - merger
  if not config.text.tie_word_embeddings:
    text -= size(params["embed"])  # a lookup, not a matmul
  return text, vision, merger


def model_flops(config, step: str, *, rows: int, length: int, patches: int,
                new_tokens: int = 0, logit_positions: int | None = None,
                dense_attention: bool = False) -> float:
  """Analytic FLOPs of one step, all chips, without rematerialisation: 2 per matmul
  parameter per token (text), patch (vision) or merged patch (merger) forward, 3x that
  with the backward pass, plus attention (causal 2 x L x N x H x T^2 text; vision
  full-attention blocks over all patches, window blocks over their windows). `decode` is
  one token per row against a cache of `length` + `new_tokens` / 2 slots on average.
  logit_positions: the positions per row the LM head runs on (default `length`; the RL
  steps' completion window). dense_attention: attention as an einsum computes it before
  masking, every query against every key (4 x L x N x H x T^2 text, every vision block
  over all patches): the work done rather than the work needed (launch.bench's count)."""
  n_text, n_vision, n_merger = param_counts(config)
  t, v = config.text, config.vision
  text_heads = t.num_hidden_layers * t.num_attention_heads * t.head_dim
  if step == "decode":
    cache = length + new_tokens / 2
    return rows * (2 * n_text + 4 * text_heads * cache)
  window = patches if dense_attention else min((v.window_size // v.patch_size) ** 2, patches)
  full = len(v.fullatt_block_indexes)
  vision_attention = 4 * v.hidden_size * patches * (
      full * patches + (v.depth - full) * window)
  text_attention = (4 if dense_attention else 2) * text_heads * length**2
  # n_text counts the LM head at every position; take off the positions it skips.
  skipped = 0 if logit_positions is None else length - logit_positions
  head = t.hidden_size * t.vocab_size * skipped
  forward = (2 * n_text * length - 2 * head + text_attention + 2 * n_vision * patches
             + 2 * n_merger * (patches // 4) + vision_attention)
  return rows * forward * (1 if step in ("prefill", "old-logp") else 3)


def shared_prefix_flops(config, step: str, *, prompts: int, completions: int,
                        prompt_length: int, new_tokens: int, patches: int) -> float:
  """Analytic FLOPs of an RL training pass on a grouped batch (rl.shared_prefix), all
  chips: each prompt and its images once (no LM head), each completion's N tokens with the
  LM head, and the completions' attention to their prompt (4 x L x N x H x T x N each),
  x3 with the backward pass."""
  t = config.text
  text_heads = t.num_hidden_layers * t.num_attention_heads * t.head_dim
  prompt = model_flops(config, step, rows=prompts, length=prompt_length, patches=patches,
                       logit_positions=0)
  own = model_flops(config, step, rows=completions, length=new_tokens, patches=0,
                    logit_positions=new_tokens)
  cross = 4 * text_heads * prompt_length * new_tokens * completions
  return prompt + own + cross * (1 if step in ("prefill", "old-logp") else 3)


def splash_flops(config, step: str, *, rows: int, length: int, patches: int) -> float:
  """FLOPs of one step's splash attention kernels, all chips. XLA counts a Pallas kernel
  as next to nothing, so the roofline adds them: 2 x H per (query, key) pair a kernel
  visits, per head and matmul. Matmuls: the forward's QK^T and PV (2); in a gradient step
  also the backward's dK/dV kernel (QK^T, dO V^T, P^T dO, dS^T Q) and dQ kernel (QK^T,
  dO V^T, dS K) (7), and the forward again under a remat policy that does not save the
  attention output (2). The text is causal (the kernel visits the blocks on and below the
  diagonal) except in the prefill and decode, which attend over a cache on the "xla"
  path; the vision tower's windows are segment ids, so it visits every block."""
  if step == "decode":
    return 0.0
  matmuls = _splash_matmuls(config, step)
  t, v = config.text, config.vision
  padded, block = attention_lib.splash_blocks(length)
  diagonal = padded // block
  text_pairs = block * block * diagonal * (diagonal + 1) // 2
  text = 0 if step == "prefill" else (
      t.num_hidden_layers * t.num_attention_heads * t.head_dim * text_pairs)
  vision_pairs = attention_lib.splash_blocks(patches)[0] ** 2
  vision = v.depth * v.num_heads * v.head_dim * vision_pairs
  return 2.0 * matmuls * rows * (text + vision)


def _splash_matmuls(config, step: str) -> int:
  """The matmuls per visited block of a step's splash kernels (see `splash_flops`)."""
  if step in ("sft", "la-grpo"):
    return 2 + 7 + (2 if config.remat not in ("none", "attention_out") else 0)
  return 2


def shared_splash_flops(config, step: str, *, completions: int, prompt_length: int,
                        new_tokens: int) -> float:
  """FLOPs of the completions' splash kernels in a grouped RL pass (rl.shared_prefix,
  `attention.shared_prefix_kernel`), all chips: the blocks its causal mask, offset by the
  prompt length, visits, counted as `splash_flops` counts (XLA counts them as nothing)."""
  tq, bq = attention_lib.splash_blocks(new_tokens)
  tk, bk = attention_lib.splash_blocks(prompt_length + tq)
  pairs = sum(bq * bk for i in range(tq // bq) for j in range(tk // bk)
              if j * bk <= (i + 1) * bq - 1 + prompt_length)
  t = config.text
  return (2.0 * _splash_matmuls(config, step) * completions * t.num_hidden_layers
          * t.num_attention_heads * t.head_dim * pairs)


def _costs(cost) -> tuple[float, float]:
  cost = cost[0] if isinstance(cost, (list, tuple)) else (cost or {})
  return float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))


def _unoptimised_costs(lowered) -> tuple[float, float]:
  """(FLOPs, bytes accessed) of a lowered, not yet partitioned or optimised module, counted
  by XLA's HLO cost analysis on the host (a TPU topology has no client to count them)."""
  from jax._src.lib import _jax  # noqa: PLC0415  (the analysis Lowered.cost_analysis runs)
  module = lowered.compiler_ir("hlo").as_hlo_module()
  return _costs(_jax.hlo_module_cost_analysis(jax.devices("cpu")[0].client, module))


_OOM = re.compile(r"HLO temporaries \(([0-9.]+)([KMGT])\)")


def _shard_bytes(tree) -> int:
  """Per-device bytes of the largest shard of each abstract, sharded array in `tree`."""
  return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
             for x in jax.tree.leaves(tree) if hasattr(x, "sharding"))


def _written_slots(prompt: int, new_tokens: int, block: int = 1) -> float:
  """The cache slots a decode token attends to (its own included), averaged over the
  completion's tokens, in whole blocks of `block`."""
  return sum(-(-(prompt + i + 1) // block) * block for i in range(new_tokens)) / new_tokens


def decode_floor(params, cache, *, prompt: int, new_tokens: int) -> tuple[float, float]:
  """Bytes per chip a decode step must read per token, at least (abstract, sharded
  params and the sampler's per-layer caches of prompt + new_tokens slots): (the weights the
  token's matmuls read, in their shards, in the compute dtype the step casts them to: the
  decoder and the LM head's matrix, `sampler.HEAD`: the untied embedding is read at one
  row per sequence, the vision tower not at all; every layer's KV cache in the slots
  written so far, averaged over the completion)."""
  head = next(k for k in sampler_lib.HEAD if k in params)
  written = _written_slots(prompt, new_tokens) / (prompt + new_tokens)
  return (float(_shard_bytes((params["decoder"], params[head]))),
          float(_shard_bytes(cache)) * written)


def decode_kernel_bytes(config, cache, *, prompt: int, new_tokens: int) -> float:
  """Bytes per token per chip the decode's attention kernel (`attention.decode_kernel`,
  "splash") reads and writes, which XLA does not count (a Pallas kernel counts as next to
  nothing): per layer, its rows' k and v cache blocks up to the slot being written
  (averaged over the completion), the mask's bias blocks once per kv head, the queries
  and the output."""
  one = cache[0]["k"]
  rows, heads, slots, dim = one.sharding.shard_shape(one.shape)
  read = _written_slots(prompt, new_tokens, attention_lib.decode_blocks(slots))
  queries = config.text.num_attention_heads // config.text.num_key_value_heads * heads
  per_layer = (2 * rows * heads * read * dim * one.dtype.itemsize + heads * rows * read * 4
               + 2 * rows * queries * dim * one.dtype.itemsize)
  return len(cache) * per_layer


def in_dtype(tree, dtype):
  """Abstract arrays `tree` with their floating leaves in `dtype`, shardings kept."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(
      x.shape, dtype if jnp.issubdtype(x.dtype, jnp.floating) else x.dtype,
      sharding=x.sharding), tree)


def _memory(lowered, args, hbm_gib):
  """(memory fields, compiled or None): from the executable, or, for a step the compiler
  rejects for exceeding HBM, arguments from their shardings and temporaries from the
  compiler's message; any other error is raised."""
  try:
    compiled = lowered.compile()
  except Exception as error:  # the TPU compiler refuses programs that exceed HBM
    m = _OOM.search(str(error))
    if "RESOURCE_EXHAUSTED" not in str(error) or not m:
      raise
    temp = float(m.group(1)) * 1024 ** ("KMGT".index(m.group(2)) + 1) / GIB
    arg = _shard_bytes(args) / GIB
    return dict(argument_gib=arg, temp_gib=temp, output_gib=0.0, alias_gib=0.0,
                total_gib=arg + temp, hbm_gib=hbm_gib, compiled=False), None
  mem = compiled.memory_analysis()
  arg, temp = mem.argument_size_in_bytes / GIB, mem.temp_size_in_bytes / GIB
  out, alias = mem.output_size_in_bytes / GIB, mem.alias_size_in_bytes / GIB
  return dict(argument_gib=arg, temp_gib=temp, output_gib=out, alias_gib=alias,
              total_gib=arg + temp + out - alias, hbm_gib=hbm_gib), compiled


def _abstract(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree,
                      shardings)


def _batch(mesh, shapes: dict) -> dict:
  return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.batch_sharding(mesh, len(shape)))
          for k, (shape, dtype) in shapes.items()}


def _sampler_state_shardings(mesh, shapes):
  """The prefill's output shardings, for a prefill that did not compile: the KV cache by
  `sampler.LAYER_CACHE_AXES`, per-row fields over the batch shards, scalars replicated."""
  rows = shapes.done.shape[0]
  cache = sharding.logical_to_shardings(
      mesh, jax.sharding.PartitionSpec(*sampler_lib.LAYER_CACHE_AXES), sharding.RULES)
  per_leaf = lambda x: (sharding.batch_sharding(mesh, x.ndim) if x.ndim and x.shape[0] == rows
                        else sharding.replicated(mesh))
  out = jax.tree.map(per_leaf, shapes)
  return out.replace(cache=jax.tree.map(lambda _: cache, shapes.cache))


def import_memory(config, mesh) -> dict[str, float]:
  """GiB of the born-sharded HF import (`hf.load` with `model.param_shardings`, then
  `functional_tokens.extend_vocab`) of `config` over `mesh`, analytic, in float32 master
  weights. Per chip: its params' shards, plus, while the vocabulary grows, the larger
  matrix (embedding or LM head) gathered over the vocab for the chip's columns and its grown
  shard. Per host, in flight: one device's block of the largest leaf as read (the host
  buffer it is assembled in), one layer's slice of it being converted, one read chunk."""
  abstract = abstract_params(config)
  shapes = _abstract(abstract, param_shardings(mesh, config))
  shard = lambda x: math.prod(x.sharding.shard_shape(x.shape)) * 4
  params = _shard_bytes(in_dtype(shapes, jnp.float32))
  layers = [_get_path(shapes, r.path) for r in hf.param_table(config) if r.per_layer]
  layer_slice = max(shard(x) // x.shape[0] for x in layers)
  vocab = 0
  for path, vocab_dim in ((("embed", "embedding"), 0), (("lm_head", "kernel"), 1)):
    if path[0] in shapes:
      x = _get_path(shapes, path)
      columns = x.sharding.shard_shape(x.shape)[1 - vocab_dim]
      vocab = max(vocab, (x.shape[vocab_dim] * columns + math.prod(
          x.sharding.shard_shape(x.shape))) * 4)
  block = max(shard(x) for x in jax.tree.leaves(shapes))
  return {"chip": (params + vocab) / GIB,
          "host": (block + layer_slice + hf._CHUNK_BYTES) / GIB}  # noqa: SLF001


def _get_path(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def recipe_mesh(c, devices):
  """`setup.make_mesh` over `devices` (a slice's), with its batch-divisibility check, and the
  rl prompt count's (the sampler shards prompts over data x fsdp)."""
  mesh = setup.make_mesh(c, devices)
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  if c.recipe == "rl" and c.rl.prompts_per_step % shards:
    raise ValueError(f"config.rl.prompts_per_step {c.rl.prompts_per_step} is not divisible by "
                     f"the mesh's data x fsdp = {shards} batch shards")
  return mesh


def compile_recipe(c, topology: str, *, recipe: str = "", devices=None,
                   hbm_gib: float | None = None, steps=None) -> list[Report]:
  """Compiles a recipe config's steps (default all; see the module docstring) for one
  slice, e.g. "v5e:4x4"; returns their reports. `recipe` names the config in them."""
  config_lib.validate(c)
  devices = topology_devices(topology) if devices is None else devices
  hbm, peak, bandwidth = CHIPS[topology.split(":")[0]]
  hbm_gib = hbm if hbm_gib is None else hbm_gib
  mesh = recipe_mesh(c, devices)
  config = model_config(c)
  optimizer = optimizer_lib.make_optimizer(setup.resolve_optim(c))
  state_shape, state_sh = setup.abstract_state(mesh, config, optimizer,
                                                 abstract_params(config), c.seed)
  state = _abstract(state_shape, state_sh)
  functional_ids = jnp.arange(len(c.functional_tokens.tokens), dtype=jnp.int32)
  d, rl, chunk = c.data, c.rl, c.train.logprob_chunk
  images = lambda rows: {"pixel_values": ((rows, d.max_patches, config.vision.patch_dim),
                                          jnp.float32),
                         "image_grid_thw": ((rows, d.max_images, 3), jnp.int32)}
  n_devices = len(devices)
  reports = []

  unrolled_config = dataclasses.replace(config, unroll_loops=True)

  def run(name, lower, args, *, rows, length, rules=sharding.RULES, tokens=1,
          logit_passes=0, logit_length=None, shared_prompts=0, calls=1, per_token=None,
          floor=(0.0, 0.0), kernel_bytes=0.0):
    """Compiles `lower(config)` (the loop's jitted function lowered on `args`) and appends
    its report; `lower(unrolled_config)` is the same step with every loop unrolled, lowered
    for its cost counts only. logit_length: the positions per row the LM head runs on
    (default `length`). shared_prompts > 0: a grouped batch of that many prompts of
    data.max_length and `rows` completions of rl.max_new_tokens. per_token (the decode):
    `lower` of the step whose counts are those of one of its `tokens` tokens; the rest of
    the step's counts are counted once. floor: (weights, cache) bytes per token per chip;
    kernel_bytes: per call (per token with per_token) the Pallas kernels' bytes XLA does not
    count."""
    t0 = time.perf_counter()
    with sharding.with_rules(mesh, rules):
      lowered = lower(config)
      stats, compiled = _memory(lowered, args, hbm_gib)
      compile_s = time.perf_counter() - t0
      unrolled = lower(unrolled_config)
    scanned_flops, scanned_bytes = _unoptimised_costs(lowered)
    full_flops, full_bytes = _unoptimised_costs(unrolled)
    if compiled is not None:
      flops, nbytes = _costs(compiled.cost_analysis())
    else:  # rejected for HBM: the unoptimised counts, split evenly over the chips
      flops, nbytes = scanned_flops / n_devices, scanned_bytes / n_devices
    xla_flops, xla_bytes = flops, nbytes
    flops *= full_flops / max(scanned_flops, 1.0)
    nbytes *= full_bytes / max(scanned_bytes, 1.0)
    logit_length = length if logit_length is None else logit_length
    chunks = logit_length // min(chunk, logit_length)
    flops += (logit_passes * (chunks - 1) * 2 * rows * min(chunk, logit_length)
              * config.text.hidden_size * config.text.vocab_size / n_devices)
    if config.attention_impl == "splash":  # grouped: the prompts' and the completions'
      flops += splash_flops(config, name, rows=shared_prompts or rows,
                            length=d.max_length if shared_prompts else length,
                            patches=d.max_patches) / n_devices
      if shared_prompts:
        flops += shared_splash_flops(config, name, completions=rows,
                                     prompt_length=d.max_length,
                                     new_tokens=rl.max_new_tokens) / n_devices
    once_flops = once_bytes = 0.0
    if per_token is not None and compiled is not None:
      with sharding.with_rules(mesh, rules):
        token_flops, token_bytes = _costs(per_token(config).compile().cost_analysis())
      once_flops, once_bytes = max(flops - token_flops, 0.0), max(nbytes - token_bytes, 0.0)
      flops, nbytes = token_flops, token_bytes
    nbytes += kernel_bytes
    # A step the compiler rejected gets no roofline: its counts are the unoptimised ones.
    seconds = (tokens * max(flops / peak, nbytes / bandwidth)
               + max(once_flops / peak, once_bytes / bandwidth)) if compiled is not None else 0.0
    if shared_prompts:
      analytic = shared_prefix_flops(
          config, name, prompts=shared_prompts, completions=rows, prompt_length=d.max_length,
          new_tokens=rl.max_new_tokens, patches=d.max_patches) / n_devices
    else:
      analytic = model_flops(config, name, rows=rows, length=length, patches=d.max_patches,
                             new_tokens=rl.max_new_tokens,
                             logit_positions=logit_length) * tokens / n_devices
    reports.append(Report(
        size=c.model.size, topology=topology, step=name, mesh=mesh_desc, rows=rows,
        compile_s=compile_s, recipe=recipe, length=length,
        attention=config.attention_impl + ("+shared" if shared_prompts else ""),
        grad_accum=c.optim.grad_accum if name in ("sft", "la-grpo") else 1, calls=calls,
        tflops=xla_flops / 1e12, model_tflops=analytic / 1e12, flops_tflops=flops / 1e12,
        xla_bytes_gb=xla_bytes / 1e9, bytes_gb=nbytes / 1e9, roofline_s=seconds,
        mfu=analytic / (seconds * peak) if seconds else 0.0, import_gib=loading["chip"],
        import_host_gib=loading["host"], once_gb=once_bytes / 1e9,
        weights_gb=floor[0] / 1e9, cache_gb=floor[1] / 1e9, **stats))
    return compiled

  loading = import_memory(config, mesh)
  mesh_desc = "x".join(f"{k}={v}" for k, v in mesh.shape.items() if v > 1) or "1"
  wanted = lambda name: steps is None or name in steps
  if c.recipe == "sft" and wanted("sft"):
    b, t = d.batch_size, d.max_length
    batch = _batch(mesh, dict(
        images(b), input_ids=((b, t), jnp.int32), attention_mask=((b, t), jnp.int32),
        loss_mask=((b, t), jnp.int32), position_ids=((b, 3, t), jnp.int32),
        valid=((b,), jnp.int32)))
    run("sft", lambda cfg: sft_step_fn(c, cfg, mesh, optimizer, state_sh,
                                       functional_ids).lower(state, batch),
        (state, batch), rows=b, length=t, logit_passes=4)
  if c.recipe != "rl":
    return reports
  prompts, t, n, g = rl.prompts_per_step, d.max_length, rl.max_new_tokens, rl.group_size
  if wanted("prefill") or wanted("decode"):  # the decode needs the prefill's shardings
    settings = dataclasses.replace(sampler_lib.SamplerSettings.from_rl(rl), stop_ids=(1,))
    allowed = jax.ShapeDtypeStruct((config.text.vocab_size,), jnp.bool_,
                                   sharding=sharding.replicated(mesh))
    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=sharding.replicated(mesh))
    p = _batch(mesh, dict(images(prompts), input_ids=((prompts, t), jnp.int32),
                          attention_mask=((prompts, t), jnp.int32)))
    prefill_args = (state.params, p["input_ids"], p["attention_mask"], p["pixel_values"],
                    p["image_grid_thw"], key, allowed)
    compiled = run("prefill", lambda cfg: sampler_lib.jit_prefill.lower(
        cfg, *prefill_args, settings=settings), prefill_args, rows=prompts, length=t)
    if wanted("decode"):
      shapes = jax.eval_shape(lambda *a: sampler_lib.prefill(config, *a, settings=settings),
                              *prefill_args)
      sampler_state = _abstract(shapes, compiled.output_shardings if compiled is not None
                                else _sampler_state_shardings(mesh, shapes))
      one_layer = sampler_lib.weights_split_over_batch(state.params)
      decode = lambda params: lambda cfg: sampler_lib.jit_decode.lower(
          cfg, params, sampler_state, allowed, settings=settings,
          one_layer_at_a_time=one_layer)
      # Per token: the same step over weights already in the compute dtype (their cast is
      # loop-invariant: XLA hoists it out of the token loop, to run once per call).
      weights = in_dtype(state.params, jnp.dtype(config.dtype))
      run("decode", decode(state.params), (state.params, sampler_state), rows=prompts * g,
          length=t, tokens=n, per_token=decode(weights),
          floor=decode_floor(weights, sampler_state.cache, prompt=t, new_tokens=n),
          kernel_bytes=decode_kernel_bytes(config, sampler_state.cache, prompt=t, new_tokens=n)
          if config.attention_impl == "splash" else 0.0)
  length = t + n
  shards = mesh.shape["data"] * mesh.shape["fsdp"]

  def rollout_batch(count: int, parts: int):
    """(rows, prompts, per-token shape, batch): one of `count` micro-batches of the
    rollout batch (update.micro_batches); grouped with `parts` under rl.shared_prefix
    (prompts 0 otherwise)."""
    units = prompts * parts if rl.shared_prefix else prompts * g  # whole groups, or rows
    if units % (count * shards):
      what = (f"rl.prompts_per_step x {parts} parts = {units} groups" if rl.shared_prefix
              else f"rl.prompts_per_step x rl.group_size = {units} rollouts")
      raise ValueError(f"config.{what} do not split into {count} micro-batches over {shards} "
                       "batch shards")
    r = prompts * g // count
    if rl.shared_prefix:
      b = units // count
      per_token = ((r, n), jnp.float32)
      return r, b, per_token, _batch(mesh, dict(
          images(b), prompt_ids=((b, t), jnp.int32), prompt_mask=((b, t), jnp.int32),
          completion_ids=((r, n), jnp.int32), completion_mask=((r, n), jnp.int32),
          sampler_logp=per_token, advantages=((r,), jnp.float32)))
    per_token = ((r, length), jnp.float32)
    return r, 0, per_token, _batch(mesh, dict(
        images(r), input_ids=((r, length), jnp.int32),
        attention_mask=((r, length), jnp.int32), completion_mask=((r, length), jnp.int32),
        sampler_logp=per_token, advantages=((r,), jnp.float32)))

  if wanted("old-logp"):  # each prompt once, in the log-prob passes' own micro-batches
    count = config_lib.logprob_micro_batches(c)
    r, shared, _, batch = rollout_batch(count, 1)
    run("old-logp", lambda cfg: old_logps_fn(c, cfg).lower(state.params, batch),
        (state.params, batch), rows=r, length=length, logit_passes=1, logit_length=n,
        shared_prompts=shared, calls=count * (2 if rl.beta > 0 else 1))
  if wanted("la-grpo"):
    r, shared, per_token, batch = rollout_batch(c.optim.grad_accum, rl.shared_prefix_parts)
    batch = dict(batch, **_batch(mesh, dict(old_logp=per_token)))
    if rl.beta > 0:
      batch.update(_batch(mesh, dict(ref_logp=per_token)))
    run("la-grpo", lambda cfg: rl_update_fn(
        c, cfg, mesh, optimizer, state_sh, functional_ids).lower(state, batch),
        (state, batch), rows=r, length=length, logit_passes=4, logit_length=n,
        shared_prompts=shared, calls=c.optim.grad_accum * rl.inner_updates)
  return reports


# Step names (launch.aot_report --steps) -> the recipe steps they compile; flag mode takes
# the first three.
STEP_GROUPS = {"sft": ("sft",), "sampler": ("prefill", "decode"),
               "la-grpo": ("old-logp", "la-grpo"), "old-logp": ("old-logp",),
               "update": ("la-grpo",)}


def flag_configs(size: str, *, mesh_shape: dict, batch: int, length: int, patches: int,
                 new_tokens: int, remat: str, chunk: int, group_size: int,
                 attention_chunk: int, attention_impl: str, sampler_prompts: int | None,
                 devices) -> tuple:
  """(sft config, rl config) built from the base config's groups for launch.aot_report's
  flag mode. batch: sequences per SFT step (<= 0: one per batch shard); length: SFT length
  and the rollout length (prompt = length - new_tokens); sampler_prompts: prompts per
  rollout (default batch / group_size, rounded up to the batch shards)."""
  shards = sharding.resolve_mesh_shape(mesh_shape, len(devices))
  shards = shards["data"] * shards["fsdp"]
  batch = batch if batch > 0 else shards
  if attention_impl != "xla":
    attention_chunk = 0  # the kernels never hold [T, S] logits; chunking is the einsum's
  configs = []
  for recipe, t in (("sft", length), ("rl", length - new_tokens)):
    c = base_config()
    c.recipe, c.model.size, c.model.dtype, c.model.remat = recipe, size, "bfloat16", remat
    c.model.attention_chunk, c.model.attention_impl = attention_chunk, attention_impl
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = (mesh_shape[k] for k in sharding.AXES)
    c.data.batch_size, c.data.max_length, c.data.length_buckets = batch, t, (t,)
    c.data.max_patches, c.data.max_pixels = patches, patches * 196
    c.train.logprob_chunk = chunk
    c.rl.group_size, c.rl.max_new_tokens = group_size, new_tokens
    c.rl.prompts_per_step = sampler_prompts or -(-max(batch // group_size, 1) // shards) * shards
    configs.append(c)
  return tuple(configs)


def compile_steps(size: str, topology: str, *, steps=("sft", "la-grpo", "sampler"),
                  devices=None, hbm_gib: float | None = None, **flags) -> list[Report]:
  """Flag mode: the steps (STEP_GROUPS names) of one size for one slice, from configs
  `flag_configs(size, **flags)` builds; returns their reports."""
  devices = topology_devices(topology) if devices is None else devices
  sft_config, rl_config = flag_configs(size, devices=devices, **flags)
  reports = []
  for c, names in ((sft_config, ("sft",)), (rl_config, ("sampler", "la-grpo"))):
    wanted = [s for name in names if name in steps for s in STEP_GROUPS[name]]
    if wanted:
      reports += compile_recipe(c, topology, recipe=f"flags:{size}", devices=devices,
                                hbm_gib=hbm_gib, steps=wanted)
  return reports


def rl_step_totals(reports: list[Report]) -> list[str]:
  """Per RL recipe and slice, the roofline seconds of one RL step's calls: the training
  passes (old-logp and la-grpo, each time x calls) and, where compiled, the sampler's."""
  lines, groups = [], {}
  for r in reports:
    if r.step in ("prefill", "decode", "old-logp", "la-grpo"):
      groups.setdefault((r.recipe or r.size, r.topology, r.mesh), {})[r.step] = r
  for (name, topology, mesh), steps in groups.items():
    training = [steps[k] for k in ("old-logp", "la-grpo") if k in steps]
    if not training or not all(r.compiled for r in steps.values()):
      continue
    passes = sum(r.step_total_s for r in training)
    terms = " + ".join(f"{r.step} {r.roofline_s:.3f} s x {r.calls}" for r in training)
    line = f"RL step {name} on {topology} ({mesh}): training passes {terms} = {passes:.1f} s"
    sampler = [steps[k] for k in ("prefill", "decode") if k in steps]
    if sampler:
      total = passes + sum(r.step_total_s for r in sampler)
      line += (f"; with {' + '.join(f'{r.step} {r.roofline_s:.2f} s' for r in sampler)}: "
               f"{total:.1f} s")
    lines.append(line)
  return lines


def format_table(reports: list[Report]) -> str:
  head = (f"{'size':<15}{'slice':<10}{'step':<9}{'attn':<7}{'mesh':<19}{'rows':>5}{'len':>6}"
          f"{'args':>7}"
          f"{'temp':>7}{'total':>7}{'HBM':>5}{'fits':>5}{'TFLOP':>8}{'step s':>8}"
          f"{'MFU':>6}{'compile':>9}")
  lines = [head, "-" * len(head)]
  for r in reports:
    lines.append(f"{r.size:<15}{r.topology:<10}{r.step:<9}{r.attention:<7}{r.mesh:<19}"
                 f"{r.rows:>5}{r.length:>6}"
                 f"{r.argument_gib:>7.2f}{r.temp_gib:>7.2f}{r.total_gib:>7.2f}"
                 f"{r.hbm_gib:>5.0f}{'yes' if r.fits else 'NO':>5}{r.model_tflops:>8.1f}"
                 + (f"{r.roofline_s:>8.3f}{r.mfu:>6.0%}" if r.compiled else f"{'-':>8}{'-':>6}")
                 + f"{r.compile_s:>8.1f}s")
  lines += rl_step_totals(reports)
  for r in reports:
    if r.step == "decode" and r.compiled and r.cache_gb:
      counted = ("XLA's count + the attention kernel's" if r.attention.startswith("splash")
                 else "XLA's count")
      lines.append(f"decode {r.recipe or r.size} on {r.topology} ({r.mesh}): {r.bytes_gb:.2f} "
                   f"GB per token per chip ({counted}) against a floor of "
                   f"{r.weights_gb + r.cache_gb:.2f} (weights {r.weights_gb:.2f} + KV cache "
                   f"{r.cache_gb:.2f}); {r.once_gb:.2f} GB once per call (outside the token "
                   "loop: the weights' cast to the compute dtype)")
  seen = set()
  for r in reports:
    if r.import_gib and (r.recipe, r.size, r.topology, r.mesh) not in seen:
      seen.add((r.recipe, r.size, r.topology, r.mesh))
      lines.append(f"import {r.recipe or r.size} on {r.topology} ({r.mesh}): "
                   f"{r.import_gib:.2f} GiB per chip of {r.hbm_gib:.0f} (float32 params' "
                   f"shards, vocabulary growth), {r.import_host_gib:.2f} GiB host memory in "
                   "flight per host")
  lines.append("attn: the attention implementation (model.attention_impl as resolved for "
               "TPU). rows x len: sequences x tokens per compiled step (sft, la-grpo: one "
               "micro-batch, optim.grad_accum per update; decode: prompts x group size, "
               "len = prompt). GiB per chip: args = params + optimizer state + batch, "
               "temp = activations and scratch, total = args + temp + outputs - donated.")
  lines.append("TFLOP: analytic model FLOPs per chip (no remat). step s: roofline "
               "max(XLA FLOPs / peak, XLA bytes / HBM bandwidth), counts corrected for "
               "scanned layers and chunk loops, splash kernels' FLOPs added (prefill: bytes "
               "as compiled, an upper bound; decode: all new tokens); MFU = TFLOP / (step s "
               "x peak); '-': rejected for HBM.")
  return "\n".join(lines)
