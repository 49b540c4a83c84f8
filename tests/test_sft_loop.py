"""The SFT loop end to end on the synthetic suite: learning, exact resume, bad records."""

import json
import os
import shutil

import numpy as np
import pytest

from atlas_jax.data import synthetic
from atlas_jax.sft.loop import train_sft
from configs import sft as sft_config
from tests import factories


def _config(tmp, **changes):
  c = sft_config.get_config("tiny")
  c.data.synthetic_per_family = 8
  c.data.synthetic_test_per_family = 2
  c.data.batch_size = 4
  c.data.max_length = 192
  c.data.length_buckets = (128, 192)
  c.train.logprob_chunk = 64
  c.train.log_every = 2
  c.checkpoint.every = 2
  c.checkpoint.async_save = False
  c.data.dataset_dir = os.path.join(tmp, "shared_data")
  return factories.override(c, changes)


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(l) for l in f]


LEARN_STEPS, EVERY = 80, 38
RESUME_AT = LEARN_STEPS // EVERY * EVERY  # 76: the last periodic checkpoint before the end


@pytest.fixture(scope="module")
def learned(tmp_path_factory):
  """One 80-step run on the suite, an (asynchronous) checkpoint every 38 steps and at the
  end, the last two kept (step 38's is removed): the learning check reads its metrics, the
  resume check restarts from step 76. Steps compiled at -O1 (80 of them)."""
  tmp = str(tmp_path_factory.mktemp("sft_learn"))
  c = _config(tmp, **{"train.steps": LEARN_STEPS, "train.log_every": 10,
                      "data.synthetic_per_family": 40, "data.batch_size": 8,
                      "checkpoint.every": EVERY, "checkpoint.async_save": True})
  with factories.optimized_compiles():  # also for the resume check: the same executables
    train_sft(c, os.path.join(tmp, "run"))
    yield tmp, c


@pytest.mark.slow
def test_sft_learns_the_synthetic_suite(learned):
  run = os.path.join(learned[0], "run")
  rows = [r for r in _metrics(run) if r.get("prefix") == "train"]
  first, last = rows[0], rows[-1]
  print(f"\n[sft] loss {first['loss']:.3f} -> {last['loss']:.3f}; functional accuracy "
        f"{first['functional_accuracy']:.2f} -> {last['functional_accuracy']:.2f}; "
        f"{last['tokens_per_s']:.0f} tokens/s")
  assert last["loss"] < 0.5 * first["loss"]
  assert last["functional_accuracy"] >= first["functional_accuracy"] + 0.5
  assert os.listdir(os.path.join(run, "tensorboard"))


@pytest.mark.slow
def test_resume_is_bitwise_exact(learned, tmp_path):
  """A new job started from the run's step-76 checkpoint (the data iterator in its fourth
  epoch, the schedule near its end) ends bitwise equal to the uninterrupted run at step
  80: params, optimizer state, rng and data position."""
  tmp, c = learned
  start = RESUME_AT
  resumed = str(tmp_path / "resumed")
  shutil.copytree(os.path.join(tmp, "run", "checkpoints", str(start)),
                  os.path.join(resumed, "checkpoints", str(start)))
  state, _, _ = train_sft(c, resumed)
  assert int(state.step) == LEARN_STEPS
  assert any(r.get("text") == "resume" for r in _metrics(resumed))
  factories.assert_saved_states_equal(os.path.join(tmp, "run"), resumed, LEARN_STEPS)
  with open(os.path.join(tmp, "run", "checkpoints", str(LEARN_STEPS), "data",
                         "metadata")) as f, \
       open(os.path.join(resumed, "checkpoints", str(LEARN_STEPS), "data", "metadata")) as g:
    assert json.load(f) == json.load(g)  # the iterator stands at the same record


def test_bad_records_are_skipped_counted_and_reported(tmp_path):
  raw = str(tmp_path / "raw")
  train = synthetic.generate_suite(raw, n_per_family=2, seed=0)
  lines = open(train).read().splitlines()
  good = json.loads(lines[0])
  (tmp_path / "raw" / "images" / "bad.png").write_bytes(b"not an image")
  lines += ["{oops", json.dumps(dict(good, id="x1", images=["images/missing.png"])),
            json.dumps(dict(good, id="x2", images=["images/bad.png"])),
            json.dumps(dict(good, id="x3", question="long " * 300)),
            json.dumps(dict(good, id="x4", trajectory="<|Bogus|> \\boxed{A}"))]
  with open(train, "w") as f:
    f.write("\n".join(lines) + "\n")
  # 2 steps of 8 rows see all 11 records that pass the build (one epoch), x3 included.
  c = _config(str(tmp_path), **{"train.steps": 2, "data.batch_size": 8,
                                "data.length_buckets": (192,), "data.train_jsonl": train,
                                "data.dataset_dir": str(tmp_path / "own_data")})
  state, _, _ = train_sft(c, str(tmp_path / "run"))
  assert int(state.step) == 2
  texts = {r["text"]: r["value"] for r in _metrics(str(tmp_path / "run")) if "text" in r}
  for reason in ("malformed_json", "missing_image", "corrupt_image", "unknown_special_token"):
    assert f"'{reason}': 1" in texts["data"]
  assert "too_long=" in texts["skipped_records"]


@pytest.mark.slow
def test_a_relaunch_skips_a_corrupted_checkpoint_and_resumes_exactly(learned, tmp_path):
  """The newest checkpoint (step 80) has 192 bytes flipped in its largest file: the relaunch
  says it skipped it, resumes from step 76 and ends bitwise equal to the uninterrupted run
  (the damaged step is moved aside, not deleted, and saved anew)."""
  tmp, c = learned
  relaunched = str(tmp_path / "relaunched")
  for step in (RESUME_AT, LEARN_STEPS):
    shutil.copytree(os.path.join(tmp, "run", "checkpoints", str(step)),
                    os.path.join(relaunched, "checkpoints", str(step)))
  files = [os.path.join(d, f) for d, _, fs in
           os.walk(os.path.join(relaunched, "checkpoints", str(LEARN_STEPS), "state")) for f in fs]
  largest = max(files, key=os.path.getsize)
  with open(largest, "r+b") as f:
    f.seek(os.path.getsize(largest) // 2)
    data = f.read(192)
    f.seek(os.path.getsize(largest) // 2)
    f.write(bytes(b ^ 0xFF for b in data))
  with factories.optimized_compiles():
    state, _, _ = train_sft(c, relaunched)
  assert int(state.step) == LEARN_STEPS
  texts = [r for r in _metrics(relaunched) if "text" in r]
  skipped = [r["value"] for r in texts if r["text"] == "resume_skipped"]
  assert len(skipped) == 1 and f"step {LEARN_STEPS}" in skipped[0], skipped
  assert any(r["text"] == "resume" and f"restored step {RESUME_AT}" in r["value"] for r in texts)
  assert os.path.isdir(os.path.join(relaunched, "checkpoints", f"{LEARN_STEPS}.damaged"))
  factories.assert_saved_states_equal(os.path.join(tmp, "run"), relaunched, LEARN_STEPS)
