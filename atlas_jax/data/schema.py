"""The JSONL schema of ATLAS trajectories, its validation, and bad-record accounting.

One JSON object per line:

    {"id": "count-train-000012",                 # unique, non-empty
     "images": ["images/count-train-000012.png"],  # relative to the JSONL's folder, or absolute
     "question": "How many red circles are there? Options: (A) 2 (B) 3 (C) 4 (D) 5",
     "trajectory": "I will number the red circles.\\n<|Text|>\\nThere are 3 of them. "
                   "Therefore the answer is \\\\boxed{B}.",  # "" for RL-only prompts
     "answer": "B",                                # gold answer, non-empty
     "task": "count",                              # optional
     "answer_type": "choice",                      # optional: choice | number | text
     "choices": ["2", "3", "4", "5"]}              # optional

A bad record never ends a run: it raises `BadRecord(reason, detail)` here, and readers
skip it and count it by reason (`REASONS`).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import re
from typing import Iterable

from atlas_jax.functional_tokens import FUNCTIONAL_TOKENS

REASONS = ("malformed_json", "missing_field", "bad_field_type", "missing_image",
           "corrupt_image", "unknown_special_token", "too_long")
ANSWER_TYPES = ("choice", "number", "text")
_SPECIAL = re.compile(r"<\|[^|<>]*\|>")


class BadRecord(ValueError):
  """A record that cannot be used; `reason` is one of REASONS."""

  def __init__(self, reason: str, detail: str):
    assert reason in REASONS, reason
    super().__init__(f"{reason}: {detail}")
    self.reason = reason
    self.detail = detail


@dataclasses.dataclass(frozen=True)
class Trajectory:
  id: str
  images: tuple[str, ...]
  question: str
  trajectory: str
  answer: str
  task: str | None = None
  answer_type: str | None = None
  choices: tuple[str, ...] | None = None

  def to_json(self) -> dict:
    d = dataclasses.asdict(self)
    d["images"] = list(self.images)
    d["choices"] = list(self.choices) if self.choices is not None else None
    return d


_REQUIRED = {"id": str, "images": list, "question": str, "trajectory": str, "answer": str}


def parse_line(line: str, *, base_dir: str,
               allowed_tokens: Iterable[str] = FUNCTIONAL_TOKENS) -> Trajectory:
  """One JSONL line -> Trajectory, image paths made absolute. Raises BadRecord."""
  try:
    d = json.loads(line)
  except json.JSONDecodeError as e:
    raise BadRecord("malformed_json", str(e)) from None
  if not isinstance(d, dict):
    raise BadRecord("malformed_json", f"expected an object, got {type(d).__name__}")
  for field, kind in _REQUIRED.items():
    if field not in d:
      raise BadRecord("missing_field", f"no {field!r}")
    if not isinstance(d[field], kind):
      raise BadRecord("bad_field_type", f"{field!r} is {type(d[field]).__name__}, expected "
                      f"{kind.__name__}")
  for field in ("id", "question", "answer"):
    if not d[field].strip():
      raise BadRecord("missing_field", f"{field!r} is empty")
  if not all(isinstance(p, str) and p for p in d["images"]):
    raise BadRecord("bad_field_type", "'images' must be a list of non-empty strings")
  for field in ("task", "answer_type"):
    if d.get(field) is not None and not isinstance(d[field], str):
      raise BadRecord("bad_field_type", f"{field!r} must be a string or null")
  if d.get("answer_type") not in (None,) + ANSWER_TYPES:
    raise BadRecord("bad_field_type", f"answer_type {d['answer_type']!r} is not one of "
                    f"{ANSWER_TYPES}")
  choices = d.get("choices")
  if choices is not None and not (isinstance(choices, list) and
                                  all(isinstance(c, str) for c in choices)):
    raise BadRecord("bad_field_type", "'choices' must be a list of strings or null")
  allowed = set(allowed_tokens)
  for field in ("question", "trajectory"):
    unknown = sorted(set(_SPECIAL.findall(d[field])) - allowed)
    if unknown:
      raise BadRecord("unknown_special_token", f"{unknown[0]} in {field!r}")
  images = tuple(os.path.normpath(p if os.path.isabs(p) else os.path.join(base_dir, p))
                 for p in d["images"])
  return Trajectory(id=d["id"], images=images, question=d["question"],
                    trajectory=d["trajectory"], answer=d["answer"], task=d.get("task"),
                    answer_type=d.get("answer_type"),
                    choices=tuple(choices) if choices is not None else None)


def load_image_bytes(path: str) -> bytes:
  """The encoded bytes of an image, checked to decode. Raises BadRecord."""
  from PIL import Image
  if not os.path.isfile(path):
    raise BadRecord("missing_image", path)
  with open(path, "rb") as f:
    data = f.read()
  try:
    import io
    with Image.open(io.BytesIO(data)) as img:
      img.load()
  except Exception as e:  # noqa: BLE001  (Pillow raises many types for bad files)
    raise BadRecord("corrupt_image", f"{path}: {e}") from None
  return data


def read_jsonl(path: str, *, allowed_tokens: Iterable[str] = FUNCTIONAL_TOKENS,
               check_images: bool = True):
  """Valid records of a JSONL file and a Counter of skipped ones by reason.

  A missing file raises FileNotFoundError naming it; bad records never raise.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"trajectory file {path} does not exist")
  base = os.path.dirname(os.path.abspath(path))
  records, skipped, seen = [], collections.Counter(), set()
  with open(path) as f:
    for line in f:
      if not line.strip():
        continue
      try:
        rec = parse_line(line, base_dir=base, allowed_tokens=allowed_tokens)
        if check_images:
          for image in rec.images:
            load_image_bytes(image)
      except BadRecord as e:
        skipped[e.reason] += 1
        continue
      if rec.id in seen:
        skipped["bad_field_type"] += 1  # duplicate id
        continue
      seen.add(rec.id)
      records.append(rec)
  return records, skipped


def write_jsonl(path: str, records: Iterable[Trajectory | dict], *, base_dir: str | None = None):
  """Writes records; image paths are made relative to `base_dir` (default: the file's)."""
  base = base_dir or os.path.dirname(os.path.abspath(path))
  with open(path, "w") as f:
    for rec in records:
      d = rec.to_json() if isinstance(rec, Trajectory) else dict(rec)
      d["images"] = [os.path.relpath(p, base) if os.path.isabs(p) else p for p in d["images"]]
      f.write(json.dumps(d, sort_keys=True) + "\n")
