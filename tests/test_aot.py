"""Ahead-of-time compilation for a TPU slice without TPUs (libtpu's topology descriptions).

The slow test runs the recipe path (`aot.compile_recipe`, what `launch.aot_report
--config=...` calls) in a subprocess (libtpu is noisy and process-global) on the tiny SFT
and RL recipes (RL with grad accumulation) for a 4-chip v5e slice: every step compiles, fits,
and reports positive FLOPs, bytes and a roofline time, and the steps it compiles are
built by the same builders (`sft.update`, `rl.update`) the training loops call. The fast
test checks the cheap half: slice sizes, the analytic FLOPs, and that FSDP shards the
state (per-chip bytes under fsdp=4 well below those under data=4).
"""

import ast
import dataclasses
import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason="libtpu is not installed (pip install -e '.[tpu]'); it provides the TPU topology "
           "descriptions that AOT compilation needs")

# Small shapes (the tiny recipes otherwise): 128-token prompts, 64 patches, 64 new tokens,
# log-probs in one chunk; RL updates in two micro-batches.
SMALL = {"data.max_length": 128, "data.length_buckets": (128,), "data.max_patches": 64,
         "data.max_pixels": 64 * 196, "train.logprob_chunk": 192, "rl.max_new_tokens": 64}
RL_ACCUM = {"optim.grad_accum": 2, "train.steps": 20}

# Runs in the subprocess: compiles both recipes, recording which step builders it called.
SCRIPT = """
import json, sys
from atlas_jax import aot
from configs import rl, sft
from tests import factories

called = []
for name in ("sft_step_fn", "old_logps_fn", "rl_update_fn"):
  def spy(*args, _real=getattr(aot, name), _name=name, **kwargs):
    called.append(_name)
    return _real(*args, **kwargs)
  setattr(aot, name, spy)
changes, rl_changes = ({k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
                       for d in json.loads(sys.argv[1]))
reports = []
for recipe in (sft, rl):
  c = factories.override(recipe.get_config("tiny"), changes)
  if recipe is rl:
    c = factories.override(c, rl_changes)
  reports += aot.compile_recipe(c, "v5e:2x2", recipe=recipe.__name__ + ":tiny")
print("REPORTS " + json.dumps({"called": called, "reports": [
    dict(vars(r), fits=r.fits) for r in reports]}))
"""


BUILDERS = {"sft_step_fn": "atlas_jax.sft.update", "old_logps_fn": "atlas_jax.rl.update",
            "rl_update_fn": "atlas_jax.rl.update", "micro_batches": "atlas_jax.rl.update",
            "make_sampler": "atlas_jax.sampler"}


def _builder_calls(path: str, function: str) -> set[str]:
  """The step builders (`BUILDERS`, imported by name from their modules) that `function` in
  the module at `path` calls."""
  tree = ast.parse(open(os.path.join(ROOT, path)).read())
  imported = {a.asname or a.name for n in tree.body if isinstance(n, ast.ImportFrom)
              for a in n.names if BUILDERS.get(a.name) == n.module}
  body = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == function)
  return {n.func.id for n in ast.walk(body) if isinstance(n, ast.Call) and
          isinstance(n.func, ast.Name) and n.func.id in imported}


@pytest.mark.slow
def test_tiny_recipes_compile_for_a_v5e_slice():
  changes = [{k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}
             for d in (SMALL, RL_ACCUM)]
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  env.pop("XLA_FLAGS", None)  # compiling for a topology touches no chip
  proc = subprocess.Popen([sys.executable, "-c", SCRIPT, json.dumps(changes)], cwd=ROOT,
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  # Meanwhile: the training loops call those builders (read from their source, not
  # imported: the subprocess has the cores).
  assert _builder_calls("atlas_jax/sft/loop.py", "train_sft") >= {"sft_step_fn"}
  assert _builder_calls("atlas_jax/rl/loop.py", "train_rl") >= {
      "old_logps_fn", "rl_update_fn", "micro_batches", "make_sampler"}
  assert _builder_calls("atlas_jax/aot.py", "compile_recipe") >= {
      "sft_step_fn", "old_logps_fn", "rl_update_fn"}
  stdout, stderr = proc.communicate(timeout=900)
  assert proc.returncode == 0, stderr[-3000:]
  out = json.loads(stdout.split("REPORTS ", 1)[1])
  reports = {r["step"]: r for r in out["reports"]}
  assert list(reports) == ["sft", "prefill", "decode", "old-logp", "la-grpo"]
  # The compiled steps came from the loops' builders.
  assert sorted(set(out["called"])) == ["old_logps_fn", "rl_update_fn", "sft_step_fn"]
  for r in reports.values():
    assert r["compiled"] and r["fits"] and r["mesh"] == "fsdp=4" and r["hbm_gib"] == 16, r
    assert 0 < r["argument_gib"] and 0 < r["total_gib"] < r["hbm_gib"]
    assert r["flops_tflops"] >= r["tflops"] > 0 and r["bytes_gb"] > 0, r
    assert r["roofline_s"] > 0 and 0 < r["mfu"] <= 1.0 and r["model_tflops"] > 0, r
  # The layer-scan correction took effect (the unrolled lowering traced afresh, not the
  # loops' shared step); the decode step's layers are unrolled already.
  for step in ("sft", "prefill", "old-logp", "la-grpo"):
    assert reports[step]["flops_tflops"] > 1.1 * reports[step]["tflops"], reports[step]
  # Shapes from the data config: a micro-batch of data.batch_size rows; rollouts of
  # prompts x group size, updated in optim.grad_accum micro-batches of prompt + new tokens.
  assert (reports["sft"]["rows"], reports["sft"]["length"]) == (8, 128)
  assert reports["la-grpo"]["grad_accum"] == 2
  assert reports["la-grpo"]["calls"] == reports["old-logp"]["calls"] == 2  # per RL step
  assert reports["decode"]["rows"] == 4 * 4 and reports["prefill"]["rows"] == 4
  assert (reports["la-grpo"]["rows"], reports["la-grpo"]["length"]) == (8, 128 + 64)
  # A decode token's count is at least its floor: each chip's weight shards and KV cache.
  decode = reports["decode"]
  assert decode["weights_gb"] > 0 and decode["cache_gb"] > 0, decode
  assert decode["bytes_gb"] >= decode["weights_gb"] + decode["cache_gb"], decode
  # Forward + backward costs more than the forward pass alone over the same rows.
  assert reports["la-grpo"]["flops_tflops"] > 2 * reports["old-logp"]["flops_tflops"]


def test_slice_sizes_flops_and_fsdp_state_without_compiling():
  """The cheap half of the report (fast tier)."""
  import jax
  from atlas_jax import aot, sharding
  from atlas_jax.model import abstract_params, from_size
  from atlas_jax.run import optimizer as optimizer_lib
  from atlas_jax.run import setup as run_lib
  from configs import sft
  assert aot.chip_count("v5e:4x4") == 16 and aot.chip_count("v5p:4x4x4") == 64
  devices = aot.topology_devices("v5e:2x2")
  assert len(devices) == 4
  config = from_size("tiny")
  flops = {step: aot.model_flops(config, step, rows=8, length=256, patches=64)
           for step in ("sft", "la-grpo", "old-logp")}
  # Forward + backward is three forwards; doubling the rows doubles the FLOPs.
  assert flops["sft"] == flops["la-grpo"] == 3 * flops["old-logp"] > 0
  assert aot.model_flops(config, "sft", rows=16, length=256, patches=64) == 2 * flops["sft"]

  c = sft.get_config("tiny")
  optimizer = optimizer_lib.make_optimizer(run_lib.resolve_optim(c))
  per_chip = {}
  for axis in ("data", "fsdp"):
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1, axis: 4}, devices=devices)
    shapes, shardings = run_lib.abstract_state(mesh, config, optimizer,
                                               abstract_params(config), seed=0)
    per_chip[axis] = aot._shard_bytes(jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings))
  # Replicated params + Adam moments versus (about) a quarter of them.
  assert per_chip["fsdp"] < 0.5 * per_chip["data"]


def test_splash_flops_count_the_blocks_the_kernel_visits():
  """XLA counts a Pallas kernel as next to nothing; the roofline adds the splash kernels'
  FLOPs (fast tier): causal text visits the blocks on and below the diagonal, the vision
  tower every block, and a gradient step runs 9 matmuls (11 when remat recomputes the
  forward) where a forward runs 2."""
  import numpy as np
  from atlas_jax import aot
  from atlas_jax.model import from_size
  config = from_size("tiny")
  t, v = config.text, config.vision
  length, patches, rows = 1000, 60, 3  # padded to 1024 (blocks of 512) and 128 (one block)
  position = np.arange(1024)
  visited = int(np.sum(position[:, None] // 512 >= position[None, :] // 512))
  assert length * (length + 1) // 2 < visited < 1024 * 1024
  text = t.num_hidden_layers * t.num_attention_heads * t.head_dim * visited
  vision = v.depth * v.num_heads * v.head_dim * 128 * 128
  count = lambda step, remat: aot.splash_flops(config.replace(remat=remat), step, rows=rows,
                                               length=length, patches=patches)
  assert count("old-logp", "full") == 2 * 2 * rows * (text + vision)
  assert count("prefill", "full") == 2 * 2 * rows * vision  # text attends over a cache
  assert count("decode", "full") == 0
  for step in ("sft", "la-grpo"):
    assert count(step, "full") == 2 * 11 * rows * (text + vision)
    assert count(step, "none") == count(step, "attention_out") == 2 * 9 * rows * (text + vision)


def test_the_cost_pass_counts_every_attention_chunk():
  """XLA counts a loop's body once: the chunked "xla" attention (a map over query chunks)
  counts as one chunk unless the cost pass unrolls it, as it unrolls the layer scans."""
  import jax
  import jax.numpy as jnp
  from atlas_jax import aot
  from atlas_jax.model import attention
  q, kv = jnp.ones((1, 256, 4, 16)), jnp.ones((1, 256, 2, 16))
  flops = lambda chunk, unroll=False: aot._unoptimised_costs(jax.jit(
      lambda q, k, v: attention.attention(q, k, v, None, chunk=chunk, unroll=unroll)).lower(
          q, kv, kv))[0]
  whole, looped, unrolled = flops(0), flops(64), flops(64, unroll=True)
  assert looped < 0.5 * whole
  assert unrolled == pytest.approx(whole, rel=0.05)


def test_the_cost_pass_unrolls_the_layer_scans_by_config():
  """ModelConfig.unroll_loops (static) emits every layer: the same function, counted whole."""
  import dataclasses

  import jax
  import jax.numpy as jnp
  from atlas_jax import aot
  from atlas_jax.model import abstract_params, forward, from_size
  config = from_size("tiny")
  ids = jnp.ones((1, 32), jnp.int32)
  flops = lambda cfg: aot._unoptimised_costs(jax.jit(forward, static_argnums=0).lower(
      cfg, abstract_params(cfg), ids, ids))[0]
  scanned, unrolled = flops(config), flops(dataclasses.replace(config, unroll_loops=True))
  assert unrolled > 1.5 * scanned  # tiny has 2 decoder layers: one counted when scanned


def test_rl_step_totals_add_each_step_times_its_calls():
  """format_table's RL step line: old-logp and la-grpo times x their calls per RL step (the
  log-prob passes' own micro-batches), then the sampler's prefill and decode."""
  from atlas_jax import aot
  row = lambda step, seconds, calls: aot.Report(
      size="qwen2.5-vl-7b", topology="v5e:4x4", step=step, mesh="fsdp=4xtensor=4", rows=4,
      argument_gib=1.0, temp_gib=1.0, output_gib=0.0, alias_gib=0.0, total_gib=2.0,
      hbm_gib=16, tflops=1.0, compile_s=1.0, recipe="rl:7b", roofline_s=seconds, calls=calls)
  reports = [row("prefill", 1.0, 1), row("decode", 30.0, 1), row("old-logp", 0.25, 16),
             row("la-grpo", 0.5, 32)]
  assert reports[2].step_total_s == 4.0
  lines = aot.rl_step_totals(reports)
  assert lines == ["RL step rl:7b on v5e:4x4 (fsdp=4xtensor=4): training passes old-logp "
                   "0.250 s x 16 + la-grpo 0.500 s x 32 = 20.0 s; with prefill 1.00 s + "
                   "decode 30.00 s: 51.0 s"]
  assert aot.rl_step_totals(reports[2:]) == [lines[0].split(";")[0]]
  assert lines[0] in aot.format_table(reports)
  rejected = dataclasses.replace(reports[3], compiled=False)
  assert aot.rl_step_totals(reports[:3] + [rejected]) == []


def test_splash_compiles_as_the_tpu_kernel_per_device_for_a_slice():
  """For a slice's devices (on any host) splash is the Mosaic kernel itself, not its
  interpretation, run on each device's rows (XLA cannot partition a Mosaic kernel: without
  the shard_map this lowering raises); the vision tower's one sequence splits its queries."""
  import jax
  import jax.numpy as jnp
  from atlas_jax import aot, sharding
  from atlas_jax.model import attention as attention_lib
  mesh = sharding.make_mesh(dict(data=1, fsdp=2, tensor=2), aot.topology_devices("v5e:2x2"))
  for causal, rows in ((True, 4), (False, 1)):
    over = lambda ndim: (sharding.batch_sharding(mesh, ndim) if rows > 1
                         else sharding.replicated(mesh))
    shape = lambda heads: jax.ShapeDtypeStruct((rows, 512, heads, 128), jnp.bfloat16,
                                               sharding=over(4))
    seg = jax.ShapeDtypeStruct((rows, 512), jnp.int32, sharding=over(2))
    run = lambda q, k, v, s: attention_lib.attention(
        q, k, v, attention_lib.Mask(dense=None, segment_ids=s, causal=causal), impl="splash")
    with sharding.with_rules(mesh):
      hlo = jax.jit(run).lower(shape(4), shape(2), shape(2), seg).compile().as_text()
    assert "tpu_custom_call" in hlo, causal  # interpreted, it would be XLA's own loops
    if causal:  # rows over fsdp, kv heads over tensor: nothing to gather
      assert "all-gather" not in hlo
  # The decode's kernel over a cache sharded as the sampler shards it.
  q = jax.ShapeDtypeStruct((16, 1, 4, 128), jnp.bfloat16, sharding=sharding.batch_sharding(mesh, 4))
  cache = jax.ShapeDtypeStruct((16, 2, 1024, 128), jnp.bfloat16, sharding=jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec(("data", "fsdp"), "tensor")))
  keys = jax.ShapeDtypeStruct((16, 1024), jnp.bool_, sharding=sharding.batch_sharding(mesh, 2))
  with sharding.with_rules(mesh):
    hlo = jax.jit(attention_lib.decode_kernel).lower(
        q, cache, cache, keys, jax.ShapeDtypeStruct((), jnp.int32)).compile().as_text()
  assert "tpu_custom_call" in hlo and "all-gather" not in hlo
