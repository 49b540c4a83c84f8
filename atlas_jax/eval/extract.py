"""A benchmark row's score: the answer `answers.extract` reads from a completion, compared
with the row's gold answer (rules and examples: atlas_jax/answers.py). A completion nothing
can be read from is a failure: counted separately, and wrong."""

from __future__ import annotations

import dataclasses

from atlas_jax import answers
from atlas_jax.eval.benchmarks import Item


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


def score(item: Item, completion: str) -> Scored:
  """Extracts the answer of `completion` to `item` and compares it with the gold one."""
  extracted, method = answers.extract(completion, item.options)
  if extracted is None:
    return Scored(None, None, False)
  rec = item.record
  options = dict(item.options)
  if options and rec.answer in options:
    return Scored(extracted, method, extracted == rec.answer)
  pred = options.get(extracted, extracted)
  return Scored(extracted, method, answers.match_answer(pred, rec.answer, rec.answer_type,
                                                        rec.choices))
