"""The composite ATLAS reward on crafted completions, malformed ones included."""

import time
import types

import numpy as np
import pytest

from atlas_jax import answers
from atlas_jax.data import synthetic
from atlas_jax.functional_tokens import TASK_TOKENS
from atlas_jax.rl import rewards as R

CFG = R.default_reward_config()
CHOICES = ("3", "5", "7", "9")
CHOICE = R.Sample(answer="B", answer_type="choice", choices=CHOICES, task="count")
GOOD = "I will number the circles.\n<|Text|>\nThere are 5. Therefore the answer is \\boxed{B}."
NUMBER = R.Sample(answer="12.5", answer_type="number")


def _score(text, sample=CHOICE, cfg=CFG, **kw):
  total, parts = R.compute_rewards([text], [sample], cfg, **kw)
  return float(total[0]), {k: float(v[0]) for k, v in parts.items()}


@pytest.mark.parametrize("text, want", [
    ("so \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),              # nested braces
    ("\\boxed{x \\} y}", "x \\} y"),                          # escaped braces don't count
    ("\\boxed{\\frac{1}{2}} then \\boxed{\\text{x}}", "\\text{x}"),  # the last box wins
    ("a \\boxed{A} b \\boxed{C} c", "C"),
    ("\\boxed{\\boxed{D}}", "D"),
    ("no box here", None),
    ("\\boxed{unbalanced", None),
    ("\\boxed{A} then truncated \\boxed{B", None),            # a broken last box is no answer
    ("\\boxed{}", ""),
    ("", None),
])
def test_extract_boxed(text, want):
  assert answers.extract_boxed(text) == want


@pytest.mark.parametrize("pred, gold, kind, choices, ok", [
    # letters in any common form; the text of the gold choice also counts
    ("B", "B", "choice", None, True), ("(b)", "B", "choice", None, True),
    ("B.", "B", "choice", None, True), ("Option B", "B", "choice", None, True),
    ("the answer is (B)", "B", "choice", None, True), ("C", "B", "choice", None, False),
    ("5", "B", "choice", CHOICES, True), ("7", "B", "choice", CHOICES, False),
    ("(B) 5", "B", "choice", CHOICES, True), ("(B) 7", "B", "choice", CHOICES, False),
    ("5", "B", None, CHOICES, True), ("b", "B", None, None, True),
    ("B", "5", "choice", CHOICES, True), ("C", "5", "choice", CHOICES, False),  # gold as text
    ("B", "B", "choice", ("A", "B", "C", "D"), True),
    ("A", "B", "choice", ("A", "B", "C", "D"), False),
    ("top left", "top-left", "choice", ("top-left", "top-right"), True),
    # numbers with tolerance
    ("3.0", "3", "number", None, True), ("3.0003", "3", "number", None, True),
    ("3.01", "3", "number", None, False), ("-3", "3", "number", None, False),
    ("1,000", "1000", None, None, True), ("1,5", "15", "number", None, False),
    ("\\frac{1}{2}", "0.5", "number", None, True), ("\\dfrac{3}{4}", "3/4", None, None, True),
    ("\\frac{1}{25}", "0.04", "number", None, True),
    ("\\frac{1}{25}", "2.4", "number", None, False),
    ("-\\frac{1}{2}", "-0.5", "number", None, True),
    ("50%", "0.5", "number", None, True), ("50\\%", "50", "number", None, True),
    ("50%", "5", "number", None, False),
    ("$x = 12$", "12", None, None, True), ("90^\\circ", "90", None, None, True),
    ("5 cm", "5", None, None, True), ("5 cm", "5 m", None, None, False),
    ("\\text{12}", "12", "number", None, True), ("twelve", "12", "number", None, False),
    ("1/0", "1", "number", None, False),
    # normalised strings
    ("The Red Circle.", "red circle", "text", None, True),
    ("\\text{left of}", "Left of", None, None, True),
    ("\\textbf{\\text{Above}}", "above", None, None, True), ("below", "above", None, None, False),
    ("an   apple!", "Apple", "text", None, True), ("A", "a", "text", None, True),
    ("the", "a", "text", None, False),
    # nothing to match
    ("", "B", None, None, False), (None, "B", None, None, False),
    ("  ", "5", "number", None, False),
])
def test_match_answer(pred, gold, kind, choices, ok):
  assert answers.match_answer(pred, gold, kind, choices) is ok


def test_match_answer_tolerance_and_bad_type():
  assert answers.match_answer("3.01", "3", "number", rel_tol=0.01)
  assert not answers.match_answer("3.0003", "3", "number", rel_tol=1e-6)
  with pytest.raises(ValueError, match="'letter' is not one of"):
    answers.match_answer("B", "B", "letter")
  with pytest.raises(ValueError, match="'letter' is not one of"):
    R.Sample(answer="B", answer_type="letter")


def test_a_good_completion_gets_everything():
  total, p = _score(GOOD)
  assert p == {"accuracy": 1.0, "format": 1.0, "functional": 1.0, "spam_penalty": 0.0,
               "length_penalty": 0.0}
  assert total == pytest.approx(1.0 + 0.2 + 0.2)


def test_accuracy_reads_the_last_box():
  assert _score("First \\boxed{C}, no wait: \\boxed{(B)}.")[1]["accuracy"] == 1.0
  assert _score("First \\boxed{B}, no wait: \\boxed{C}.")[1]["accuracy"] == 0.0
  assert _score("The answer is B.")[1]["accuracy"] == 0.0  # no box
  assert _score("Measured \\boxed{12.50 cm}.", NUMBER)[1]["accuracy"] == 1.0
  assert _score("Measured \\boxed{12.6}.", NUMBER)[1]["accuracy"] == 0.0


def test_malformed_completions():
  for empty in ("", " \n "):
    total, p = _score(empty)
    assert p == {"accuracy": 0.0, "format": 0.0, "functional": 0.0, "spam_penalty": 0.0,
                 "length_penalty": 0.0} and total == 0.0
  _, p = _score("<|Text|>\n<|Shape|>")  # only functional tokens: only "clean" holds
  assert p["accuracy"] == 0 and p["format"] == 0.25 and p["spam_penalty"] == -1.0
  assert p["functional"] == 1.0  # <|Text|> is the count token


@pytest.mark.parametrize("text, want", [
    (GOOD, 1.0),
    ("I count them.\n\\boxed{B}", 1.0),  # no token: format holds, `functional` is 0
    ("I number them <|Text|> inline.\nSo \\boxed{B}", 0.75),        # token not on its own line
    ("<|Text|>\nThere are 5, so \\boxed{B}.", 0.75),                # no sentence before it
    ("I count.\n<|Text|>\n<|Shape|>\nSo \\boxed{B}.", 0.75),        # token after a token
    ("I count \\boxed{B} and \\boxed{B}.", 0.75),                   # two boxes
    (GOOD + " Hope that helps.", 0.75),                             # text after the box
    ("I count.\n\\boxed{B}\nI check.\n<|Text|>", 0.75),             # a token after the box
    ("I count.\n\\boxed{B\n<|Text|>\n}", 0.75),                      # a token in the box
    ("I count.\n<|Text|>\nSo \\boxed{B", 0.75),                     # unbalanced box
    ("I count.\n<|Text|>\nThere are 5.", 0.75),                     # no box
    (GOOD.replace("Text", "Zoom"), 0.75),                           # unregistered <|...|>
    (GOOD + "<|im_start|>", 0.5),                                   # stray, and after the box
    ("I will number the circles.\n<|Text|>\n\\boxed{B}", 1.0),
    ("<|Text|>\n\\boxed{B}", 0.5),                                  # no reasoning either
])
def test_format(text, want):
  assert _score(text)[1]["format"] == want


def test_functional_token_appropriateness():
  assert CHOICE.expected_tokens == ("<|Text|>",)  # taken from TASK_TOKENS["count"]
  assert R.Sample(answer="B", task="unknown").expected_tokens is None
  assert R.Sample(answer="B", task="count", expected_tokens=()).expected_tokens == ()
  shape = GOOD.replace("<|Text|>", "<|Shape|>")
  assert _score(shape)[1]["functional"] == 0.5
  assert _score(shape, R.Sample(answer="B"))[1]["functional"] == 1.0
  assert _score(shape, R.Sample(answer="B", task="region"))[1]["functional"] == 1.0
  both = "I mark it.\n<|Shape|>\nI number them.\n<|Text|>\nSo \\boxed{B}."
  assert _score(both)[1]["functional"] == 1.0
  assert _score("I count.\n\\boxed{B}")[1]["functional"] == 0.0
  assert _score("I count <Text> and <|Text> \\boxed{B}")[1]["functional"] == 0.0
  only_line = dict(CFG.to_dict(), functional_tokens=("<|Line|>",))
  cfg = R.default_reward_config()
  cfg.update(only_line)
  assert _score(GOOD, cfg=cfg)[1]["functional"] == 0.0  # <|Text|> not registered there


def _steps(n, token="<|Text|>"):
  return "".join(f"Step {i}: I number the next circle.\n{token}\n" for i in range(n))


def test_spam_penalty():
  k = CFG.max_functional_tokens
  assert _score(_steps(k) + "So \\boxed{B}.")[1]["spam_penalty"] == 0.0
  assert _score(_steps(k + 1) + "So \\boxed{B}.")[1]["spam_penalty"] == -1.0
  back_to_back = "I number them.\n<|Text|>\n<|Text|>\nSo \\boxed{B}."
  assert _score(back_to_back)[1]["spam_penalty"] == -1.0
  assert _score("I number them.\n<|Text|><|Shape|>\nSo \\boxed{B}.")[1]["spam_penalty"] == -1.0
  assert _score("I number them.\n<|Text|>\n. -\n<|Text|>\n\\boxed{B}")[1]["spam_penalty"] == -1.0
  assert _score("I number them.\n<|Text|>\nok\n<|Text|>\n\\boxed{B}")[1]["spam_penalty"] == 0.0
  cfg = R.default_reward_config()
  cfg.max_functional_tokens = 1
  assert _score(_steps(2) + "\\boxed{B}", cfg=cfg)[1]["spam_penalty"] == -1.0
  total, p = _score(back_to_back)
  assert total == pytest.approx(sum(w * p[n] for n, w in CFG.weights.items()))
  assert p["spam_penalty"] * CFG.weights["spam_penalty"] == pytest.approx(-0.2)


def test_length_penalty():
  budget = CFG.length_budget
  assert _score(GOOD, num_tokens=[budget])[1]["length_penalty"] == 0.0
  assert _score(GOOD, num_tokens=[budget * 3 // 2])[1]["length_penalty"] == pytest.approx(-0.5)
  assert _score(GOOD, num_tokens=[budget * 5])[1]["length_penalty"] == -1.0
  long = "I count. " * (budget * 4 * 5 // 4 // 9)  # ~1.25 * budget tokens at 4 chars each
  _, p = _score(long + "\\boxed{B}")
  assert p["length_penalty"] == pytest.approx(-(len(long + "\\boxed{B}") / 4 - budget) / budget)
  assert -0.3 < p["length_penalty"] < -0.2
  assert _score(long, num_tokens=[10])[1]["length_penalty"] == 0.0  # counts beat chars/4
  cfg = R.default_reward_config()
  cfg.length_budget = 0  # off
  assert _score(long * 10, cfg=cfg)[1]["length_penalty"] == 0.0


def test_registry_extension_zero_weight_and_num_tokens():
  @R.register("polite")
  def polite(text, sample, cfg):
    return float("please" in text)

  @R.register("short")
  def short(text, sample, cfg, *, num_tokens=None):
    return float(num_tokens is not None and num_tokens < 10)
  try:
    cfg = R.default_reward_config()
    cfg.weights["polite"] = 2.0
    cfg.weights["format"] = 0.0
    texts = [GOOD.replace("There", "There, please,"), GOOD, "please"]
    total, parts = R.compute_rewards(texts, [CHOICE] * 3, cfg, num_tokens=[5, 50, 5])
    np.testing.assert_allclose(total[0] - total[1], 2.0, rtol=1e-6)
    np.testing.assert_array_equal(parts["polite"], [1.0, 0.0, 1.0])
    np.testing.assert_array_equal(parts["short"], [1.0, 0.0, 1.0])  # reported, weight absent
    np.testing.assert_array_equal(parts["format"], [1.0, 1.0, 0.75])  # weight 0, reported
    assert parts["polite"].dtype == np.float32 and parts["polite"].shape == (3,)
    _, parts = R.compute_rewards(texts, [CHOICE] * 3, cfg)
    np.testing.assert_array_equal(parts["short"], [0.0, 0.0, 0.0])  # no counts given
  finally:
    del R.REWARDS["polite"], R.REWARDS["short"]
  assert set(R.REWARDS) == {"accuracy", "format", "functional", "spam_penalty",
                            "length_penalty"}


def test_bad_weights_and_inputs():
  cfg = R.default_reward_config()
  cfg.weights["politeness"] = 1.0
  with pytest.raises(ValueError, match=r"reward weight 'politeness' names no registered "
                                       r"reward; registered: \['accuracy', 'format'"):
    R.compute_rewards([GOOD], [CHOICE], cfg)
  cfg = types.SimpleNamespace(**dict(CFG.to_dict(), weights={"format": "high"}))
  with pytest.raises(ValueError, match="reward weight 'format' is 'high'"):
    R.compute_rewards([GOOD], [CHOICE], cfg)
  with pytest.raises(ValueError, match="2 completions but 1 samples"):
    R.compute_rewards([GOOD, GOOD], [CHOICE], CFG)
  with pytest.raises(ValueError, match="1 completions but 2 token counts"):
    R.compute_rewards([GOOD], [CHOICE], CFG, num_tokens=[1, 2])
  R.register("broken")(lambda text, sample, cfg: float("nan"))
  try:
    with pytest.raises(ValueError, match="reward 'broken' gave nan for completion 0"):
      R.compute_rewards([GOOD], [CHOICE], CFG)
  finally:
    del R.REWARDS["broken"]


def test_totals_are_the_weighted_sums_and_any_cfg_object_works():
  texts = [GOOD, "", "\\boxed{C}", GOOD.replace("B}", "A}"), "I count.\n<|Text|>\n<|Text|>",
           _steps(9) + "\\boxed{5}"]
  total, parts = R.compute_rewards(texts, [CHOICE] * len(texts), CFG,
                                   num_tokens=[20, 0, 3, 20, 9, 600])
  assert total.shape == (6,) and total.dtype == np.float32
  assert all(v.shape == (6,) and v.dtype == np.float32 for v in parts.values())
  want = sum(np.float32(w) * parts[k] for k, w in CFG.weights.items())
  np.testing.assert_allclose(total, want, rtol=1e-6)
  np.testing.assert_array_equal(parts["accuracy"], [1, 0, 0, 0, 0, 1])
  assert len(set(total.tolist())) == 6  # the crafted completions all score differently

  class Plain:  # not a ConfigDict
    weights = {"accuracy": 1.0}
    max_functional_tokens, length_budget = 6, 256
    functional_tokens = tuple(CFG.functional_tokens)
  total, parts = R.compute_rewards(texts, [CHOICE] * len(texts), Plain())
  np.testing.assert_array_equal(total, parts["accuracy"])
  empty_total, empty_parts = R.compute_rewards([], [], CFG)
  assert empty_total.shape == (0,) and empty_parts["format"].shape == (0,)


def test_thousands_of_completions_per_second():
  texts = [GOOD, _steps(4) + "\\boxed{5}", "I count " * 300 + "\\boxed{C}", ""] * 500
  R.compute_rewards(texts[:8], [CHOICE] * 8, CFG)
  t0 = time.perf_counter()
  R.compute_rewards(texts, [CHOICE] * len(texts), CFG)
  assert len(texts) / (time.perf_counter() - t0) > 1000


def test_synthetic_trajectories_get_the_full_reward():
  assert set(TASK_TOKENS) == set(synthetic.FAMILIES)  # every family expects its token
  rng = np.random.default_rng(0)
  texts, samples = [], []
  for family in sorted(synthetic.FAMILIES):
    for _ in range(3):
      _, rec, _ = synthetic.generate(family, rng)
      texts.append(rec["trajectory"])
      samples.append(R.Sample(answer=rec["answer"], answer_type=rec["answer_type"],
                              choices=tuple(rec["choices"]), task=rec["task"]))
  total, parts = R.compute_rewards(texts, samples, CFG)
  np.testing.assert_allclose(total, 1.4, rtol=1e-6)
  np.testing.assert_array_equal(parts["functional"], 1.0)


def test_overlong_penalty_is_dapos_soft_punishment():
  """verl's DAPO reward manager: 0 up to max - buffer, then -(len - (max - buffer)) /
  buffer * factor, reaching -factor at max."""
  lengths = [5, 12, 13, 16, 20, 25]
  got = R.overlong_penalty(lengths, 20, 8, 0.5)
  np.testing.assert_allclose(got, [0.0, 0.0, -0.5 / 8, -0.5 * 4 / 8, -0.5, -0.5])
  assert got.dtype == np.float32
  np.testing.assert_array_equal(R.overlong_penalty(lengths, 20, 0), 0.0)  # off
  np.testing.assert_allclose(R.overlong_penalty([20], 20, 20), [-1.0])  # all buffer
  with pytest.raises(ValueError, match="overlong buffer 30 exceeds the maximum length 20"):
    R.overlong_penalty(lengths, 20, 30)
