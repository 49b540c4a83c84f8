"""The composite ATLAS reward, scored on the host on decoded completions.

Components (each `fn(completion, sample, cfg) -> float`), summed with `cfg.weights`:
  accuracy        1 if the last \\boxed{} matches the gold answer.
  format          reasoning text, functional tokens each on their own line, exactly one
                  final \\boxed{} after the last functional token, no stray special tokens
                  (four checks, 0.25 each).
  functional      1 if an appropriate functional token is used (any registered token when
                  the sample names none), 0.5 if only other tokens, 0 if none.
  spam_penalty    -1 for more than `max_functional_tokens` tokens or two back to back.
  length_penalty  -(tokens over `length_budget`) / budget, down to -1.
`register(name)` adds a component; a weight must exist for every name in `cfg.weights`.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Callable

import ml_collections
import numpy as np

from atlas_jax.functional_tokens import FUNCTIONAL_TOKENS

TASK_TOKENS = {"line_length": "<|Line|>", "count": "<|Text|>", "region": "<|Shape|>",
               "relation": "<|Arrow|>", "mirror": "<|Manip|>"}


@dataclasses.dataclass(frozen=True)
class Sample:
  """What the reward knows of a rollout's prompt."""

  answer: str
  answer_type: str | None = None
  choices: tuple[str, ...] | None = None
  task: str | None = None
  expected_tokens: tuple[str, ...] | None = None


def default_reward_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      weights=dict(accuracy=1.0, format=0.2, functional=0.2, spam_penalty=0.2,
                   length_penalty=0.1),
      max_functional_tokens=6, length_budget=256, functional_tokens=FUNCTIONAL_TOKENS))


# ---------------------------------------------------------------------------------------
# Answers

def boxed_spans(text: str) -> list[tuple[int, int]]:
  """(start, end) of the content of every balanced \\boxed{...}, in order."""
  spans, i = [], 0
  while (i := text.find("\\boxed{", i)) != -1:
    start = i + len("\\boxed{")
    depth, j = 1, start
    while j < len(text) and depth:
      depth += {"{": 1, "}": -1}.get(text[j], 0)
      j += 1
    if depth:
      break  # unbalanced: nothing after this can close either
    spans.append((start, j - 1))
    i = j
  return spans


def extract_boxed(text: str) -> str | None:
  """Content of the last balanced \\boxed{...}; None when there is none."""
  spans = boxed_spans(text)
  return text[spans[-1][0]:spans[-1][1]] if spans else None


_LETTER = re.compile(r"^\(?(?:option\s+)?([A-Za-z])\)?[.:]?$", re.IGNORECASE)
_WRAPPERS = re.compile(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}")


def _normalise(s: str) -> str:
  s = _WRAPPERS.sub(r"\1", s).replace("$", "").lower().strip()
  s = re.sub(r"\b(a|an|the)\b", " ", s)
  s = re.sub(r"[^\w\s.%-]", " ", s)
  return " ".join(s.split()).strip(" .")


def _number(s: str) -> float | None:
  s = _normalise(s).replace(",", "").replace(" ", "")
  m = re.fullmatch(r"\\?d?frac\{?(-?\d+)\}?\{?(\d+)\}?", _WRAPPERS.sub(r"\1", s))
  if m and float(m.group(2)):
    return float(m.group(1)) / float(m.group(2))
  try:
    return float(s[:-1]) / 100 if s.endswith("%") else float(s)
  except ValueError:
    return None


def _letter(s: str) -> str | None:
  m = _LETTER.match(s.strip())
  return m.group(1).upper() if m else None


def match_answer(pred: str | None, gold: str, answer_type: str | None = None,
                 choices=None, *, rel_tol: float = 1e-4, abs_tol: float = 1e-6) -> bool:
  """Whether a predicted answer equals the gold one.

  choice: letters in any common form (`B`, `(B)`, `b.`, `Option B`), or the text of the
  gold choice. number: numeric equality within tolerance (`1,000` = `1000`, `50%` = 0.5,
  `\\frac{1}{2}` = 0.5). text: equality after normalising case, spacing, punctuation,
  articles and `\\text{}` wrappers. None infers the type from the gold answer.
  """
  if pred is None or not pred.strip():
    return False
  if answer_type is None:
    if _letter(gold) and (choices or len(gold.strip().strip("().")) == 1):
      answer_type = "choice"
    elif _number(gold) is not None:
      answer_type = "number"
    else:
      answer_type = "text"
  if answer_type == "choice":
    gold_letter = _letter(gold)
    if gold_letter and _letter(pred) == gold_letter:
      return True
    if choices and gold_letter and "A" <= gold_letter <= "Z":
      k = ord(gold_letter) - ord("A")
      if k < len(choices):
        return match_answer(pred, choices[k], None) and _letter(pred) is None
    return False
  if answer_type == "number":
    p, g = _number(pred), _number(gold)
    return p is not None and g is not None and math.isclose(p, g, rel_tol=rel_tol,
                                                            abs_tol=abs_tol)
  return _normalise(pred) == _normalise(gold)


# ---------------------------------------------------------------------------------------
# Components

REWARDS: dict[str, Callable] = {}


def register(name: str):
  """Decorator adding a reward component `fn(completion, sample, cfg) -> float`."""
  def wrap(fn):
    REWARDS[name] = fn
    return fn
  return wrap


def _token_positions(text: str, tokens) -> list[tuple[int, str]]:
  return sorted((m.start(), t) for t in tokens for m in re.finditer(re.escape(t), text))


@register("accuracy")
def accuracy(completion: str, sample: Sample, cfg) -> float:
  return float(match_answer(extract_boxed(completion), sample.answer, sample.answer_type,
                            sample.choices))


@register("format")
def format_reward(completion: str, sample: Sample, cfg) -> float:
  tokens = tuple(cfg.functional_tokens)
  lines = completion.split("\n")
  own_line = all(line.strip() == t for line in lines for t in tokens if t in line)
  spans = boxed_spans(completion)
  positions = _token_positions(completion, tokens)
  last_token = positions[-1][0] if positions else -1
  one_final_box = len(spans) == 1 and spans[0][0] > last_token
  stray = re.search(r"<\|(?!(?:%s)\|>)[^|<>]*\|>" % "|".join(
      re.escape(t[2:-2]) for t in tokens), completion) is not None
  stripped = completion
  for t in tokens:
    stripped = stripped.replace(t, "")
  reasoning = bool(re.sub(r"\\boxed\{.*\}", "", stripped, flags=re.S).strip(" .\n"))
  return 0.25 * (own_line + one_final_box + (not stray) + reasoning)


@register("functional")
def functional_reward(completion: str, sample: Sample, cfg) -> float:
  used = {t for t in cfg.functional_tokens if t in completion}
  if not used:
    return 0.0
  if not sample.expected_tokens:
    return 1.0
  return 1.0 if used & set(sample.expected_tokens) else 0.5


@register("spam_penalty")
def spam_penalty(completion: str, sample: Sample, cfg) -> float:
  positions = _token_positions(completion, cfg.functional_tokens)
  if len(positions) > cfg.max_functional_tokens:
    return -1.0
  for (p0, t0), (p1, _) in zip(positions, positions[1:]):
    if not completion[p0 + len(t0):p1].strip():
      return -1.0
  return 0.0


@register("length_penalty")
def length_penalty(completion: str, sample: Sample, cfg, num_tokens: int | None = None) -> float:
  n = num_tokens if num_tokens is not None else len(completion) / 4
  over = max(n - cfg.length_budget, 0) / cfg.length_budget
  return -min(over, 1.0)


def compute_rewards(completions: list[str], samples: list[Sample], cfg, *,
                    num_tokens: list[int] | None = None):
  """Total float32[N] and each component float32[N] (every registered one, weighted or not).

  Raises ValueError for a weight whose component is not registered.
  """
  weights = dict(cfg.weights)
  unknown = sorted(set(weights) - set(REWARDS))
  if unknown:
    raise ValueError(f"reward weight {unknown[0]!r} names no registered reward; registered: "
                     f"{sorted(REWARDS)}")
  if len(completions) != len(samples):
    raise ValueError(f"{len(completions)} completions but {len(samples)} samples")
  parts = {}
  for name, fn in REWARDS.items():
    values = []
    for i, (text, sample) in enumerate(zip(completions, samples)):
      if name == "length_penalty":
        values.append(fn(text, sample, cfg, None if num_tokens is None else num_tokens[i]))
      else:
        values.append(fn(text, sample, cfg))
    parts[name] = np.asarray(values, np.float32)
  total = np.zeros(len(completions), np.float32)
  for name, w in weights.items():
    total += np.float32(w) * parts[name]
  return total, parts
