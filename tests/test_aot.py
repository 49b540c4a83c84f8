"""Ahead-of-time compilation for a TPU slice without TPUs (libtpu's topology descriptions).

Runs `launch.aot_report` in a subprocess (libtpu is noisy and process-global) on the tiny
config for a 4-chip v5e slice, and checks that every step compiles, reports memory and
FLOPs, and that FSDP really shards the state: per-chip argument bytes under fsdp=4 are well
below those under data=4 (params and optimizer state replicated on every chip).
"""

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


def _report(tmp_path, name, *flags):
  out = tmp_path / f"{name}.jsonl"
  cmd = [sys.executable, "-m", "launch.aot_report", "--sizes=tiny", "--topologies=v5e:2x2",
         "--batch=8", "--length=256", "--patches=64", "--new_tokens=64", "--chunk=64",
         "--group_size=4", f"--output={out}", *flags]
  # Compiling for a topology touches no chip, so another libtpu process (a second report,
  # a parallel test worker) need not hold the chip lock.
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, ALLOW_MULTIPLE_LIBTPU_LOAD="1")
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "failed" not in proc.stdout, proc.stdout
  return {r["step"]: r for r in map(json.loads, out.read_text().splitlines())}, proc.stdout


@pytest.mark.slow
def test_tiny_config_compiles_for_a_v5e_slice(tmp_path):
  fsdp, table = _report(tmp_path, "fsdp", "--fsdp=4")
  print("\n" + table)
  assert set(fsdp) == {"sft", "la-grpo", "sampler"}
  for r in fsdp.values():
    assert r["mesh"] == "fsdp=4" and r["hbm_gib"] == 16
    assert 0 < r["argument_gib"] and 0 < r["total_gib"] < r["hbm_gib"]
    assert r["tflops"] > 0 and r["model_tflops"] > 0
  assert fsdp["sampler"]["rows"] == 16  # 2 prompts rounded up to 4 shards, x 4 samples
  # Both steps run one forward and one backward pass over the same rows.
  assert 0.5 < fsdp["la-grpo"]["tflops"] / fsdp["sft"]["tflops"] < 2.0

  data, _ = _report(tmp_path, "data", "--steps=sft", "--data=4", "--fsdp=1")
  assert data["sft"]["mesh"] == "data=4"
  # Replicated params + Adam moments (tiny: ~2.7 MB each in fp32) versus a quarter of them.
  assert fsdp["sft"]["argument_gib"] < 0.5 * data["sft"]["argument_gib"]


def test_slice_sizes_and_analytic_flops_without_compiling():
  """The cheap half of the report (fast tier): slice descriptions and the FLOPs model."""
  from atlas_jax import aot
  from atlas_jax.model import from_size
  assert aot.chip_count("v5e:4x4") == 16 and aot.chip_count("v5p:4x4x4") == 64
  assert len(aot.topology_devices("v5e:2x2")) == 4
  config = from_size("tiny")
  flops = {step: aot._model_flops(config, step, rows=8, length=256, new_tokens=64,
                                  n_params=1_000_000)
           for step in ("sft", "la-grpo", "sampler")}
  # Forward + backward is three forwards; doubling the rows doubles the FLOPs.
  assert flops["sft"] == flops["la-grpo"] == 3 * flops["sampler"] > 0
  assert aot._model_flops(config, "sft", rows=16, length=256, new_tokens=64,
                          n_params=1_000_000) == 2 * flops["sft"]
