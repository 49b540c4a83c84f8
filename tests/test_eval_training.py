"""config.eval inside SFT and RL: metrics logged, files written, the best checkpoint kept and
scored again by launch.evaluate's loader, curves drawn."""

import json
import os

import ml_collections
import pytest

from atlas_jax import config as config_lib
from atlas_jax.data import synthetic
from atlas_jax.eval import benchmarks, evaluator, in_training, load
from configs import rl as rl_config
from configs import sft as sft_config
from tests import factories


def _bench(tmp):
  return synthetic.generate_suite(os.path.join(tmp, "bench"), n_per_family=1, seed=9,
                                  split="test")


def _sft_config(tmp, **changes):
  c = sft_config.get_config("tiny")
  c.data.synthetic_per_family = 4
  c.data.synthetic_test_per_family = 1
  c.data.batch_size = 4
  c.data.max_length = 192
  c.data.length_buckets = (128, 192)
  c.data.dataset_dir = os.path.join(tmp, "shared_data")
  c.train.logprob_chunk = 64
  c.train.log_every = 2
  c.train.steps = 4
  c.checkpoint.every = 4
  c.checkpoint.async_save = False
  c.rl.max_new_tokens = 8
  c.eval.data = _bench(tmp)
  c.eval.every = 2
  c.eval.batch_size = 4
  c.eval.keep_best = "accuracy"
  return factories.override(c, changes)


def _rows(workdir, prefix):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(l) for l in f]
  return [r for r in rows if r.get("prefix") == prefix]


@pytest.mark.slow
def test_sft_evaluates_keeps_the_best_and_draws(tmp_path):
  from atlas_jax.sft.loop import train_sft
  c = _sft_config(str(tmp_path))
  workdir = str(tmp_path / "run")
  train_sft(c, workdir)
  evals = _rows(workdir, "eval")
  assert [r["step"] for r in evals] == [2, 4]
  assert {"accuracy", "extraction_failure_rate", "functional_per_answer",
          "mean_length"} <= set(evals[0])
  for step in (2, 4):
    assert os.path.isfile(os.path.join(workdir, "eval", f"step_{step:06d}", "summary.json"))
  best = json.load(open(os.path.join(workdir, "best.json")))
  assert best["metric"] == "accuracy"
  assert best["value"] == max(r["accuracy"] for r in evals)
  assert os.path.getsize(os.path.join(workdir, "curves.png")) > 1000
  # The kept checkpoint scores what was logged at its step.
  ec = load.config_for(os.path.join(workdir, "best"))
  model, params = load.load(ec)
  items, _ = benchmarks.read(c.eval.data)
  summary = evaluator.evaluate(model, params, items, evaluator.Settings.from_config(ec),
                               progress=False)
  logged = next(r for r in evals if r["step"] == best["step"])
  assert summary["accuracy"] == logged["accuracy"]
  assert summary["mean_length"] == logged["mean_length"]


@pytest.mark.slow
def test_rl_evaluates_during_training(tmp_path):
  from atlas_jax.rl.loop import train_rl
  c = rl_config.get_config("tiny")
  c.data.synthetic_per_family = 2
  c.data.synthetic_test_per_family = 1
  c.data.max_length = 128
  c.data.length_buckets = (128,)
  c.data.dataset_dir = os.path.join(str(tmp_path), "shared_data")
  c.train.logprob_chunk = 16
  c.train.log_every = 1
  c.train.steps = 2
  c.checkpoint.every = 2
  c.checkpoint.async_save = False
  c.rl.max_new_tokens = 16
  c.rl.group_size = 2
  c.rl.prompts_per_step = 2
  c.rl.reward.weights = ml_collections.ConfigDict(dict(functional=1.0))
  c.eval.data = _bench(str(tmp_path))
  c.eval.every = 1
  c.eval.batch_size = 4
  c.eval.max_rows = 3
  train_rl(c, str(tmp_path / "run"))
  evals = _rows(str(tmp_path / "run"), "eval")
  assert [r["step"] for r in evals] == [1, 2] and all(r["rows"] == 3 for r in evals)
  assert os.path.getsize(str(tmp_path / "run" / "curves.png")) > 1000


def test_eval_config_is_validated(tmp_path):
  c = _sft_config(str(tmp_path))
  for field, value, message in [("data", "/nope.tsv", "config.eval.data '/nope.tsv' does "
                                 "not exist"),
                                ("prompt", "x", "config.eval.prompt 'x' is not one of"),
                                ("every", -1, "config.eval.every -1 must be >= 0"),
                                ("keep_best", "loss", "config.eval.keep_best 'loss' is not")]:
    bad = _sft_config(str(tmp_path), **{f"eval.{field}": value})
    with pytest.raises(ValueError, match=message):
      config_lib.validate(bad)
  assert in_training.TrainingEval.create(_sft_config(str(tmp_path), **{"eval.data": ""})) \
      is None
  evals = in_training.TrainingEval.create(c)
  assert len(evals.items) == 5
  assert [s for s in range(1, 9) if evals.due(s, 8)] == [2, 4, 6, 8]
  assert [s for s in range(2, 9, 2) if evals.due(s, 8, stride=2)] == [2, 4, 6, 8]
