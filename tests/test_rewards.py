"""The composite ATLAS reward on crafted completions, malformed ones included."""

import numpy as np
import pytest

from atlas_jax.rl import rewards as R

CFG = R.default_reward_config()
CHOICE = R.Sample(answer="B", answer_type="choice", choices=("3", "5", "7", "9"), task="count",
                  expected_tokens=("<|Text|>",))
GOOD = "I will number the circles.\n<|Text|>\nThere are 5. Therefore the answer is \\boxed{B}."


@pytest.mark.parametrize("text, want", [
    ("\\boxed{\\frac{1}{2}} then \\boxed{\\text{x}}", "\\text{x}"),
    ("a \\boxed{A} b \\boxed{C}", "C"),
    ("no box here", None),
    ("\\boxed{unbalanced", None),
    ("\\boxed{}", ""),
    ("", None),
])
def test_extract_boxed(text, want):
  assert R.extract_boxed(text) == want


@pytest.mark.parametrize("pred, gold, kind, choices, ok", [
    ("B", "B", "choice", None, True), ("(b)", "B", "choice", None, True),
    ("Option B", "B", "choice", None, True), ("C", "B", "choice", None, False),
    ("5", "B", "choice", ("3", "5", "7", "9"), True), ("7", "B", "choice", ("3", "5", "7", "9"), False),
    ("3.0", "3", "number", None, True), ("1,000", "1000", None, None, True),
    ("50%", "0.5", "number", None, True), ("\\frac{1}{2}", "0.5", "number", None, True),
    ("3.01", "3", "number", None, False),
    ("The Red Circle.", "red circle", "text", None, True), ("\\text{left of}", "Left of", None, None, True),
    ("", "B", None, None, False), (None, "B", None, None, False),
])
def test_match_answer(pred, gold, kind, choices, ok):
  assert R.match_answer(pred, gold, kind, choices) is ok


def _score(text, sample=CHOICE, **kw):
  total, parts = R.compute_rewards([text], [sample], CFG, **kw)
  return float(total[0]), {k: float(v[0]) for k, v in parts.items()}


def test_a_good_completion_gets_everything():
  total, p = _score(GOOD)
  assert p == {"accuracy": 1.0, "format": 1.0, "functional": 1.0, "spam_penalty": 0.0,
               "length_penalty": 0.0}
  assert total == pytest.approx(1.0 + 0.2 + 0.2)


def test_malformed_completions():
  _, p = _score("")
  assert p["accuracy"] == 0 and p["functional"] == 0 and p["format"] < 1
  _, p = _score("<|Text|>\n<|Shape|>")  # only functional tokens
  assert p["accuracy"] == 0 and p["spam_penalty"] == -1.0 and p["format"] < 0.75
  _, p = _score("I count \\boxed{B} and \\boxed{B}.")  # two boxes, no token
  assert p["accuracy"] == 1 and p["functional"] == 0 and p["format"] < 1
  _, p = _score("I number them <|Text|> inline. \\boxed{B}")  # token not on its own line
  assert p["format"] == 0.75


def test_functional_token_appropriateness_and_spam():
  _, p = _score(GOOD.replace("<|Text|>", "<|Shape|>"))
  assert p["functional"] == 0.5
  generic = R.Sample(answer="B")
  _, p = _score(GOOD.replace("<|Text|>", "<|Shape|>"), generic)
  assert p["functional"] == 1.0
  many = "".join(f"step {i}.\n<|Text|>\n" for i in range(CFG.max_functional_tokens + 1))
  _, p = _score(many + "\\boxed{B}")
  assert p["spam_penalty"] == -1.0
  ok = "".join(f"step {i}.\n<|Text|>\n" for i in range(CFG.max_functional_tokens))
  _, p = _score(ok + "\\boxed{B}")
  assert p["spam_penalty"] == 0.0


def test_length_penalty_over_budget():
  _, p = _score(GOOD, num_tokens=[CFG.length_budget * 3 // 2])
  assert p["length_penalty"] == pytest.approx(-0.5)
  _, p = _score(GOOD, num_tokens=[CFG.length_budget * 5])
  assert p["length_penalty"] == -1.0


def test_registry_extension_and_unknown_weight():
  @R.register("polite")
  def polite(text, sample, cfg):
    return float("please" in text)
  try:
    cfg = R.default_reward_config()
    cfg.weights["polite"] = 2.0
    total, parts = R.compute_rewards([GOOD + " please", GOOD], [CHOICE, CHOICE], cfg)
    np.testing.assert_allclose(total[0] - total[1], 2.0, rtol=1e-6)
    assert parts["polite"].dtype == np.float32 and parts["polite"].shape == (2,)
  finally:
    del R.REWARDS["polite"]
  cfg = R.default_reward_config()
  cfg.weights["politeness"] = 1.0
  with pytest.raises(ValueError, match="reward weight 'politeness' names no registered reward"):
    R.compute_rewards([GOOD], [CHOICE], cfg)


def test_totals_are_the_weighted_sums():
  texts = [GOOD, "", "\\boxed{C}", GOOD.replace("B}", "A}")]
  total, parts = R.compute_rewards(texts, [CHOICE] * 4, CFG)
  want = sum(w * parts[k] for k, w in CFG.weights.items())
  np.testing.assert_allclose(total, want, rtol=1e-6)
  assert total.dtype == np.float32
