"""Rule-based, reproducible answer extraction: no judge model.

For a multiple-choice row (options A, B, ...), in order:

  boxed        the last \\boxed{} (`rewards.extract_boxed`), its content read as a letter in
               any common form (`B`, `(B)`, `Option B`, `(B) 5`) or as one option's text
               (`rewards.match_answer`); a box that names no single option is a failure (the
               model committed to a final answer that is not an option)
  letter       else a single option letter standing alone in the last 64 characters:
               `B`, `(B)`, `(b)`, `B.`, `Answer: C`, `the answer is D`; `A` and `I` followed
               by a lower-case word ("A cat", "I think") are words, not letters, unless the
               word is one of "is", "was", "or", "and", "seems", "appears"; two different
               letters there are ambiguous
  option_text  else the one option whose text (normalised as the reward normalises it)
               occurs in the completion as whole words; an option found only inside a longer
               option that also occurs ("red" in "dark red") does not count

For an open row: the last \\boxed{}, else what follows the last "answer is" / "Answer:" on
its line, else a one-line completion of at most 32 characters. Anything else is a failure:
counted separately, and wrong.
"""

from __future__ import annotations

import dataclasses
import re

from atlas_jax.eval.benchmarks import Item
from atlas_jax.rl import rewards

TAIL_CHARS = 64
_LONE = re.compile(r"(?<![\w\\'\u2019])(?:\(([A-Za-z])\)|([A-Z]))(?![\w'\u2019])")
_NEXT_WORD = re.compile(r"\s+([a-z]+)")
_LETTER_VERBS = {"is", "was", "or", "and", "seems", "appears"}  # "A is", "A or B": a letter
_ANSWER_IS = re.compile(r"(?:answer\s+is|answer\s*:)\s*(.+)", re.I)


@dataclasses.dataclass(frozen=True)
class Scored:
  """extracted: an option letter (multiple choice) or answer text, None on a failure;
  method: "boxed" | "letter" | "option_text" | "answer_is" | "short" | None."""

  extracted: str | None
  method: str | None
  correct: bool

  @property
  def failed(self) -> bool:
    return self.extracted is None


def _tail(text: str) -> str:
  """The last TAIL_CHARS characters, widened back to a word boundary."""
  text = text.rstrip()
  start = max(len(text) - TAIL_CHARS, 0)
  while start > 0 and not text[start - 1].isspace():
    start -= 1
  return text[start:]


def lone_letter(text: str, letters) -> str | None:
  """The single option letter standing alone near the end of `text`, else None."""
  tail, found = _tail(text), set()
  for m in _LONE.finditer(tail):
    letter = (m.group(1) or m.group(2)).upper()
    if m.group(2) in ("A", "I"):
      word = _NEXT_WORD.match(tail, m.end())
      if word and word.group(1) not in _LETTER_VERBS:
        continue
    if letter in letters:
      found.add(letter)
  return found.pop() if len(found) == 1 else None


def option_text(text: str, options) -> str | None:
  """The letter of the one option whose text occurs in `text`, else None."""
  norm = rewards._normalise(text)  # noqa: SLF001  (the reward's normalisation, shared)
  spans = {}
  for letter, value in options:
    v = rewards._normalise(value)  # noqa: SLF001
    if v:
      spans[letter] = [m.span() for m in re.finditer(rf"(?<!\w){re.escape(v)}(?!\w)", norm)]
  inside = lambda s, other: any(a <= s[0] and s[1] <= b and (a, b) != s for a, b in other)
  hits = [k for k, ss in spans.items() if ss and any(
      not any(inside(s, o) for j, o in spans.items() if j != k) for s in ss)]
  return hits[0] if len(hits) == 1 else None


def extract(completion: str, options=()) -> tuple[str | None, str | None]:
  """(extracted answer, method) of a completion; (None, None) when nothing parses.
  `options`: ((letter, text), ...), empty for an open question."""
  boxed = rewards.extract_boxed(completion)
  if options:
    letters = [k for k, _ in options]
    choices = [v for _, v in options]
    if boxed is not None:
      hits = [k for k in letters if rewards.match_answer(boxed, k, "choice", choices)]
      return (hits[0], "boxed") if len(hits) == 1 else (None, None)
    letter = lone_letter(completion, letters)
    if letter:
      return letter, "letter"
    letter = option_text(completion, options)
    return (letter, "option_text") if letter else (None, None)
  if boxed is not None and boxed.strip():
    return boxed.strip(), "boxed"
  m = None
  for m in _ANSWER_IS.finditer(completion):
    pass
  if m and m.group(1).strip():
    return m.group(1).strip().rstrip("."), "answer_is"
  text = completion.strip()
  if text and "\n" not in text and len(text) <= 32:
    return text, "short"
  return None, None


def score(item: Item, completion: str) -> Scored:
  """Extracts the answer of `completion` to `item` and compares it with the gold one."""
  extracted, method = extract(completion, item.options)
  if extracted is None:
    return Scored(None, None, False)
  rec = item.record
  options = dict(item.options)
  if options and rec.answer in options:
    return Scored(extracted, method, extracted == rec.answer)
  pred = options.get(extracted, extracted)
  return Scored(extracted, method, rewards.match_answer(pred, rec.answer, rec.answer_type,
                                                        rec.choices))
