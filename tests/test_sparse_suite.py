"""The synthetic suite's sparse style (data.synthetic.SuiteStyle), which the sparse
ablation (configs/ablate.py:sparse) trains on: the default style writes the plain suite
byte for byte; the sparse one keeps a functional token in about a fifth of the
trajectories (three in ten of them another family's), keeps images and answers, is well
formed, and is long (>= 40 tokens per functional token); an SFT stage on it leaves the model
using functional tokens rarely, where the same SFT on the plain suite uses them always."""

import hashlib
import json
import os

import numpy as np
import pytest

from atlas_jax import ablate, demo
from atlas_jax.data import synthetic
from atlas_jax.data.tokenizer import build_tokenizer
from atlas_jax.functional_tokens import FUNCTIONAL_TOKENS, TASK_TOKENS
from atlas_jax.rl import loop as rl_loop
from atlas_jax.rl import rewards
from atlas_jax.sft import loop as sft_loop
from configs import ablate as ablate_config

# sha256 of generate_suite(n_per_family=3, seed=0)'s train.jsonl, written before the style
# options existed: the plain suite (and so every cached dataset built from it) is unchanged.
PLAIN_SHA256 = "3b9702592e5671e210c47596beeed04e6e5a98b9c29e1c9f2f2317401bdc1ff6"


def _records(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def _tokens_in(text):
  return [t for t in FUNCTIONAL_TOKENS for _ in range(text.count(t))]


def test_default_style_writes_the_plain_suite(tmp_path):
  path = synthetic.generate_suite(str(tmp_path), n_per_family=3, seed=0)
  with open(path, "rb") as f:
    assert hashlib.sha256(f.read()).hexdigest() == PLAIN_SHA256
  path = synthetic.generate_suite(str(tmp_path / "b"), n_per_family=3, seed=0,
                                  style=synthetic.SuiteStyle())
  with open(path, "rb") as f:
    assert hashlib.sha256(f.read()).hexdigest() == PLAIN_SHA256


def test_sparse_style_is_sparse_long_and_well_formed(tmp_path):
  style = ablate.suite_style(ablate_config.get_config("sparse"))
  n = 60
  plain = _records(synthetic.generate_suite(str(tmp_path / "plain"), n_per_family=n, seed=0))
  sparse = _records(synthetic.generate_suite(str(tmp_path / "sparse"), n_per_family=n, seed=0,
                                             style=style))
  for a, b in zip(plain, sparse, strict=True):  # same pictures, questions and answers
    assert {k: v for k, v in a.items() if k != "trajectory"} == {
        k: v for k, v in b.items() if k != "trajectory"}
    with open(os.path.join(tmp_path, "plain", a["images"][0]), "rb") as fa, open(
        os.path.join(tmp_path, "sparse", b["images"][0]), "rb") as fb:
      assert fa.read() == fb.read()
  assert all(len(_tokens_in(r["trajectory"])) == 1 for r in plain)

  tokens = [_tokens_in(r["trajectory"]) for r in sparse]
  assert all(len(t) <= 1 for t in tokens)
  per_trajectory = np.mean([len(t) for t in tokens])
  assert 0.1 <= per_trajectory <= 0.3, per_trajectory  # the configured 0.2
  right = [t[0] == TASK_TOKENS[r["task"]] for t, r in zip(tokens, sparse) if t]
  assert 0.5 <= np.mean(right) <= 0.9, np.mean(right)  # the configured 0.7

  tokenizer = build_tokenizer(str(tmp_path / "tokenizer"))
  lengths = np.array([len(tokenizer(r["trajectory"])["input_ids"]) for r in sparse])
  with_token = np.array([bool(t) for t in tokens])
  assert lengths[with_token].min() >= 40  # every functional token is in >= 40 tokens
  assert lengths.sum() / sum(map(len, tokens)) >= 200  # the whole suite: a small share
  assert lengths.max() <= ablate_config.get_config("sparse").rl.max_new_tokens - 8

  cfg = rewards.default_reward_config()
  for r, t in zip(sparse, tokens):
    sample = rewards.Sample(r["answer"], "choice", tuple(r["choices"]), task=r["task"])
    assert rewards.format_reward(r["trajectory"], sample, cfg) == 1.0
    assert rewards.accuracy(r["trajectory"], sample, cfg) == 1.0
    want = 0.0 if not t else 1.0 if t[0] == TASK_TOKENS[r["task"]] else 0.5
    assert rewards.functional_reward(r["trajectory"], sample, cfg) == want


def _sft_eval(arg, workdir, steps):
  """Held-out greedy evaluation after `steps` SFT steps of the recipe's SFT stage."""
  c = ablate_config.get_config(arg)
  c.data.synthetic_per_family = 40
  c.data.synthetic_test_per_family = 8
  c.data.length_buckets = (c.data.max_length,)
  c.rl.eval_prompts = 20
  c.rl.eval_batch_size = 20
  c.checkpoint.async_save = False
  c.demo.sft.steps = steps
  c.demo.sft.lr = 3e-3  # configs/sft.py:tiny's rate: the text in few steps (not the images)
  c.demo.sft.log_every = steps
  c = ablate.with_suite(c, workdir)
  with ablate.counting_correct_tokens():
    state, _, run = sft_loop.train_sft(demo.stage_config(c, "sft", workdir),
                                       os.path.join(workdir, "sft"))
    return rl_loop.evaluate_held_out(run, state.params, c)


@pytest.mark.slow
def test_sparse_sft_stage_leaves_functional_tokens_sparse(tmp_path):
  steps = 120
  dense = _sft_eval("dense", str(tmp_path / "dense"), steps)
  sparse = _sft_eval("sparse", str(tmp_path / "sparse"), steps)
  # The plain suite's SFT learns to place its family's token in that many steps (so the
  # measurement sees tokens where they are taught) ...
  assert dense["functional_per_completion"] >= 0.8, dense
  assert dense[ablate.CORRECT] >= 0.5 * dense["functional_per_completion"], dense
  # ... the sparse suite's leaves them rare (issue 29: < 0.3 per completion).
  assert sparse["functional_per_completion"] < 0.3, sparse
  assert sparse["completion_length"] > dense["completion_length"], (sparse, dense)
