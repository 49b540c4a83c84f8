"""The RL loop end to end on the synthetic suite: it learns, and it resumes exactly."""

import json
import os
import shutil

import ml_collections
import numpy as np
import pytest

from atlas_jax.rl.loop import train_rl
from configs import rl as rl_config
from tests import factories


def _config(tmp, **changes):
  """A tiny RL run from a random tiny model whose only reward is using functional tokens:
  a random policy emits one of the 5 in about 1 of 4 completions, so a working policy
  gradient has room to raise it within a few steps."""
  c = rl_config.get_config("tiny")
  c.data.synthetic_per_family = 4
  c.data.synthetic_test_per_family = 1
  c.data.max_length = 128
  c.data.length_buckets = (128,)
  c.data.dataset_dir = os.path.join(tmp, "shared_data")
  c.train.logprob_chunk = 32
  c.train.log_every = 1
  c.rl.max_new_tokens = 32
  c.rl.group_size = 8
  c.rl.prompts_per_step = 2
  c.rl.reward.weights = ml_collections.ConfigDict(dict(functional=1.0))
  c.optim.lr = 2e-2
  c.optim.warmup_steps = 1
  c.checkpoint.async_save = False
  return factories.override(c, changes)


def _rewards(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(l) for l in f]
  return [r["reward"] for r in rows if r.get("prefix") == "rl"]


STEPS, RESUME_AT = 16, 2


def test_two_steps_log_the_update_and_the_dilution_diagnostic(tmp_path):
  """The RL loop's fast-tier check: two steps run, and each logs the reward, its parts and
  the gradient-dilution diagnostic (functional rows vs the others). (Before the module's
  -O1 fixture, which stays on until the module ends: two steps compile faster at -O0.)"""
  c = _config(str(tmp_path), **{"train.steps": 2, "checkpoint.every": 2,
                                "rl.max_new_tokens": 16, "train.logprob_chunk": 16,
                                "rl.group_size": 4})
  state, last, _ = train_rl(c, str(tmp_path / "run"))
  assert int(state.step) == 2
  with open(os.path.join(str(tmp_path / "run"), "metrics.jsonl")) as f:
    rows = [json.loads(l) for l in f if '"prefix": "rl"' in l]
  assert [r["step"] for r in rows] == [1, 2]
  for key in ("reward", "reward_functional", "loss", "grad_norm", "dilution_ratio",
              "functional_row_grad_norm", "other_row_grad_norm_mean"):
    assert all(np.isfinite(r[key]) for r in rows), key
  assert all(r["other_row_grad_norm_mean"] > 0 for r in rows)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  """One uninterrupted 16-step run, a checkpoint every 2 steps (all kept): the learning check
  reads its rewards, the resume check restarts from its step-2 checkpoint."""
  tmp = str(tmp_path_factory.mktemp("rl_straight"))
  workdir = os.path.join(tmp, "run")
  c = _config(tmp, **{"train.steps": STEPS, "checkpoint.every": RESUME_AT,
                      "checkpoint.keep": STEPS // RESUME_AT})
  with factories.optimized_compiles():  # also for the resume check: the same executables
    train_rl(c, workdir)
    yield tmp, workdir


@pytest.mark.slow
def test_short_rl_run_raises_mean_reward(straight):
  rewards = _rewards(straight[1])
  first, last = np.mean(rewards[:4]), np.mean(rewards[-4:])
  print(f"\n[rl] mean reward, first 4 steps {first:.3f} -> last 4 steps {last:.3f}")
  assert len(rewards) == STEPS
  assert last > first + 0.2


@pytest.mark.slow
def test_rl_resume_is_exact(straight, tmp_path):
  """A new job started from the straight run's step-2 checkpoint, stopped after 2 more
  steps, equals the straight run at step 4: params, optimizer state, rng, and the logged
  rewards of steps 3 and 4 (the resumed job restores the data iterator too)."""
  tmp, workdir = straight
  resumed_dir = str(tmp_path / "resumed")
  shutil.copytree(os.path.join(workdir, "checkpoints", str(RESUME_AT)),
                  os.path.join(resumed_dir, "checkpoints", str(RESUME_AT)))
  c = _config(tmp, **{"train.steps": STEPS, "checkpoint.every": RESUME_AT,
                      "train.stop_after": RESUME_AT})
  resumed, _, _ = train_rl(c, resumed_dir)
  end = 2 * RESUME_AT
  assert int(resumed.step) == end
  factories.assert_saved_states_equal(workdir, resumed_dir, end)
  assert _rewards(resumed_dir) == _rewards(workdir)[RESUME_AT:end]
