"""The GRPO / LA-GRPO ablation end to end at a tiny size: every variant x seed runs, the
table has every column, grpo really has alpha 0, and a rerun skips finished runs; the
sparse recipe trains on its own suite, has a row per alpha and fills every column."""

import json
import os

import numpy as np
import pytest

from atlas_jax import ablate
from atlas_jax import config as config_lib
from configs import ablate as ablate_config
from tests import factories


def _config(arg="dense", **changes):
  c = ablate_config.get_config(arg)
  c.data.synthetic_per_family = 4
  c.data.synthetic_test_per_family = 1
  c.data.batch_size = 2
  c.data.length_buckets = (c.data.max_length,)  # one shape to compile
  c.train.logprob_chunk = 48
  c.rl.max_new_tokens = 48
  c.rl.group_size = 2
  c.rl.prompts_per_step = 2
  c.rl.eval_prompts = 3
  c.rl.eval_batch_size = 4
  c.checkpoint.async_save = False
  c.demo.sft.steps = 2
  c.demo.rl.steps = 2
  c.demo.rl.warmup_steps = 1
  c.ablate.seeds = (0, 1)
  return factories.override(c, changes)


def _rl_rows(directory):
  with open(os.path.join(directory, "metrics.jsonl")) as f:
    return [r for r in map(json.loads, f) if r.get("prefix") == "rl"]


@pytest.mark.slow
def test_ablation_runs_every_variant_and_seed(tmp_path, capsys):
  workdir = str(tmp_path / "ablate")
  c = _config()
  result = ablate.run_ablation(c, workdir)

  with open(os.path.join(workdir, "ablation.txt")) as f:
    header = f.readline()
  for _, name in ablate.COLUMNS:
    assert name in header
  for name in ("variant", "alpha", "anchor", "seeds", "format", "dilution mean"):
    assert name in header
  with open(os.path.join(workdir, "ablation.png"), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  with open(os.path.join(workdir, "ablation.json")) as f:
    saved = json.load(f)
  assert saved["columns"] == [k for k, _ in ablate.COLUMNS]
  names = {"grpo": "grpo", "la_grpo_pg": "la_grpo_pg_a0.1",
           "la_grpo_nll_pos": "la_grpo_nll_pos_a0.1"}
  assert list(saved["summary"]) == list(names.values())
  assert not os.path.exists(os.path.join(workdir, "suite"))  # the demo's suite

  for variant, name in names.items():
    runs = result["runs"][name]
    assert [r["settings"]["seed"] for r in runs] == [0, 1]
    for r in runs:
      seed = r["settings"]["seed"]
      rows = _rl_rows(ablate.run_dir(workdir, name, seed))
      assert [row["step"] for row in rows] == [1, 2]
      assert len(r["curves"]["dilution_ratio"][1]) == 2
      alpha = r["settings"]["alpha"]
      assert alpha == (0.0 if variant == "grpo" else c.ablate.alphas[0])
      assert r["settings"]["anchor"] == ("nll_pos" if variant == "la_grpo_nll_pos" else "pg")
      for row in rows:  # beta is 0: loss = pg_loss + alpha * anchor_loss
        np.testing.assert_allclose(row["loss"], row["pg_loss"] + alpha * row["anchor_loss"],
                                   rtol=1e-5, atol=1e-7)
        if variant == "grpo":
          assert row["loss"] == row["pg_loss"]
    cols = result["summary"][name]
    assert set(cols) == {k for k, _ in ablate.COLUMNS}
    assert cols["accuracy"]["n"] == 2 and cols["dilution_ratio_mean"]["n"] == 2
  # Step 1 samples from the same SFT params: one seed gives every variant the same prompts
  # and rollouts (equal entropy), another seed others.
  step1 = {(v, s): _rl_rows(ablate.run_dir(workdir, v, s))[0] for v in names.values()
           for s in (0, 1)}
  for seed in (0, 1):
    for v in names.values():
      for k in ("entropy", "completion_length", "reward"):
        assert step1[(v, seed)][k] == pytest.approx(step1[("grpo", seed)][k], rel=1e-5)
  assert step1[("grpo", 0)]["entropy"] != step1[("grpo", 1)]["entropy"]

  capsys.readouterr()
  again = ablate.run_ablation(c, workdir)
  out = capsys.readouterr().out
  assert out.count("skipped") == 1 + 2 * len(ablate.VARIANTS)
  assert again["summary"] == result["summary"]


@pytest.mark.slow
def test_sparse_recipe_fills_every_column(tmp_path):
  workdir = str(tmp_path / "sparse")
  c = _config("sparse", **{"ablate.variants": ("grpo", "la_grpo_nll_pos"),
                           "ablate.alphas": (0.1, 0.3)})
  assert c.ablate.suite.token_rate < 1 and c.ablate.suite.filler_sentences > 0
  result = ablate.run_ablation(c, workdir)

  with open(os.path.join(workdir, "suite", "train.jsonl")) as f:  # the sparse suite trained on
    records = [json.loads(line) for line in f]
  assert sum("<|" in r["trajectory"] for r in records) < len(records)
  names = ["grpo", "la_grpo_nll_pos_a0.1", "la_grpo_nll_pos_a0.3"]
  assert list(result["summary"]) == names
  with open(os.path.join(workdir, "ablation.txt")) as f:
    table = f.read().splitlines()
  header = table[0]
  for _, heading in ablate.COLUMNS:
    assert heading in header
  for name in names + ["sft (start)"]:
    assert sum(line.startswith(name + " ") for line in table) == 1
  shares = ("functional_right_share", "train_right_share")
  for name in names:
    cols = result["summary"][name]
    assert set(cols) == {k for k, _ in ablate.COLUMNS}
    for key, col in cols.items():
      if key not in shares:  # every run gives a finite value
        assert col["n"] == 2 and np.isfinite(col["mean"]) and np.isfinite(col["std"]), key
    for r in result["runs"][name]:
      alpha = r["settings"]["alpha"]
      assert alpha == {"grpo": 0.0, "la_grpo_nll_pos_a0.1": 0.1, "la_grpo_nll_pos_a0.3": 0.3}[name]
      for key in ("functional_per_completion", ablate.CORRECT, "accuracy", "format"):
        assert key in r["eval"]
      # The right-token count never exceeds the functional-token count, on the held-out
      # split and in every RL step; the share is their ratio, or nan without tokens.
      func, right = r["eval"]["functional_per_completion"], r["eval"][ablate.CORRECT]
      assert 0 <= right <= func
      if func > 0:
        assert r["functional_right_share"] == pytest.approx(right / func)
      else:
        assert np.isnan(r["functional_right_share"])
      steps, train_func = r["curves"]["functional_per_completion"]
      assert steps == [1, 2]
      assert np.all(np.asarray(r["curves"][f"reward_{ablate.CORRECT}"][1]) <= train_func)
      assert r["train_functional_first"] == train_func[0]
      assert r["train_functional_last"] == train_func[-1]
      for row in _rl_rows(ablate.run_dir(workdir, name, r["settings"]["seed"])):
        np.testing.assert_allclose(row["loss"], row["pg_loss"] + alpha * row["anchor_loss"],
                                   rtol=1e-5, atol=1e-7)
  assert "sft" in result and result["sft"]["row"]["train_functional_first"]["n"] == 2
  with open(os.path.join(workdir, "ablation.png"), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  # the reward component is registered only while the ablation runs
  assert ablate.CORRECT not in ablate.rewards_lib.REWARDS


def test_correct_token_uses_counts_the_task_token():
  with ablate.counting_correct_tokens():
    _, parts = ablate.rewards_lib.compute_rewards(
        ["a\n<|Line|>\nb \\boxed{A}", "a\n<|Text|>\nb \\boxed{A}", "b \\boxed{A}"],
        [ablate.rewards_lib.Sample("A", task="line_length")] * 3,
        ablate.rewards_lib.default_reward_config())
  np.testing.assert_array_equal(parts[ablate.CORRECT], [1.0, 0.0, 0.0])
  np.testing.assert_array_equal(parts["functional"], [1.0, 0.5, 0.0])
  assert ablate.CORRECT not in ablate.rewards_lib.REWARDS


def test_configs_and_rows():
  dense, sparse, sweep = (ablate_config.get_config(a) for a in ablate_config.VARIANTS)
  for c in (dense, sparse, sweep):
    config_lib.validate(c)
  assert ablate.suite_style(dense).plain and not ablate.suite_style(sparse).plain
  assert list(ablate.rows(sparse)) == ["grpo", "la_grpo_pg_a0.1", "la_grpo_nll_pos_a0.1"]
  sweep_rows = ablate.rows(sweep)
  assert [r["alpha"] for r in sweep_rows.values()] == [0.0, 0.02, 0.05, 0.1, 0.3]
  assert {r["anchor"] for r in sweep_rows.values() if r["alpha"]} == {"nll_pos"}
  # the sweep reuses the sparse recipe's SFT run and its nll_pos runs (same workdir)
  shared = lambda c: {k: v for k, v in c.to_dict().items() if k != "ablate"}
  assert shared(sweep) == shared(sparse)
  assert dict(sweep.ablate.suite) == dict(sparse.ablate.suite)
  with pytest.raises(ValueError, match="variant 'sprase'"):
    ablate_config.get_config("sprase")


def test_bad_ablate_group_is_refused():
  with pytest.raises(ValueError, match="config.ablate.variants has 'ppo'"):
    config_lib.validate(_config(**{"ablate.variants": ("grpo", "ppo")}))
  with pytest.raises(ValueError, match="config.ablate.seeds"):
    config_lib.validate(_config(**{"ablate.seeds": (1, 1)}))
  with pytest.raises(ValueError, match="config.ablate.alphas 0"):
    config_lib.validate(_config(**{"ablate.alphas": (0.0,)}))
  with pytest.raises(ValueError, match="config.ablate.alphas"):
    config_lib.validate(_config(**{"ablate.alphas": (0.1, 0.1)}))
  c = _config("sparse")
  c.ablate.suite.token_rate = 1.5
  with pytest.raises(ValueError, match="config.ablate.suite.token_rate 1.5"):
    config_lib.validate(c)
