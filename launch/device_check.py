"""The GPU device check: one prepared run that proves the GPU path in minutes.

  bash launch/device_check.sh --fetch-wheels   # here, once: fill .device_wheels/
  bash launch/device_check.sh                  # on a host with one NVIDIA GPU
  bash launch/device_check.sh --dry_run        # here: every stage at tiny sizes on CPU
  bash launch/device_check.sh --stages=gpu_bench,bench   # some stages again

Stages, each a subprocess with its own time limit inside --budget_s (a failed or timed-out
stage is recorded with its output's tail and the next one runs): environment (versions,
nvidia-smi); install (the carried wheels this interpreter lacks, into <workdir>/site, first
on PYTHONPATH from then on); devices; imports (every atlas_jax module and dependency); the
GPU-relevant tests on the GPU platform (parity with transformers in fp32 at "highest"
matmul precision, cuDNN attention against the einsums in bf16, greedy sampling against
`generate`, the SFT step and the LA-GRPO update on a tiny model); gpu_bench (atlas_jax's
`hf.load` + `model.forward` against transformers on the same device in bf16, a ~1.1B
Qwen2.5-VL-shaped random model, batch 16: forward and train step tok/s, ratio, MFU at the
device's bf16 peak); bench (`python -m launch.bench`, its table parsed). Every figure goes
to device_check.json, and all output to device_check.log, in $OUT if set, else --workdir;
the JSON is rewritten after every stage.
"""

from __future__ import annotations

import datetime
import glob
import importlib.metadata
import json
import os
import re
import signal
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ET

from absl import app, flags

from launch import cli

FLAGS = flags.FLAGS
flags.DEFINE_bool("dry_run", False, "Run every stage at tiny sizes on CPU devices.")
flags.DEFINE_string("workdir", "/tmp/atlas_device_check", "Scratch space; the report too "
                    "when $OUT is unset.")
flags.DEFINE_string("wheels", ".device_wheels", "Folder of carried wheels (install stage).")
flags.DEFINE_float("budget_s", 0, "Seconds for all stages (0: 460 on a GPU, 1800 dry).")
flags.DEFINE_list("stages", [], "Stages to run (default: all); environment always runs.")
flags.DEFINE_string("bench_args", "", "Replaces the bench stage's default flags.")
flags.DEFINE_float("peak_tflops", 0, "The device's bf16 dense peak (0: from BF16_PEAKS).")
flags.DEFINE_string("child", "", "Internal: run one stage's body in this process.")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULT = "DEVICE_CHECK_RESULT "  # a child stage's figures: the last such line it prints
# The GPU-relevant tests: (files, -k expression). test_cudnn_attention skips without a GPU.
TESTS = {
    "test_parity": (["tests/test_model_parity.py"], ""),
    "test_attention": (["tests/test_cudnn_attention.py", "tests/test_attention.py"],
                       "not splash"),
    "test_sampler": (["tests/test_sampler.py"], "greedy_equals or logps_equal"),
    "test_sft_step": (["tests/test_sft_step.py"], "non_finite or frozen_vision or accumulation"),
    "test_rl_update": (["tests/test_rl_update.py"], ""),
}
STAGES = ("install", "devices", "imports", *TESTS, "gpu_bench", "bench")
# Seconds a stage may take on a GPU (3x in a dry run), within the budget.
LIMITS = dict(install=60, devices=60, imports=60, test_parity=90, test_attention=60,
              test_sampler=60, test_sft_step=60, test_rl_update=60, gpu_bench=240, bench=150)
BENCH_ARGS = dict(  # launch.bench's flags: transformers on the same GPU, both in bf16
    gpu="--models=gpu --batch=16 --prompt_text=190 --image_side=16 --new_tokens=32 "
        "--repeats=2 --attention_impl=auto --torch_device=cuda --dtype=bfloat16",
    dry="--models=tiny --batch=8 --prompt_text=8 --image_side=4 --new_tokens=8 --repeats=1 "
        "--attention_impl=auto")
# bf16 dense tensor-core peaks in TFLOP/s (no sparsity), the first match in device_kind.
BF16_PEAKS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4), ("H200", 989.4),
              ("B200", 2250.0), ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0))
DEPENDENCIES = {  # distribution: module
    "jax": "jax", "flax": "flax", "optax": "optax", "orbax-checkpoint": "orbax.checkpoint",
    "transformers": "transformers", "tokenizers": "tokenizers", "torch": "torch",
    "numpy": "numpy", "pillow": "PIL", "safetensors": "safetensors", "jinja2": "jinja2",
    "absl-py": "absl", "ml_dtypes": "ml_dtypes", "matplotlib": "matplotlib",
    "pyarrow": "pyarrow", "importlib_resources": "importlib_resources",
    "ml_collections": "ml_collections", "grain": "grain",
    "tensorflow-datasets": "tensorflow_datasets", "tensorboardX": "tensorboardX"}


def bf16_peak(device_kind: str) -> float | None:
  """TFLOP/s of `device_kind` (e.g. 'NVIDIA H100 80GB HBM3'), None if not known."""
  return FLAGS.peak_tflops or next((p for k, p in BF16_PEAKS if k in device_kind), None)


def _version(distribution: str) -> str | None:
  try:
    return importlib.metadata.version(distribution)
  except importlib.metadata.PackageNotFoundError:
    return None


class Check:
  """Runs the stages' subprocesses within one deadline and keeps the report on disk."""

  def __init__(self, dry_run: bool, workdir: str, budget_s: float):
    self.dry_run, self.workdir, self.start = dry_run, workdir, time.monotonic()
    self.deadline = self.start + budget_s
    out = os.environ.get("OUT") or workdir
    for d in (workdir, out):
      os.makedirs(d, exist_ok=True)
    self.json_path, self.log_path = (os.path.join(out, f"device_check.{ext}")
                                     for ext in ("json", "log"))
    open(self.log_path, "w").close()
    self.env = dict(os.environ, PYTHONUNBUFFERED="1", XLA_PYTHON_CLIENT_PREALLOCATE="false",
                    JAX_PLATFORMS="cpu" if dry_run else "cuda")
    # One compilation cache for every stage, and for a rerun of a stage on the same host.
    self.env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(workdir, "jax_cache"))
    if not dry_run:
      self.env.setdefault("XLA_FLAGS", "")  # not tests/conftest's CPU flags (LLVM -O0)
    self.report = dict(
        check="atlas_jax device check", mode="dry_run" if dry_run else "gpu", ok=False,
        date=datetime.datetime.now().isoformat(timespec="seconds"), budget_s=budget_s,
        wall_s=0.0, stages={}, notes=[
            "JAX is the host's own: the project's pin (jax 0.10.x, jaxlib and the CUDA "
            "plugin, about 210 MiB of wheels) is too large to carry"])

  def save(self) -> None:
    self.report["wall_s"] = round(time.monotonic() - self.start, 1)
    with open(self.json_path, "w") as f:
      json.dump(self.report, f, indent=1)

  def run(self, name: str, cmd: list[str], env: dict | None = None) -> tuple[dict, str]:
    """Runs `cmd` in its own process group, killed at the stage's limit: (entry, output)."""
    limit = min(LIMITS[name] * (3 if self.dry_run else 1), self.deadline - time.monotonic())
    entry = dict(command=" ".join(cmd), limit_s=round(limit))
    if limit < 5:
      return dict(entry, status="skipped", reason="out of time (--budget_s)"), ""
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env or self.env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
      output = proc.communicate(timeout=limit)[0]
      status = "ok" if proc.returncode == 0 else "failed"
    except subprocess.TimeoutExpired:
      os.killpg(proc.pid, signal.SIGKILL)
      output, status = proc.communicate()[0], "timeout"
    with open(self.log_path, "a") as f:
      f.write(f"\n===== {name}: {entry['command']}\n{output}")
    return dict(entry, status=status, seconds=round(time.monotonic() - t0, 1),
                returncode=proc.returncode), output or ""


def _failed(entry: dict, output: str, reason: str = "") -> dict:
  """`entry` as failed (a timeout stays a timeout), with the tail of the stage's output."""
  entry.update(status="failed" if entry["status"] == "ok" else entry["status"],
               output_tail=output[-4000:])
  if reason:
    entry["reason"] = reason
  return entry


def environment_stage() -> dict:
  versions = {n: _version(n) for n in ("jaxlib", "jax-cuda12-plugin", "jax-cuda13-plugin",
                                       *DEPENDENCIES, "pytest")}
  try:
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                          "--format=csv,noheader"], capture_output=True, text=True,
                         timeout=20).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    smi = ""
  py = sys.version.split()[0]
  return dict(status="ok", python=py, executable=sys.executable, nvidia_smi=smi,
              packages={k: v for k, v in versions.items() if v},
              summary=f"python {py}, jax {versions['jax']}, torch {versions['torch']}")


def install_stage(check: Check) -> dict:
  """Installs the carried wheels whose distribution is missing here. A dry run installs
  none (they are for the GPU host's CPython 3.12) but resolves them all for that host."""
  wheels = sorted(glob.glob(os.path.join(ROOT, FLAGS.wheels, "*.whl")))
  names = [os.path.basename(w).split("-")[0].lower() for w in wheels]
  info = dict(folder=FLAGS.wheels, wheels=len(wheels),
              size_mib=round(sum(map(os.path.getsize, wheels)) / 2**20, 1))
  twice = sorted({n for n in names if names.count(n) > 1})
  if twice:
    return dict(info, status="failed", reason=f"{FLAGS.wheels} holds two versions of {twice}")
  missing = [w for w, n in zip(wheels, names) if check.dry_run or not _version(n)]
  if not missing:
    return dict(info, status="ok", summary=f"{len(wheels)} wheels, nothing missing")
  site = os.path.join(check.workdir, "site")
  cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
         "--no-compile", "--no-cache-dir", "--upgrade", "--target", site]
  if check.dry_run:
    cmd += ["--dry-run", "--only-binary=:all:", "--python-version", "3.12", "--implementation",
            "cp"] + [a for tag in ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64",
                                   "manylinux2014_x86_64") for a in ("--platform", tag)]
  entry, output = check.run("install", cmd + missing)
  entry.update(info, installed=[] if check.dry_run else [os.path.basename(w) for w in missing],
               summary=f"{len(missing)} of {len(wheels)} wheels "
               f"{'resolve for CPython 3.12' if check.dry_run else 'installed'}, "
               f"{info['size_mib']} MiB")
  if entry["status"] != "ok":
    return _failed(entry, output)
  if not check.dry_run:
    check.env["PYTHONPATH"] = os.pathsep.join(
        p for p in (site, ROOT, os.environ.get("PYTHONPATH")) if p)
  return entry


def test_stage(check: Check, name: str) -> dict:
  files, select = TESTS[name]
  xml = os.path.join(check.workdir, f"{name}.xml")
  if os.path.exists(xml):
    os.remove(xml)
  cmd = [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:xdist", "-p", "no:cacheprovider",
         f"--junitxml={xml}", *files] + (["-k", select] if select else [])
  entry, output = check.run(name, cmd, dict(check.env, JAX_DEFAULT_MATMUL_PRECISION="highest"))
  if entry["status"] == "skipped":
    return entry
  counts, failures, skipped = dict(passed=0, failed=0, errors=0, skipped=0), [], []
  for case in ET.parse(xml).iter("testcase") if os.path.exists(xml) else ():
    test = f"{case.get('classname')}::{case.get('name')}"
    outcome = next((c for c in case if c.tag in ("failure", "error", "skipped")), None)
    kind = {None: "passed", "failure": "failed", "error": "errors"}.get(
        getattr(outcome, "tag", None), "skipped")
    counts[kind] += 1
    if outcome is not None:
      (skipped if kind == "skipped" else failures).append(
          dict(test=test, message=(outcome.get("message") or "")[:800]))
  entry.update(tests=dict(counts=counts, failures=failures, skipped=skipped),
               measured=[l.strip() for l in output.splitlines() if re.match(r"\s*\[\w+\] ", l)],
               summary=", ".join(f"{v} {k}" for k, v in counts.items() if v))
  if entry["status"] != "ok":
    return _failed(entry, output)
  if not sum(counts.values()):
    return _failed(entry, output, "no test selected")
  if not check.dry_run and any("needs a GPU" in s["message"] for s in skipped):
    return _failed(entry, output, "a GPU test was skipped on a GPU run")
  return entry


def bench_stage(check: Check, peak: float | None) -> dict:
  """`python -m launch.bench`, its table parsed; a training row's MFU is its fraction of
  the measured fp32 matmul peak (a whole percent) times that peak over the bf16 peak."""
  cmd = [sys.executable, "-m", "launch.bench",
         *(FLAGS.bench_args or BENCH_ARGS["dry" if check.dry_run else "gpu"]).split(),
         f"--hf_dir={os.path.join(check.workdir, 'bench_hf')}"]
  # fp32 at "highest" on both sides, or the greedy tokens it asserts equal may differ
  entry, output = check.run("bench", cmd, dict(check.env, JAX_DEFAULT_MATMUL_PRECISION="highest"))
  if entry["status"] == "skipped":
    return entry
  rows = {}
  for line in output.splitlines():
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    if len(cells) == 9 and cells[4].endswith("x") and cells[5].startswith(">="):
      row = dict(model=cells[0], step=cells[1], transformers_tok_s=float(cells[2]),
                 atlas_jax_tok_s=float(cells[3]), ratio=float(cells[4][:-1]), goal=cells[5],
                 torch_first_call_s=float(cells[6]), jax_compile_s=float(cells[7]))
      percents = [int(p) for p in re.findall(r"(\d+)%", cells[8])]
      if percents:
        row["percent_of_matmul_peak"] = dict(zip(("atlas_jax", "transformers", "goal_needs"),
                                                 percents))
      rows[cells[0], cells[1]] = row  # the table is reprinted after each model: last wins
  figures = dict(rows=list(rows.values()), lines=[
      l.strip() for l in output.splitlines()
      if re.match(r"\s*(== |rollout|greedy|decode|S=|matmul peak)", l)])
  peaks = re.search(r"matmul peak \((\w+) \d+\^2\): jnp ([\d.]+) GFLOP/s", output)
  for row in figures["rows"]:
    percent = row.get("percent_of_matmul_peak", {}).get("atlas_jax")
    if peaks and peak and percent is not None:
      row["mfu_bf16_peak"] = round(percent / 100 * float(peaks.group(2)) / 1e3 / peak, 4)
  if "--torch_device=cuda" not in cmd:
    figures["note"] = ("launch.bench ran transformers on the CPU and both sides in fp32: "
                       "its ratios are not GPU against GPU (gpu_bench's are)")
  entry.update(figures=figures, summary="; ".join(f"{r['step']} {r['ratio']:.2f}x"
                                                   for r in figures["rows"]))
  if entry["status"] != "ok" or not rows:
    return _failed(entry, output, "" if rows else "no table rows in its output")
  return entry


def child_stage(check: Check, name: str) -> dict:
  cmd = [sys.executable, "-m", "launch.device_check", f"--child={name}",
         f"--dry_run={check.dry_run}", f"--workdir={check.workdir}",
         f"--peak_tflops={FLAGS.peak_tflops}"]
  entry, output = check.run(name, cmd)
  results = [l[len(RESULT):] for l in output.splitlines() if l.startswith(RESULT)]
  if results:
    entry["figures"] = json.loads(results[-1])
    entry["summary"] = entry["figures"].get("summary", "")
  if name == "devices" and results:
    want, found = ("cpu" if check.dry_run else "gpu"), entry["figures"]["platform"]
    if found != want:
      return _failed(entry, output, f"expected {want} devices, found {found}")
  if entry["status"] != "ok" or not results:
    last = next((l for l in reversed(output.splitlines()) if l.strip()), "")
    return _failed(entry, output, "" if results else f"no result; last line: {last[:300]}")
  return entry


def main(argv):
  del argv
  if FLAGS.child:
    return run_child(FLAGS.child)
  unknown = set(FLAGS.stages) - set(STAGES)
  if unknown:
    raise app.UsageError(f"--stages has {sorted(unknown)}; expected names from {STAGES}")
  check = Check(FLAGS.dry_run, os.path.abspath(FLAGS.workdir),
                FLAGS.budget_s or (1800 if FLAGS.dry_run else 460))
  chosen = [s for s in STAGES if not FLAGS.stages or s in FLAGS.stages]
  print(f"[device_check] {check.report['mode']}: {', '.join(chosen)}; budget "
        f"{check.report['budget_s']:.0f} s; report {check.json_path}", flush=True)
  peak = FLAGS.peak_tflops or None
  for name in ["environment", *chosen]:
    t0 = time.monotonic()
    try:
      if name == "environment":
        entry = environment_stage()
      elif name == "install":
        entry = install_stage(check)
      elif name in TESTS:
        entry = test_stage(check, name)
      elif name == "bench":
        entry = bench_stage(check, peak)
      else:
        entry = child_stage(check, name)
        peak = entry.get("figures", {}).get("bf16_peak_tflops", peak)
    except Exception:  # noqa: BLE001  (a bug in one stage's driver must not stop the rest)
      entry = dict(status="failed", reason="the driver raised", output_tail=traceback.format_exc())
    entry.setdefault("seconds", round(time.monotonic() - t0, 1))
    check.report["stages"][name] = entry
    check.save()
    print(f"[device_check] {name:<15} {entry['status']:<8} {entry['seconds']:6.1f} s  "
          f"{entry.get('summary') or entry.get('reason', '')}", flush=True)
  bad = {n: e["status"] for n, e in check.report["stages"].items() if e["status"] != "ok"}
  check.report["ok"] = not bad
  check.save()
  print(f"[device_check] {'every stage ok' if not bad else f'not ok: {bad}'} in "
        f"{check.report['wall_s']:.0f} s; {check.json_path}", flush=True)
  return 1 if bad else 0


# --- child stages: each runs in its own process, printing RESULT + its figures as it goes --


def run_child(name: str) -> int:
  figures = {}
  for _ in dict(devices=_devices, imports=_imports, gpu_bench=_gpu_bench)[name](figures):
    print(RESULT + json.dumps(figures), flush=True)
  return 1 if figures.get("errors") else 0


def _devices(out: dict):
  import jax
  import torch
  devices = jax.devices()
  d = devices[0]
  print("jax devices:", devices, flush=True)
  out.update(platform=d.platform, device_kind=d.device_kind, count=len(devices),
             jax=jax.__version__, bf16_peak_tflops=bf16_peak(d.device_kind),
             memory_gib=round((d.memory_stats() or {}).get("bytes_limit", 0) / 2**30, 1),
             torch_cuda=torch.cuda.get_device_name(0) if torch.cuda.is_available() else "",
             summary=f"{len(devices)} x {d.device_kind} ({d.platform}), jax {jax.__version__}")
  yield


def _imports(out: dict):
  import importlib
  import pkgutil
  errors = {}

  def attempt(name):
    try:
      return importlib.import_module(name)
    except Exception as e:  # noqa: BLE001  (each failure is a finding)
      errors[name] = f"{type(e).__name__}: {str(e)[:300]}"

  names = [*DEPENDENCIES.values(), "atlas_jax"]
  package = attempt("atlas_jax")
  if package:
    names += [m.name for m in pkgutil.walk_packages(package.__path__, "atlas_jax.", attempt)]
  for name in names:
    attempt(name)
  out.update(modules=len(names), errors=errors,
             summary=f"{len(names) - len(errors)}/{len(names)} modules import")
  yield


def _gpu_bench(out: dict):
  import jax

  from launch import gpu_bench  # imports atlas_jax: only in the child, after the install
  yield from gpu_bench.run(out, dry_run=FLAGS.dry_run, workdir=FLAGS.workdir,
                           peak=bf16_peak(jax.devices()[0].device_kind))


if __name__ == "__main__":
  cli.run(main)
