"""Two processes on localhost (jax.distributed, CPU collectives over gloo, 2 CPU devices
each) train SFT together through `python -m launch.train`: 2 steps, stop, resume, step 3."""

import json
import math
import os
import sys

import jax
import numpy as np
import pytest

from atlas_jax import checkpoint as checkpoint_lib
from atlas_jax.model import abstract_params
from atlas_jax.model import config as config_lib
from tests import factories

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROCESSES, STEPS, GLOBAL_BATCH = 2, 3, 4
TIMEOUT_S = 600


def _launch(workdir: str, *overrides: str) -> list[str]:
  """Runs the training command in PROCESSES processes; returns their stdouts. Compiled steps
  are cached next to the workdir, so a second launch skips most compilation."""
  port = factories.free_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
             XLA_FLAGS=factories.xla_flags(2),
             JAX_COMPILATION_CACHE_DIR=os.path.join(os.path.dirname(workdir), "jax_cache"))
  flags = [f"--config={os.path.join(ROOT, 'configs', 'sft.py')}:tiny", f"--workdir={workdir}",
           "--config.data.synthetic_per_family=4", "--config.data.synthetic_test_per_family=2",
           f"--config.data.batch_size={GLOBAL_BATCH}", "--config.data.max_length=192",
           "--config.data.length_buckets=(192,)", "--config.train.logprob_chunk=64",
           f"--config.train.steps={STEPS}", "--config.train.log_every=1",
           f"--config.checkpoint.every={STEPS}", "--config.mesh.data=2",
           "--config.distributed.initialize=True",
           f"--config.distributed.coordinator_address=localhost:{port}",
           f"--config.distributed.num_processes={PROCESSES}", *overrides]
  return factories.run_processes(
      [[sys.executable, "-m", "launch.train", *flags, f"--config.distributed.process_id={i}"]
       for i in range(PROCESSES)], cwd=ROOT, env=env, timeout=TIMEOUT_S)


@pytest.mark.slow
def test_two_processes_train_checkpoint_and_resume(tmp_path):
  workdir = str(tmp_path / "run")
  first = _launch(workdir, "--config.train.stop_after=2")
  second = _launch(workdir)
  ckpt_dir = os.path.join(workdir, "checkpoints")
  assert sorted(os.listdir(ckpt_dir)) == ["2", "3"]  # no half-written step directories

  # One checkpoint per step, written cooperatively: each process wrote its own shards.
  state_dir = os.path.join(ckpt_dir, "3", "state")
  assert os.path.isfile(os.path.join(state_dir, "commit_success.txt"))
  assert {f"ocdbt.process_{i}" for i in range(PROCESSES)} <= set(os.listdir(state_dir))
  # Each process's data iterator state (its own shard, GLOBAL_BATCH / PROCESSES rows a step).
  with open(os.path.join(ckpt_dir, "3", "data", "metadata")) as f:
    data = json.load(f)
  assert data["kind"] == "per_process" and len(data["value"]) == PROCESSES
  for state in data["value"]:
    assert state["value"]["next_index"] == STEPS * GLOBAL_BATCH // PROCESSES

  # The dataset, the tokenizer and the metrics were written by process 0 only.
  assert "[data] built" in first[0]
  assert not any("[data] built" in out or "[train]" in out for out in (first[1], second[1]))
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  train = [r for r in records if r.get("prefix") == "train"]
  assert [r["step"] for r in train] == list(range(1, STEPS + 1))
  assert sum(r.get("text") == "resume" for r in records) == 1
  for r in train:
    assert all(math.isfinite(r[k]) for k in ("loss", "grad_norm", "tokens"))
    assert r["loss"] > 0 and r["tokens"] > 0 and r["skipped_step"] == 0
  print(f"\n[2 processes] loss {[round(r['loss'], 3) for r in train]}")

  # The checkpoint is whole: one process restores every parameter, all finite.
  extra = checkpoint_lib.read_extra(ckpt_dir, STEPS)
  model_config = config_lib.from_dict(extra["model_config"])
  params = checkpoint_lib.restore_params_only(ckpt_dir, STEPS, abstract_params(model_config))
  leaves = jax.tree.leaves(params)
  assert leaves and all(np.isfinite(np.asarray(x)).all() for x in leaves)
