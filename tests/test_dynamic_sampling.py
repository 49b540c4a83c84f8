"""DAPO's dynamic sampling (`rollout.fill_groups`) on fake draws, and the validation of the
rl fields that choose the GRPO variants."""

import numpy as np
import pytest

from atlas_jax.rl import grpo, rollout
from atlas_jax.config import validate as validate_config
from configs import rl as rl_config

PAD = 9


def _draws(rewards_per_draw, lengths):
  """draw(i) -> prompt rows (left-padded to lengths[i]) and rollout rows, G = 2."""
  calls = []

  def draw(i):
    calls.append(i)
    r = np.asarray(rewards_per_draw[i], np.float32)
    b, t = len(r) // 2, lengths[i]
    ids = np.full((b, t), PAD, np.int32)
    ids[:, -2:] = 100 * i + np.arange(b)[:, None]  # prompt id: draw * 100 + row
    prompts = dict(input_ids=ids, attention_mask=(ids != PAD).astype(np.int32),
                   pixel_values=np.full((b, 3, 2), i, np.float32))
    rows = dict(reward=r, tokens=np.repeat(ids[:, -1:], 2, axis=0) * np.ones((1, 4), np.int32),
                text=np.asarray([f"{i}:{k}" for k in range(len(r))], object))
    return prompts, rows
  return draw, calls


def test_all_equal_groups_are_dropped_and_more_prompts_drawn():
  # draw 0 (T = 4): groups [1, 1] [0, 1] [0, 0] -> one informative (prompt 1)
  # draw 1 (T = 6): groups [1, 0] [2, 2] [0, 3] -> prompts 100 and 102
  draw, calls = _draws([[1, 1, 0, 1, 0, 0], [1, 0, 2, 2, 0, 3]], [4, 6])
  prompts, rows, stats = rollout.fill_groups(draw, groups_needed=3, group_size=2, max_draws=5,
                                             pad_values={"input_ids": PAD})
  assert calls == [0, 1]
  assert stats == {"draws": 2, "filled_groups": 0, "informative_fraction": 0.5}
  np.testing.assert_array_equal(rows["reward"], [0, 1, 1, 0, 0, 3])
  assert list(rows["text"]) == ["0:2", "0:3", "1:0", "1:1", "1:4", "1:5"]
  np.testing.assert_array_equal(rows["tokens"][::2, 0], [1, 100, 102])  # rows follow prompts
  want_ids = np.full((3, 6), PAD)
  want_ids[:, -2:] = np.array([1, 100, 102])[:, None]
  np.testing.assert_array_equal(prompts["input_ids"], want_ids)  # left-padded to T = 6
  np.testing.assert_array_equal(prompts["attention_mask"], (want_ids != PAD).astype(int))
  np.testing.assert_array_equal(prompts["pixel_values"][:, 0, 0], [0, 1, 1])
  # without the filter, draw 0 alone would give two groups of zero advantage
  adv = np.asarray(grpo.group_advantages(rows["reward"], 2)).reshape(3, 2)
  assert (np.abs(adv).sum(1) > 0).all()
  assert (np.abs(np.asarray(grpo.group_advantages(
      np.array([1, 1, 0, 1, 0, 0], np.float32), 2))).reshape(3, 2).sum(1) == 0).sum() == 2


def test_the_cap_fills_with_dropped_groups_and_says_so():
  draw, calls = _draws([[1, 1, 0, 1, 0, 0]] * 3, [4] * 3)
  prompts, rows, stats = rollout.fill_groups(draw, groups_needed=3, group_size=2, max_draws=2)
  assert calls == [0, 1]
  assert stats["draws"] == 2 and stats["filled_groups"] == 1
  assert stats["informative_fraction"] == pytest.approx(2 / 6)
  # informative first (prompt 1 of each draw), then one dropped group to fill
  np.testing.assert_array_equal(prompts["input_ids"][:, -1], [1, 101, 0])
  np.testing.assert_array_equal(rows["reward"], [0, 1, 0, 1, 1, 1])


def test_a_full_first_draw_draws_once():
  draw, calls = _draws([[0, 1, 2, 1]], [4])
  _, rows, stats = rollout.fill_groups(draw, groups_needed=2, group_size=2, max_draws=3)
  assert calls == [0] and stats["draws"] == 1 and stats["filled_groups"] == 0
  np.testing.assert_array_equal(rows["reward"], [0, 1, 2, 1])


@pytest.mark.parametrize("field, value, message", [
    ("adv_std", "biased", "config.rl.adv_std 'biased' is not one of"),
    ("loss_agg", "seq-sum", "config.rl.loss_agg 'seq-sum' is not one of"),
    ("importance_level", "group", "config.rl.importance_level 'group' is not one of"),
    ("clip_ratio_c", 0.5, "config.rl.clip_ratio_c 0.5 must be > 1"),
    ("log_ratio_clamp", -1.0, "config.rl.log_ratio_clamp -1.0 must be >= 0"),
    ("dynamic_sampling_max_draws", 0, "config.rl.dynamic_sampling_max_draws 0 must be >= 1"),
    ("overlong_buffer", 65, r"config.rl.overlong_buffer 65 must be in \[0, rl.max_new_tokens"),
    ("overlong_penalty", -0.1, "config.rl.overlong_penalty -0.1 must be >= 0"),
])
def test_rl_variant_fields_are_validated(field, value, message):
  c = rl_config.get_config("tiny")
  validate_config(c)
  for mode in grpo.AGGREGATIONS:  # every peer-named mode is accepted
    c.rl.loss_agg = mode
    validate_config(c)
  c.rl.loss_agg = "token-mean"
  c.rl[field] = value
  with pytest.raises(ValueError, match=message):
    validate_config(c)
