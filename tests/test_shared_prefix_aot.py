"""rl.shared_prefix through `aot.compile_recipe` (what `launch.aot_report --config=...
--config.rl.shared_prefix=True` runs) for a 4-chip v5e slice, in a subprocess (libtpu is
noisy and process-global): the grouped old-logp and la-grpo steps compile and fit with the
einsum attention and with splash (the prompts' attention; the completions' part stays on
the einsums), say "+shared" in the attention column, and cost fewer FLOPs than the
unshared steps over the same rollouts; and the image-heavy bench rows print."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from tests import factories

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = """
import json
from atlas_jax import aot
from configs import rl
from tests import factories

reports = []
for impl, shared in (("xla", False), ("xla", True), ("splash", True)):
  c = factories.override(rl.get_config("tiny"), {
      "data.max_length": 128, "data.length_buckets": (128,), "data.max_patches": 256,
      "data.max_pixels": 256 * 196, "train.logprob_chunk": 32, "rl.max_new_tokens": 32,
      "rl.group_size": 8, "model.attention_impl": impl, "rl.shared_prefix": shared})
  reports += aot.compile_recipe(c, "v5e:2x2", steps=("old-logp", "la-grpo"))
print("REPORTS " + json.dumps([dict(vars(r), fits=r.fits) for r in reports]))
"""


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="libtpu is not installed (pip install -e '.[tpu]')")
def test_shared_prefix_steps_compile_for_a_v5e_slice():
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  reports = json.loads(proc.stdout.split("REPORTS ", 1)[1])
  by = {(r["attention"], r["step"]): r for r in reports}
  assert set(by) == {(a, s) for a in ("xla", "xla+shared", "splash+shared")
                     for s in ("old-logp", "la-grpo")}
  for r in reports:
    assert r["compiled"] and r["fits"] and r["roofline_s"] > 0 and 0 < r["mfu"] <= 1, r
  for step in ("old-logp", "la-grpo"):
    unshared, shared = by["xla", step], by["xla+shared", step]
    assert shared["rows"] == unshared["rows"] == 4 * 8  # the same rollouts
    print(f"\n[aot {step}] unshared {unshared['flops_tflops']:.3g} TFLOP/chip, "
          f"{unshared['total_gib']:.3f} GiB; shared {shared['flops_tflops']:.3g}, "
          f"{shared['total_gib']:.3f} GiB; splash+shared {by['splash+shared', step]['flops_tflops']:.3g}")
    assert shared["flops_tflops"] < 0.7 * unshared["flops_tflops"]
    assert shared["model_tflops"] < unshared["model_tflops"]


@pytest.mark.slow
def test_bench_prints_the_image_heavy_rl_rows(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "launch.bench", "--models=tiny", "--repeats=1", "--new_tokens=8",
       "--prompt_text=8", "--image_side=4", "--batch=2", "--group_size=4",
       "--steps=rl-shared", f"--hf_dir={tmp_path}"],
      capture_output=True, text=True, timeout=600, cwd=ROOT,
      env=dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=factories.xla_flags()))
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = proc.stdout
  assert "image-heavy RL (tiny): 2 prompt(s) of 14 tokens (16 patches), G = 4" in out
  for step in ("update", "old-logp"):
    assert f"| tiny | {step} |" in out, step
  drift = next(line for line in out.splitlines() if line.startswith("sampler vs trainer"))
  values = {k: float(v) for k, v in (part.rsplit(" ", 1) for part in
                                    drift.split(": ", 1)[1].split(", "))}
  assert values["float32 shared"] < 1e-4 and values["float32 unshared"] < 1e-4
  assert values["bfloat16 shared"] > values["float32 shared"]
