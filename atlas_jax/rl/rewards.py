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
import re
from typing import Callable

import ml_collections
import numpy as np

from atlas_jax import config as config_lib
from atlas_jax.answers import ANSWER_TYPES, BOX, box_end, extract_boxed, match_answer
from atlas_jax.functional_tokens import TASK_TOKENS


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
  """The reward settings of the base config (`c.rl.reward`), for use outside a recipe."""
  return config_lib.base_config().rl.reward


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
  box = completion.rfind(BOX)
  end = box_end(completion, box + len(BOX)) if box >= 0 else None
  box_ok = (end is not None and completion.count(BOX) == 1
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
