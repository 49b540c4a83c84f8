"""`python -m launch.bench` end to end at the smoke size: both sides run on one saved
checkpoint, greedy tokens agree, and every step's row, the rollout's floor and ceiling and
the decode timing are printed."""

import os
import subprocess
import sys

import pytest

from tests import factories

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_bench_runs_both_sides_and_prints_every_row(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "launch.bench", "--models=tiny", "--repeats=1", "--new_tokens=8",
       "--prompt_text=8", "--image_side=4", "--decode_lengths=40", f"--hf_dir={tmp_path}"],
      capture_output=True, text=True, timeout=600, cwd=ROOT,
      env=dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=factories.xla_flags()))
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = proc.stdout
  assert "greedy tokens equal in 8/8 rows (100.0% of tokens)" in out
  for step in ("rollout (new tok/s)", "SFT step (tok/s)", "LA-GRPO update (tok/s)"):
    assert f"| tiny | {step} |" in out, step
  assert "S=    40:" in out and "rollout floor here" in out
  assert "rollout ceiling with XLA:CPU's dot kernels" in out
  # The training rows give atlas_jax's, transformers' and the goal's fraction of peak.
  for step in ("SFT step (tok/s)", "LA-GRPO update (tok/s)"):
    row = next(line for line in out.splitlines() if f"| tiny | {step} |" in line)
    assert row.rstrip(" |").endswith("%") and row.count("%") == 3, row
  assert os.path.exists(os.path.join(tmp_path, "tiny", "config.json"))


@pytest.mark.slow
def test_bench_in_bfloat16_prints_every_row(tmp_path):
  """--dtype=bfloat16 (the device check's GPU setting, here on the CPU): both sides compute
  in bf16 over fp32 weights, the peak is a bf16 matmul's, and every step is timed."""
  proc = subprocess.run(
      [sys.executable, "-m", "launch.bench", "--models=tiny", "--repeats=1", "--new_tokens=8",
       "--prompt_text=8", "--image_side=4", "--batch=2", "--dtype=bfloat16",
       f"--hf_dir={tmp_path}"],
      capture_output=True, text=True, timeout=600, cwd=ROOT,
      env=dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=factories.xla_flags()))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "matmul peak (bfloat16 2048^2): jnp " in proc.stdout
  for step in ("rollout (new tok/s)", "SFT step (tok/s)", "LA-GRPO update (tok/s)"):
    assert f"| tiny | {step} |" in proc.stdout, step
