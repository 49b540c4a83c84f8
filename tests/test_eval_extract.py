"""Rule-based answer extraction on crafted completions, and per-category reports."""

import json

import pytest

from atlas_jax.data.schema import Trajectory
from atlas_jax import answers
from atlas_jax.eval import extract, report
from atlas_jax.eval.benchmarks import Item

OPTIONS = tuple(zip("ABCD", ["red", "blue", "dark red", "green"]))


@pytest.mark.parametrize("completion, expected, method", [
    ("B", "B", "letter"),
    ("(B)", "B", "letter"),
    ("(b)", "B", "letter"),
    ("Answer: C", "C", "letter"),
    ("The answer is D.", "D", "letter"),
    ("B. blue", "B", "letter"),
    ("Option A", "A", "letter"),
    ("I think the answer is C", "C", "letter"),   # "I" before a word is not a letter
    ("A cat sits on it. So B.", "B", "letter"),   # nor is the article "A"
    ("A is correct.", "A", "letter"),
    ("\\boxed{B}", "B", "boxed"),
    ("I will outline it.\n<|Shape|>\nSo \\boxed{(C) dark red}.", "C", "boxed"),
    ("\\boxed{blue}", "B", "boxed"),                # a box holding an option's text
    ("\\boxed{A} no wait \\boxed{D}", "D", "boxed"),  # the last box
    ("It is blue.", "B", "option_text"),
    ("The segment is dark red.", "C", "option_text"),  # "red" only inside "dark red"
    ("I cannot answer this question from the image.", None, None),  # a refusal
    ("xq zzv 123 !!", None, None),                                   # garbage
    ("It could be A or B.", None, None),            # two letters: ambiguous
    ("red or blue, hard to say", None, None),       # two option texts: ambiguous
    ("\\boxed{banana} B", None, None),              # a final box that is no option
    ("", None, None),
])
def test_multiple_choice_extraction(completion, expected, method):
  assert answers.extract(completion, OPTIONS) == (expected, method)


def test_letter_far_from_the_end_does_not_count():
  text = "B seems plausible at first. " + "Let me look at every part of the picture. " * 3
  assert answers.lone_letter(text, "ABCD") is None


@pytest.mark.parametrize("completion, expected", [
    ("\\boxed{3}", "3"), ("So the answer is 42.", "42"), ("yes", "yes"),
    ("A long answer\nover two lines", None), ("", None)])
def test_open_question_extraction(completion, expected):
  assert answers.extract(completion, ())[0] == expected


def _item(answer="B", options=OPTIONS, category="", l2=""):
  rec = Trajectory(id="x", images=(), question="q", trajectory="", answer=answer,
                   choices=tuple(v for _, v in options) or None)
  return Item(rec, options, category=category, l2_category=l2)


def test_score_compares_with_the_gold_answer():
  assert extract.score(_item(), "\\boxed{(B)}").correct
  assert not extract.score(_item(), "\\boxed{A}").correct
  failed = extract.score(_item(), "no idea")
  assert failed.failed and not failed.correct
  assert extract.score(_item("0.5", ()), "\\boxed{50\\%}").correct  # the reward's matcher
  assert extract.score(_item("blue", OPTIONS), "It is B.").correct   # gold given as text


def _row(i, category, l2, correct, extracted, functional=({},), lengths=(10,)):
  return {"index": i, "id": str(i), "category": category, "l2_category": l2, "answer": "A",
          "prompt": "p", "completions": ["c"] * len(correct), "extracted": list(extracted),
          "method": ["letter"] * len(correct), "correct": list(correct),
          "lengths": list(lengths), "functional": list(functional)}


def test_summary_per_category_sums_and_subtask_mean(tmp_path):
  rows = [_row(0, "Counting", "perception", [True], ["A"], [{"<|Text|>": 2}], [8]),
          _row(1, "Counting", "perception", [False], [None], [{}], [12]),
          _row(2, "IQ_Test", "reasoning", [True], ["A"], [{"<|Line|>": 1}], [4]),
          _row(3, "Relative_Depth", "", [False], ["B"], [{}], [6])]
  s = report.summarize(rows, samples=1, subtasks=["blink_atlas"],
                       functional_tokens=("<|Text|>", "<|Line|>"), skipped={"too_long": 2})
  per = s["per_category"]
  assert sum(g["rows"] for g in per.values()) == s["rows"] == 4
  assert sum(g["correct"] for g in per.values()) == s["correct"] == 2
  assert sum(g["extraction_failures"] for g in per.values()) == s["extraction_failures"] == 1
  assert per["Counting"]["accuracy"] == 0.5 and s["accuracy"] == 0.5
  assert s["per_l2_category"]["perception"]["rows"] == 2
  assert s["category_mean"] == pytest.approx((0.5 + 1 + 0) / 3)
  assert s["subtask_mean"] == pytest.approx(0.75)  # Counting and IQ_Test of the seven
  assert "Jigsaw" in s["subtasks_missing"] and s["skipped"] == {"too_long": 2}
  assert s["functional_tokens_per_answer"] == {"<|Text|>": 0.5, "<|Line|>": 0.25,
                                               "total": 0.75}
  assert s["answers_with_functional_tokens"] == 0.5 and s["mean_length"] == 7.5
  flat = report.flat_metrics(s)
  assert flat["accuracy/Counting"] == 0.5 and flat["functional_per_answer"] == 0.75
  report.write(str(tmp_path), rows, s, plot=False)
  lines = [json.loads(l) for l in (tmp_path / "predictions.jsonl").read_text().splitlines()]
  assert [l["id"] for l in lines] == ["0", "1", "2", "3"]
  assert set(lines[0]) == {"id", "category", "l2_category", "answer", "prompt", "completion",
                           "extracted", "method", "correct", "length"}
  assert lines[1]["extracted"] is None and lines[1]["correct"] is False
  assert json.loads((tmp_path / "summary.json").read_text())["rows"] == 4


def test_pass_at_k():
  rows = [_row(0, "a", "", [False, True], [None, "A"], [{}, {}], [3, 5]),
          _row(1, "a", "", [False, False], ["B", "C"], [{}, {}], [3, 5])]
  s = report.summarize(rows, samples=2)
  assert s["pass@2"] == 0.5 and s["accuracy"] == 0.25 and s["completions"] == 4
  [first, _] = report.prediction_lines(rows, 2)
  assert first["completion"] == ["c", "c"] and first["pass_at_k"] is True
