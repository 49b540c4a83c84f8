"""The GRPO / LA-GRPO ablation end to end at a tiny size: every variant x seed runs, the
table has every column, grpo really has alpha 0, and a rerun skips finished runs."""

import json
import os

import numpy as np
import pytest

from atlas_jax import ablate
from atlas_jax import config as config_lib
from configs import ablate as ablate_config
from tests import factories


def _config(**changes):
  c = ablate_config.get_config()
  c.data.synthetic_per_family = 4
  c.data.synthetic_test_per_family = 1
  c.data.batch_size = 2
  c.data.length_buckets = (192,)  # one shape to compile
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
  assert set(saved["summary"]) == set(ablate.VARIANTS)

  for variant in ablate.VARIANTS:
    runs = result["runs"][variant]
    assert [r["settings"]["seed"] for r in runs] == [0, 1]
    for r in runs:
      seed = r["settings"]["seed"]
      rows = _rl_rows(ablate.run_dir(workdir, variant, seed))
      assert [row["step"] for row in rows] == [1, 2]
      assert len(r["curves"]["dilution_ratio"][1]) == 2
      alpha = r["settings"]["alpha"]
      assert alpha == (0.0 if variant == "grpo" else c.ablate.alpha)
      assert r["settings"]["anchor"] == ("nll_pos" if variant == "la_grpo_nll_pos" else "pg")
      for row in rows:  # beta is 0: loss = pg_loss + alpha * anchor_loss
        np.testing.assert_allclose(row["loss"], row["pg_loss"] + alpha * row["anchor_loss"],
                                   rtol=1e-5, atol=1e-7)
        if variant == "grpo":
          assert row["loss"] == row["pg_loss"]
    cols = result["summary"][variant]
    assert set(cols) == {k for k, _ in ablate.COLUMNS}
    assert cols["accuracy"]["n"] == 2 and cols["dilution_ratio_mean"]["n"] == 2
  # Step 1 samples from the same SFT params: one seed gives every variant the same prompts
  # and rollouts (equal entropy), another seed others.
  step1 = {(v, s): _rl_rows(ablate.run_dir(workdir, v, s))[0] for v in ablate.VARIANTS
           for s in (0, 1)}
  for seed in (0, 1):
    for v in ablate.VARIANTS:
      for k in ("entropy", "completion_length", "reward"):
        assert step1[(v, seed)][k] == pytest.approx(step1[("grpo", seed)][k], rel=1e-5)
  assert step1[("grpo", 0)]["entropy"] != step1[("grpo", 1)]["entropy"]

  capsys.readouterr()
  again = ablate.run_ablation(c, workdir)
  out = capsys.readouterr().out
  assert out.count("skipped") == 1 + 2 * len(ablate.VARIANTS)
  assert again["summary"] == result["summary"]


def test_bad_ablate_group_is_refused():
  with pytest.raises(ValueError, match="config.ablate.variants has 'ppo'"):
    config_lib.validate(_config(**{"ablate.variants": ("grpo", "ppo")}))
  with pytest.raises(ValueError, match="config.ablate.seeds"):
    config_lib.validate(_config(**{"ablate.seeds": (1, 1)}))
  with pytest.raises(ValueError, match="config.ablate.alpha 0"):
    config_lib.validate(_config(**{"ablate.alpha": 0.0}))
