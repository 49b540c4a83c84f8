"""Reading an answer out of a model's reply, and comparing it with the gold one: rule-based
and reproducible, no judge model. The RL reward (`rl.rewards`) and the benchmark evaluator
(`eval.extract`) both read answers here.

  extract_boxed  the content of the last \\boxed{...}
  match_answer   a predicted answer against the gold one (choice, number or text)
  extract        the answer a reply gives to a question, with the rule that found it

`extract` reads a reply as a person would. Full-width characters are read as their ASCII
forms (`Ｂ．` is `B.`) and markdown emphasis is ignored (`**B**` is `B`). For a
multiple-choice question (options A, B, ...), in order (the method it reports in brackets):

  boxed        the last \\boxed{}, its content read as a letter in any common form (`B`,
               `(B)`, `Option B`, `(B) 5`) or as one option's text (`match_answer`); a box
               that names no single option is a failure (the model committed to a final
               answer that is not an option).   `So \\boxed{(C) dark red}.` -> C
  committed    [letter] else the last commitment to a letter anywhere in the reply: "the
               answer is D", "Answer: C", "final answer: (B)", "the correct option is A",
               "I choose B".   `The answer is B. A is wrong because it is red.` -> B
  opening      [letter] else a reply that opens with an option, `B.`, `(B)`, `B:`, `B)`,
               `**B**`, `Option B`, and then explains, is read as that option, unless it
               ends on another lone letter (`B. On second thought, C.` -> C); letters the
               explanation names do not count.   `C. The green segment is longer than the
               red one, so A cannot be right.` -> C
  letter       else a single option letter standing alone in the last 64 characters:
               `B`, `(B)`, `(b)`, `B.`; `A` and `I` followed by a lower-case word ("A cat",
               "I think") are words, not letters, unless the word is one of "is", "was",
               "or", "and", "seems", "appears".   `A cat sits on it. So B.` -> B
  ambiguous    two different letters standing alone there, with no commitment, are a
               failure: the reply names options without choosing.   `It could be A or B.`
               -> none
  option_text  else the one option whose text (normalised as `match_answer` normalises it)
               occurs in the reply as whole words; an option found only inside a longer
               option that also occurs ("red" in "dark red") does not count.
               `It is blue.` -> B (blue); `red or blue, hard to say` -> none

For an open question: the last \\boxed{}, else what follows the last "answer is" /
"Answer:" on its line, else a one-line reply of at most 32 characters. Anything else is a
failure: (None, None).
"""

from __future__ import annotations

import math
import re
import unicodedata

ANSWER_TYPES = ("choice", "number", "text")


BOX = "\\boxed{"
_BRACE = re.compile(r"\\[{}]|[{}]")  # escaped braces \{ \} do not count


def box_end(text: str, start: int) -> int | None:
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
  i = text.rfind(BOX)
  if i < 0:
    return None
  start = i + len(BOX)
  end = box_end(text, start)
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
# Extraction

TAIL_CHARS = 64
_LONE = re.compile(r"(?<![\w\\'\u2019])(?:\(([A-Za-z])\)|([A-Z]))(?![\w'\u2019])")
_NEXT_WORD = re.compile(r"\s+([a-z]+)")
_LETTER_VERBS = {"is", "was", "or", "and", "seems", "appears"}  # "A is", "A or B": a letter
_ANSWER_IS = re.compile(r"(?:answer\s+is|answer\s*:)\s*(.+)", re.I)


def _tail(text: str) -> str:
  """The last TAIL_CHARS characters, widened back to a word boundary."""
  text = text.rstrip()
  start = max(len(text) - TAIL_CHARS, 0)
  while start > 0 and not text[start - 1].isspace():
    start -= 1
  return text[start:]


def _tail_letters(text: str, letters) -> list[tuple[str, int]]:
  """(letter, end offset in the tail) of each option letter standing alone near the end."""
  tail, found = _tail(text), []
  for m in _LONE.finditer(tail):
    letter = (m.group(1) or m.group(2)).upper()
    if m.group(2) in ("A", "I"):
      word = _NEXT_WORD.match(tail, m.end())
      if word and word.group(1) not in _LETTER_VERBS:
        continue
    if letter in letters:
      found.append((letter, m.end()))
  return found


def lone_letter(text: str, letters) -> str | None:
  """The single option letter standing alone near the end of `text`, else None."""
  found = {letter for letter, _ in _tail_letters(text, letters)}
  return found.pop() if len(found) == 1 else None


_MARKDOWN = re.compile(r"[*_`~]+")
_PHRASE = (r"(?i:(?:final\s+|correct\s+|right\s+|best\s+)?(?:answer|option|choice)"
           r"(?:\s+(?:is|would\s+be|should\s+be|will\s+be)\s*[:=]?|\s*[:=])"
           r"|i\s+(?:choose|pick|select|go\s+with|would\s+choose))")
_COMMITTED = re.compile(_PHRASE + r"\s*(?i:(?:option|choice)\s+)?[(\[]?([A-Z])(?![\w'\u2019])")
_OPENING = re.compile(r"\s*(?:#+\s*)?(?i:(?:(?:final\s+)?answer\s*[:=]?|option|choice)\s*)?"
                      r"(?:[(\[]\s*([A-Za-z])\s*[)\]]|([A-Z])(?:\s*[.:)\u3002,]|\s+[-\u2013\u2014]\s|\s*$))")
_ENDS = re.compile(r"[\s.!)\]\u3002]*$")


def _plain(text: str) -> str:
  """The reply with full-width forms read as ASCII and markdown emphasis dropped."""
  return _MARKDOWN.sub("", unicodedata.normalize("NFKC", text))


def committed_letter(text: str, letters) -> str | None:
  """The option letter of the last "the answer is X"-like commitment, else None."""
  hits = [m.group(1) for m in _COMMITTED.finditer(text) if m.group(1) in letters]
  return hits[-1] if hits else None


def opening_letter(text: str, letters) -> str | None:
  """The option a reply opens with (`B.`, `(B)`, `B:`, `Option B`), unless the reply ends
  on another lone letter; else None."""
  m = _OPENING.match(text)
  letter = m and (m.group(1) or m.group(2) or "").upper()
  if not letter or letter not in letters:
    return None
  tail = _tail(text)
  last = _tail_letters(text, letters)[-1:]
  if last and last[0][0] != letter and _ENDS.fullmatch(tail[last[0][1]:]) \
      and len(text.rstrip()) - len(tail) + last[0][1] > m.end():
    return last[0][0]
  return letter


def option_text(text: str, options) -> str | None:
  """The letter of the one option whose text occurs in `text`, else None."""
  norm = _normalise(text)
  spans = {}
  for letter, value in options:
    v = _normalise(value)
    if v:
      spans[letter] = [m.span() for m in re.finditer(rf"(?<!\w){re.escape(v)}(?!\w)", norm)]
  inside = lambda s, other: any(a <= s[0] and s[1] <= b and (a, b) != s for a, b in other)
  hits = [k for k, ss in spans.items() if ss and any(
      not any(inside(s, o) for j, o in spans.items() if j != k) for s in ss)]
  return hits[0] if len(hits) == 1 else None


def extract(completion: str, options=()) -> tuple[str | None, str | None]:
  """(extracted answer, method) of a completion; (None, None) when nothing parses.
  `options`: ((letter, text), ...), empty for an open question."""
  boxed = extract_boxed(completion)
  if options:
    letters = [k for k, _ in options]
    choices = [v for _, v in options]
    if boxed is not None:
      hits = [k for k in letters if match_answer(boxed, k, "choice", choices)]
      return (hits[0], "boxed") if len(hits) == 1 else (None, None)
    text = _plain(completion)
    letter = committed_letter(text, letters) or opening_letter(text, letters)
    if letter:
      return letter, "letter"
    named = {k for k, _ in _tail_letters(text, letters)}
    if len(named) == 1:
      return named.pop(), "letter"
    if named:  # several options named, none chosen
      return None, None
    letter = option_text(text, options)
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
