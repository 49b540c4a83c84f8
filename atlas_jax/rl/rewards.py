"""The composite ATLAS reward, scored on the host on decoded completions.

A completion is the decoded assistant text (functional tokens kept, `<|im_end|>` dropped).
Each component is `fn(completion, sample, cfg) -> float`; `compute_rewards` evaluates every
registered component and sums them with `cfg.weights`:

  accuracy        1 if the last \\boxed{} matches the gold answer (`match_answer`), else 0.
  format          four checks worth 0.25 each (0 for an empty completion):
                  reasoning  a word of text before the final box (tokens do not count);
                  box        exactly one \\boxed{}, balanced, after the last functional token,
                             followed by nothing but punctuation;
                  tokens     every functional token alone on its line, right after a line
                             of text (the sentence saying what the operation is about);
                  clean      no `<|...|>` special token other than the functional ones.
  functional      1 if an appropriate token is used (any registered token when the sample
                  expects none), 0.5 if only other tokens, 0 if none.
  spam_penalty    -1 for more than `max_functional_tokens` tokens, or for two tokens with
                  no word between them; 0 otherwise. The weight sets the scale.
  length_penalty  -(length - length_budget) / length_budget, clipped to [-1, 0]; length in
                  tokens when `num_tokens` is given, else characters / 4.

`register(name)` adds or replaces a component; a component that takes a `num_tokens`
keyword gets the completion's token count. Pure Python and numpy.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import re
from typing import Callable

import ml_collections
import numpy as np

from atlas_jax.functional_tokens import FUNCTIONAL_TOKENS

TASK_TOKENS = {"line_length": "<|Line|>", "count": "<|Text|>", "region": "<|Shape|>",
               "relation": "<|Arrow|>", "mirror": "<|Manip|>"}
ANSWER_TYPES = ("choice", "number", "text")


@dataclasses.dataclass(frozen=True)
class Sample:
  """What the reward knows of a rollout's prompt.

  answer_type: "choice" | "number" | "text", or None to infer it from the gold answer.
  expected_tokens: the functional tokens appropriate to the task; None takes them from
    `TASK_TOKENS[task]` when the task is a known family; () means any token is fine.
  """

  answer: str
  answer_type: str | None = None
  choices: tuple[str, ...] | None = None
  task: str | None = None
  expected_tokens: tuple[str, ...] | None = None

  def __post_init__(self):
    if self.answer_type not in (None,) + ANSWER_TYPES:
      raise ValueError(f"answer_type {self.answer_type!r} is not one of {ANSWER_TYPES}")
    set_ = functools.partial(object.__setattr__, self)
    set_("answer", str(self.answer))
    if self.choices is not None:
      set_("choices", tuple(str(c) for c in self.choices))
    if self.expected_tokens is None and self.task in TASK_TOKENS:
      set_("expected_tokens", (TASK_TOKENS[self.task],))
    elif self.expected_tokens is not None:
      set_("expected_tokens", tuple(self.expected_tokens))


def default_reward_config() -> ml_collections.ConfigDict:
  """The reward settings of `configs/base.py` (`c.rl.reward`), for use outside a recipe."""
  return ml_collections.ConfigDict(dict(
      weights=dict(accuracy=1.0, format=0.2, functional=0.2, spam_penalty=0.2,
                   length_penalty=0.1),
      max_functional_tokens=6, length_budget=256, functional_tokens=FUNCTIONAL_TOKENS))


# ---------------------------------------------------------------------------------------
# Answers

_BOX = "\\boxed{"
_BRACE = re.compile(r"\\[{}]|[{}]")  # escaped braces \{ \} do not count


def _box_end(text: str, start: int) -> int | None:
  """Index of the `}` closing the brace opened just before `start`; None if unbalanced."""
  depth = 1
  for m in _BRACE.finditer(text, start):
    tok = m.group()
    if len(tok) == 1:
      depth += 1 if tok == "{" else -1
      if not depth:
        return m.start()
  return None


def extract_boxed(text: str) -> str | None:
  """Content of the last \\boxed{...} (nested braces balanced); None if absent or unbalanced.

  A truncated last box gives None even if an earlier box is complete: the final answer is
  the last one written.
  """
  i = text.rfind(_BOX)
  if i < 0:
    return None
  start = i + len(_BOX)
  end = _box_end(text, start)
  return None if end is None else text[start:end]


_WRAPPER = re.compile(r"\\(?:text|textbf|textit|textrm|mathrm|mathbf|mbox|operatorname"
                      r"|boxed)\s*\{([^{}]*)\}")
_NOISE = re.compile(r"\$|\\[()\[\],!;: ]|\\left|\\right|\^\s*\{?\\circ\}?|°")


def _unwrap(s: str) -> str:
  """Drops math delimiters, spacing commands, degree signs and \\text{}-like wrappers."""
  s = s.replace("\\%", "%").replace("\u2212", "-")
  while True:
    t = _WRAPPER.sub(r"\1", s)
    if t == s:
      break
    s = t
  return _NOISE.sub(" ", s).strip()


def _normalise(s: str) -> str:
  """Lowercase words without articles, punctuation or extra spaces ("The top-left." ->
  "top left")."""
  s = re.sub(r"(?<=[a-z])-(?=[a-z])", " ", _unwrap(s).lower())
  s = re.sub(r"[^\w\s.%+-]", " ", s)
  s = re.sub(r"\b(?:a|an|the)\b", " ", s)
  return " ".join(s.split()).strip(" .")


def _same_text(a: str, b: str) -> bool:
  na, nb = _normalise(a), _normalise(b)
  return na == nb if na or nb else a.strip().lower() == b.strip().lower()


_REAL = r"[-+]?(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?|\.\d+)(?:e[-+]?\d+)?"
_PLAIN = re.compile(rf"({_REAL})(?:\s*([a-z]+)\.?)?")  # a unit may follow: "5 cm"
_FRAC = re.compile(rf"(-?)\\[dt]?frac\s*\{{\s*({_REAL})\s*\}}\s*\{{\s*({_REAL})\s*\}}"
                   rf"|({_REAL})\s*/\s*({_REAL})")


def _real(s: str) -> float:
  return float(s.replace(",", ""))


def _number(s: str) -> tuple[float, bool, str] | None:
  """(value, is_percent, unit) of a numeric answer, or None.

  Reads `3`, `-2.5`, `1,000` (comma only as thousands separator), `1e-3`, `\\frac{1}{2}`,
  `1/2`, `50%`, `$x = 5$` (the right side of the last `=`), `90^\\circ`, `5 cm`.
  """
  s = _unwrap(s).lower()
  s = s.rsplit("=", 1)[-1].strip().rstrip(".")
  percent = s.endswith("%")
  s = s.rstrip("%").strip()
  m = _FRAC.fullmatch(s)
  if m:
    if m.group(2) is not None:
      num, den, sign = _real(m.group(2)), _real(m.group(3)), -1.0 if m.group(1) else 1.0
    else:
      num, den, sign = _real(m.group(4)), _real(m.group(5)), 1.0
    return (sign * num / den, percent, "") if den else None
  m = _PLAIN.fullmatch(s)
  return (_real(m.group(1)), percent, m.group(2) or "") if m else None


def _same_number(p, g, rel_tol: float, abs_tol: float) -> bool:
  """Units must agree when both sides name one. A percent on one side only matches
  either reading: 50% = 0.5 and 50% = 50."""
  close = lambda a, b: math.isclose(a, b, rel_tol=rel_tol, abs_tol=abs_tol)
  (pv, pp, pu), (gv, gp, gu) = p, g
  if pu and gu and pu != gu:
    return False
  if pp == gp:
    return close(pv, gv)
  pct, other = (pv, gv) if pp else (gv, pv)
  return close(pct, other) or close(pct / 100, other)


_LETTER = re.compile(r"(?:(?:the\s+)?(?:answer|option|choice)(?:\s+is)?\s*:?\s*)?"
                     r"(?:\(([a-z])\)|([a-z])(?:[.:)]|(?=\s*$)))\s*(.*)", re.I | re.S)


def _letter(s: str) -> tuple[str, str] | None:
  """(upper-case letter, rest) of `B`, `(b)`, `B.`, `Option B`, `(B) 5`, `B: 5`; else None."""
  m = _LETTER.fullmatch(s.strip())
  return ((m.group(1) or m.group(2)).upper(), m.group(3).strip()) if m else None


def match_answer(pred: str | None, gold: str, answer_type: str | None = None,
                 choices=None, *, rel_tol: float = 1e-4, abs_tol: float = 1e-6) -> bool:
  """Whether a predicted answer equals the gold one.

  choice: the gold is a letter (or the text of one of `choices`); the prediction may be
    the letter in any common form (`B`, `(B)`, `b.`, `Option B`, `(B) 5` where the text
    must then agree), or the text of the gold choice (gold `B`, choices `3 5 7 9`: `5`).
  number: |p - g| <= max(rel_tol * max(|p|, |g|), abs_tol) (see `_number` for the forms);
    a percent on one side only matches either reading (`50%` = `0.5` = `50`).
  text: equality after dropping case, spacing, punctuation, articles and \\text{} wrappers.
  None infers: choice if the gold is a single letter or one of `choices`, number if gold
  and prediction both read as numbers, else text.
  """
  if pred is None or not pred.strip():
    return False
  gold_letter = _letter(gold)
  k = None
  if gold_letter and not gold_letter[1]:
    k = ord(gold_letter[0]) - ord("A")
  elif choices:
    k = next((i for i, c in enumerate(choices) if _same_text(c, gold)), None)
  if answer_type is None:
    answer_type = "choice" if k is not None else "text"
    if answer_type == "text" and _number(gold) and _number(pred):
      answer_type = "number"
  if answer_type == "choice":
    if k is None:
      return _same_text(pred, gold)
    choice_text = choices[k] if choices and k < len(choices) else None
    p = _letter(pred)
    if p and p[0] == chr(ord("A") + k):
      return (not p[1] or choice_text is None
              or match_answer(p[1], choice_text, rel_tol=rel_tol, abs_tol=abs_tol))
    return (choice_text is not None and p is None
            and match_answer(pred, choice_text, rel_tol=rel_tol, abs_tol=abs_tol))
  if answer_type == "number":
    p, g = _number(pred), _number(gold)
    return p is not None and g is not None and _same_number(p, g, rel_tol, abs_tol)
  if answer_type == "text":
    return _same_text(pred, gold)
  raise ValueError(f"answer_type {answer_type!r} is not one of {ANSWER_TYPES}")


# ---------------------------------------------------------------------------------------
# Components

REWARDS: dict[str, Callable] = {}


def register(name: str):
  """Decorator adding (or replacing) the component `name`: `fn(completion, sample, cfg)`."""
  if not isinstance(name, str) or not name:
    raise ValueError(f"a reward name must be a non-empty string, got {name!r}")

  def wrap(fn):
    REWARDS[name] = fn
    return fn
  return wrap


@functools.lru_cache(maxsize=16)
def _token_pattern(tokens: tuple[str, ...]) -> re.Pattern:
  return re.compile("|".join(re.escape(t) for t in sorted(tokens, key=len, reverse=True)))


def _tokens_used(completion: str, cfg) -> list[re.Match]:
  tokens = tuple(cfg.functional_tokens)
  return list(_token_pattern(tokens).finditer(completion)) if tokens else []


_SPECIAL = re.compile(r"<\|[^<>|\n]{1,64}\|>")
_TAIL = re.compile(r"(?:[\s.!$*)\]]|\\[)\]])*")  # what may follow the final box
_WORD = re.compile(r"[^\W\d_]{2,}")


@register("accuracy")
def accuracy(completion: str, sample: Sample, cfg) -> float:
  return float(match_answer(extract_boxed(completion), sample.answer, sample.answer_type,
                            sample.choices))


@register("format")
def format_reward(completion: str, sample: Sample, cfg) -> float:
  if not completion.strip():
    return 0.0
  tokens = tuple(cfg.functional_tokens)
  used = _tokens_used(completion, cfg)
  box = completion.rfind(_BOX)
  end = _box_end(completion, box + len(_BOX)) if box >= 0 else None
  box_ok = (end is not None and completion.count(_BOX) == 1
            and (not used or box > used[-1].end())
            and _TAIL.fullmatch(completion, end + 1) is not None)
  before = completion[:box] if box >= 0 else completion
  if used:
    before = _token_pattern(tokens).sub(" ", before)
  reasoning = _WORD.search(before) is not None
  tokens_ok, prev = True, ""  # prev: the last non-blank line
  for line in completion.split("\n") if used else ():
    line = line.strip()
    if line and _token_pattern(tokens).search(line):
      tokens_ok &= line in tokens and bool(prev) and prev not in tokens
    prev = line or prev
  clean = all(m.group() in tokens for m in _SPECIAL.finditer(completion))
  return 0.25 * (reasoning + box_ok + tokens_ok + clean)


@register("functional")
def functional_reward(completion: str, sample: Sample, cfg) -> float:
  used = {m.group() for m in _tokens_used(completion, cfg)}
  if not used:
    return 0.0
  if not sample.expected_tokens:
    return 1.0
  return 1.0 if used & set(sample.expected_tokens) else 0.5


@register("spam_penalty")
def spam_penalty(completion: str, sample: Sample, cfg) -> float:
  used = _tokens_used(completion, cfg)
  limit = cfg.max_functional_tokens
  if limit is not None and len(used) > limit:
    return -1.0
  for a, b in zip(used, used[1:]):
    if not re.search(r"\w", completion[a.end():b.start()]):
      return -1.0
  return 0.0


@register("length_penalty")
def length_penalty(completion: str, sample: Sample, cfg, *,
                   num_tokens: int | None = None) -> float:
  budget = cfg.length_budget
  if not budget:
    return 0.0
  n = len(completion) / 4 if num_tokens is None else num_tokens
  return -min(max(n - budget, 0) / budget, 1.0)


def overlong_penalty(num_tokens, max_length: int, buffer: int,
                     penalty: float = 1.0) -> np.ndarray:
  """DAPO's soft overlong punishment float32[N] of completion lengths int[N] (tokens).

  0 up to max_length - buffer, then falling linearly to -penalty at max_length (and
  beyond), as verl's DAPO reward manager (overlong_buffer.len, .penalty_factor). It
  depends on the sampling budget, not on the text, so it is added to the rewards outside
  `compute_rewards`. buffer 0 gives zeros.
  """
  n = np.asarray(num_tokens, np.float64).reshape(-1)
  if buffer <= 0:
    return np.zeros(n.shape, np.float32)
  if buffer > max_length:
    raise ValueError(f"overlong buffer {buffer} exceeds the maximum length {max_length}")
  exceed = n - (max_length - buffer)
  return np.clip(-exceed / buffer * penalty, -penalty, 0.0).astype(np.float32)


@functools.lru_cache(maxsize=None)
def _takes_num_tokens(fn) -> bool:
  try:
    return "num_tokens" in inspect.signature(fn).parameters
  except (TypeError, ValueError):
    return False


def compute_rewards(completions: list[str], samples: list[Sample], cfg, *,
                    num_tokens: list[int] | None = None):
  """Scores N completions.

  Args:
    completions: decoded assistant texts.
    samples: one `Sample` per completion.
    cfg: `default_reward_config()` or any object with `weights` (name -> float),
      `max_functional_tokens`, `length_budget`, `functional_tokens`.
    num_tokens: optional token count per completion (for `length_penalty`).
  Returns:
    (total float32[N], {name: float32[N]} for every registered component, weighted or
    not), total = sum of weight * component over `cfg.weights`.
  """
  weights = {}
  for name, w in cfg.weights.items():
    if name not in REWARDS:
      raise ValueError(f"reward weight {name!r} names no registered reward; registered: "
                       f"{sorted(REWARDS)}")
    try:
      weights[name] = float(w)
    except (TypeError, ValueError):
      raise ValueError(f"reward weight {name!r} is {w!r}; expected a number") from None
  n = len(completions)
  if len(samples) != n:
    raise ValueError(f"{n} completions but {len(samples)} samples")
  if num_tokens is not None and len(num_tokens) != n:
    raise ValueError(f"{n} completions but {len(num_tokens)} token counts")
  parts = {}
  for name, fn in REWARDS.items():
    if _takes_num_tokens(fn) and num_tokens is not None:
      values = [fn(t, s, cfg, num_tokens=int(k))
                for t, s, k in zip(completions, samples, num_tokens)]
    else:
      values = [fn(t, s, cfg) for t, s in zip(completions, samples)]
    parts[name] = np.asarray(values, np.float32).reshape(n)
    if not np.isfinite(parts[name]).all():
      i = int(np.flatnonzero(~np.isfinite(parts[name]))[0])
      raise ValueError(f"reward {name!r} gave {parts[name][i]} for completion {i}; "
                       "expected a finite number")
  total = np.zeros(n, np.float32)
  for name, w in weights.items():
    total += np.float32(w) * parts[name]
  return total, parts
