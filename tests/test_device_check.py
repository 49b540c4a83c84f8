"""The GPU device check's dry run end to end (`bash launch/device_check.sh --dry_run`):
every stage the GPU run has runs here at tiny sizes on CPU and reports ok, so the check
cannot rot between GPU runs."""

import json
import os
import subprocess
import sys

import pytest

from tests import factories

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = ("test_parity", "test_attention", "test_sampler", "test_sft_step", "test_rl_update")
STAGES = ("environment", "install", "devices", "imports", *TESTS, "gpu_bench", "bench")


@pytest.mark.slow
def test_dry_run_reports_every_stage_ok(tmp_path):
  env = {k: v for k, v in os.environ.items() if k != "OUT"}
  env.update(PYTHON=sys.executable, JAX_PLATFORMS="cpu", XLA_FLAGS=factories.xla_flags())
  proc = subprocess.run(
      ["bash", "launch/device_check.sh", "--dry_run", f"--workdir={tmp_path}",
       "--budget_s=1500"], capture_output=True, text=True, timeout=1600, cwd=ROOT, env=env)
  path = tmp_path / "device_check.json"
  assert path.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
  report = json.loads(path.read_text())
  stages = report["stages"]
  assert tuple(stages) == STAGES
  failed = {name: s for name, s in stages.items() if s["status"] != "ok"}
  assert not failed, json.dumps(failed, indent=1)[-6000:]
  assert proc.returncode == 0 and report["ok"] and report["mode"] == "dry_run"

  assert stages["devices"]["figures"]["platform"] == "cpu"
  assert not stages["imports"]["figures"]["errors"]
  for name in TESTS:
    counts = stages[name]["tests"]["counts"]
    assert counts["passed"] > 0 and not counts["failed"] and not counts["errors"], name
  skipped = stages["test_attention"]["tests"]["skipped"]
  assert skipped and all(s["message"].endswith("needs a GPU") for s in skipped)
  bench = stages["gpu_bench"]["figures"]
  for part in ("forward", "train_step"):
    assert bench["transformers"][part]["tok_s"] > 0
    assert bench["atlas_jax_xla"][part]["ratio"] > 0
  steps = {row["step"] for row in stages["bench"]["figures"]["rows"]}
  assert steps == {"rollout (new tok/s)", "SFT step (tok/s)", "LA-GRPO update (tok/s)"}
  assert (tmp_path / "device_check.log").stat().st_size > 0
