"""The SFT loop end to end on the synthetic suite: learning, exact resume, bad records."""

import json
import os

import jax
import numpy as np
import pytest

from atlas_jax.data import synthetic
from atlas_jax.train.loop import train_sft
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


@pytest.mark.slow
def test_resume_is_bitwise_exact(tmp_path):
  """4 steps, stop, resume for 4 more == 8 uninterrupted steps (params and data order)."""
  a, b = str(tmp_path / "a"), str(tmp_path / "b")
  train_sft(_config(str(tmp_path), **{"train.steps": 8, "train.stop_after": 4}), a)
  resumed, _, _ = train_sft(_config(str(tmp_path), **{"train.steps": 8}), a)
  straight, _, _ = train_sft(_config(str(tmp_path), **{"train.steps": 8}), b)
  assert int(resumed.step) == int(straight.step) == 8
  for x, y in zip(jax.tree.leaves(resumed.params), jax.tree.leaves(straight.params)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  for x, y in zip(jax.tree.leaves(resumed.opt_state), jax.tree.leaves(straight.opt_state)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert any(r.get("text") == "resume" for r in _metrics(a))


@pytest.mark.slow
def test_sft_learns_the_synthetic_suite(tmp_path):
  c = _config(str(tmp_path), **{"train.steps": 80, "train.log_every": 10,
                                "data.synthetic_per_family": 40, "data.batch_size": 8,
                                "checkpoint.every": 80})
  train_sft(c, str(tmp_path / "run"))
  rows = [r for r in _metrics(str(tmp_path / "run")) if r.get("prefix") == "train"]
  first, last = rows[0], rows[-1]
  print(f"\n[sft] loss {first['loss']:.3f} -> {last['loss']:.3f}; functional accuracy "
        f"{first['functional_accuracy']:.2f} -> {last['functional_accuracy']:.2f}; "
        f"{last['tokens_per_s']:.0f} tokens/s")
  assert last["loss"] < 0.5 * first["loss"]
  assert last["functional_accuracy"] >= first["functional_accuracy"] + 0.5
  assert os.listdir(tmp_path / "run" / "tensorboard")


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
  c = _config(str(tmp_path), **{"train.steps": 6, "data.train_jsonl": train,
                                "data.dataset_dir": str(tmp_path / "own_data")})
  state, _, _ = train_sft(c, str(tmp_path / "run"))
  assert int(state.step) == 6
  texts = {r["text"]: r["value"] for r in _metrics(str(tmp_path / "run")) if "text" in r}
  for reason in ("malformed_json", "missing_image", "corrupt_image", "unknown_special_token"):
    assert f"'{reason}': 1" in texts["data"]
  assert "too_long=" in texts["skipped_records"]
