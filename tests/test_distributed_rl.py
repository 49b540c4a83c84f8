"""Two processes on localhost (jax.distributed, 2 CPU devices each) run the RL recipe through
`python -m launch.train` from an SFT checkpoint: 3 steps, a checkpoint at 2 and at the end.
Each process decodes and scores only its own rows; the rewards and every logged mean equal a
one-process run (4 devices, the same mesh) fed the same global prompt batches; a second
two-process job started from the step-2 checkpoint ends bitwise equal to the
uninterrupted one at step 3."""

import json
import os
import shutil
import sys
import textwrap

import numpy as np
import pytest

from atlas_jax.sft.loop import train_sft
from configs import sft as sft_config
from tests import factories

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROCESSES, STEPS, PROMPTS, GROUP = 2, 3, 4, 4
TIMEOUT_S = 900

# Runs launch.train, counting the completions this process decodes. With ATLAS_TWO_SHARDS=1
# (one process), each prompt batch is the two processes' shards side by side: the global
# batch the two-process run samples.
DRIVER = textwrap.dedent("""
    import atexit, sys
    import numpy as np
    from atlas_jax.data import pipeline
    from atlas_jax.rl import rollout

    decoded = [0]
    decode = rollout.decode_completions
    def counting(tokenizer, tokens, mask):
      decoded[0] += len(tokens)
      return decode(tokenizer, tokens, mask)
    rollout.decode_completions = counting
    atexit.register(lambda: print(f"[rows decoded] {decoded[0]}", flush=True))

    class TwoShards:
      def __init__(self, source, batch_size, **kw):
        self.shards = [rl_pipeline(source, batch_size=batch_size // 2, shard_index=i,
                                   shard_count=2, **kw) for i in range(2)]
        self.skipped = self.shards[0].skipped
      def __iter__(self):
        return self
      def __next__(self):
        a, b = (next(s) for s in self.shards)
        return {k: np.concatenate([a[k], b[k]]) for k in a}
      def get_state(self):
        return [s.get_state() for s in self.shards]
      def set_state(self, state):
        for s, x in zip(self.shards, state):
          s.set_state(x)

    rl_pipeline = pipeline.rl_pipeline
    if "--two_shards" in sys.argv:
      sys.argv.remove("--two_shards")
      pipeline.rl_pipeline = TwoShards
    from absl import app
    from launch import train
    app.run(train.main)
""")


def _launch(tmp, workdir: str, *flags: str, processes: int = 1, devices: int = 2,
            two_shards: bool = False) -> list[str]:
  """Runs the driver in `processes` processes; returns their stdouts."""
  driver = os.path.join(tmp, "driver.py")
  with open(driver, "w") as f:
    f.write(DRIVER)
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
             XLA_FLAGS=factories.xla_flags(devices))  # the session's compilation cache
  flags = [*flags, f"--workdir={workdir}", "--config.checkpoint.async_save=False"]
  if two_shards:
    flags.append("--two_shards")
  if processes > 1:
    port = factories.free_port()
    flags += ["--config.distributed.initialize=True",
              f"--config.distributed.coordinator_address=localhost:{port}",
              f"--config.distributed.num_processes={processes}"]
  return factories.run_processes(
      [[sys.executable, driver, *flags]
       + ([f"--config.distributed.process_id={i}"] if processes > 1 else [])
       for i in range(processes)], cwd=ROOT, env=env, timeout=TIMEOUT_S)


def _sft(tmp) -> str:
  """The SFT checkpoint RL starts from: 2 steps, in this process (its steps are not what
  is tested here)."""
  c = factories.override(sft_config.get_config("tiny"), {
      "data.synthetic_per_family": 4, "data.synthetic_test_per_family": 1,
      "data.dataset_dir": os.path.join(tmp, "data"), "data.batch_size": 4,
      "data.max_length": 192, "data.length_buckets": (192,), "train.logprob_chunk": 32,
      "train.steps": 2, "checkpoint.every": 2, "checkpoint.async_save": False})
  workdir = os.path.join(tmp, "sft")
  train_sft(c, workdir)
  return workdir


def _rl_flags(tmp, sft: str, *extra: str) -> list[str]:
  return [f"--config={os.path.join(ROOT, 'configs', 'rl.py')}:tiny",
          f"--config.model.init_checkpoint={os.path.join(sft, 'checkpoints')}",
          f"--config.tokenizer.path={os.path.join(sft, 'tokenizer')}",
          "--config.data.synthetic_per_family=4", "--config.data.synthetic_test_per_family=1",
          f"--config.data.dataset_dir={os.path.join(tmp, 'data')}",
          "--config.data.max_length=192", "--config.data.length_buckets=(192,)",
          "--config.train.logprob_chunk=32", "--config.rl.max_new_tokens=32",
          f"--config.rl.group_size={GROUP}", f"--config.rl.prompts_per_step={PROMPTS}",
          f"--config.train.steps={STEPS}", "--config.train.log_every=1",
          "--config.checkpoint.every=2", "--config.mesh.data=2", *extra]


def _rl_rows(workdir: str) -> list[dict]:
  """The logged RL metrics per step, timings left out."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  timing = ("per_s", "seconds", "time", "elapsed")
  return [{k: v for k, v in r.items() if not any(t in k for t in timing)}
          for r in rows if r.get("prefix") == "rl"]


@pytest.mark.slow
def test_two_process_rl_matches_one_process_and_resumes_exactly(tmp_path):
  tmp = str(tmp_path)
  sft = _sft(tmp)
  straight, resumed, single = (os.path.join(tmp, n) for n in ("straight", "resumed", "one"))
  full = _launch(tmp, straight, *_rl_flags(tmp, sft), processes=PROCESSES)
  shutil.copytree(os.path.join(straight, "checkpoints", "2"),
                  os.path.join(resumed, "checkpoints", "2"))
  second = _launch(tmp, resumed, *_rl_flags(tmp, sft), processes=PROCESSES)
  _launch(tmp, single, *_rl_flags(tmp, sft), devices=4, two_shards=True)

  # Each process decoded (and scored) its own rows only: half of each step's rollouts.
  for job, steps in ((full, STEPS), (second, STEPS - 2)):
    for out in job:
      assert f"[rows decoded] {steps * PROMPTS * GROUP // PROCESSES}" in out

  rows = {name: _rl_rows(d) for name, d in (("resumed", resumed), ("straight", straight),
                                            ("one process", single))}
  assert [r["step"] for r in rows["straight"]] == list(range(1, STEPS + 1))
  print("\n[rl, 2 processes] reward", [round(r["reward"], 3) for r in rows["straight"]])
  assert rows["resumed"] == rows["straight"][2:]
  for two, one in zip(rows["straight"], rows["one process"], strict=True):
    # The same rollouts: another completion would move a mean reward by >= 1e-3.
    np.testing.assert_allclose(two["reward"], one["reward"], rtol=1e-6)
    assert two.keys() == one.keys()
    for k in two.keys() - {"prefix"}:
      np.testing.assert_allclose(two[k], one[k], rtol=1e-5, atol=1e-6, err_msg=k)

  factories.assert_saved_states_equal(resumed, straight, STEPS)
