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
     "choices": ["2", "3", "4", "5"],              # optional
     "system": "You are ...",                      # optional system prompt
     "history": [{"user": "...", "assistant": "..."}]}  # optional earlier turns

`question`/`trajectory` are the last user/assistant turn; `history` holds the turns before
them (the SFT loss covers every assistant turn). `<image>` in user text marks where an
image goes: either no placeholder at all (the images open the first user turn) or exactly
one per image, in order.

A bad record never ends a run: it raises `BadRecord(reason, detail)` here, and readers
skip it and count it by reason (`REASONS`). Images are checked here once, at build time,
exactly as the preprocessing will take them (`load_images`).
"""

from __future__ import annotations

import collections
import dataclasses
import io
import json
import os
import re
from typing import Iterable

from atlas_jax.data import image as image_lib
from atlas_jax.functional_tokens import FUNCTIONAL_TOKENS

REASONS = (
    "undecodable_bytes",      # a line (or record) that is not valid UTF-8
    "malformed_json",         # not JSON, or not an object
    "unknown_format",         # an object no reader recognises
    "missing_field", "bad_field_type", "duplicate_id",
    "unknown_special_token",  # a <|...|> that is neither a functional nor a known token
    "image_count_mismatch",   # <image> placeholders != images
    "missing_image", "corrupt_image",
    "image_too_large",        # over PIL.Image.MAX_IMAGE_PIXELS (decompression bomb)
    "extreme_aspect_ratio",   # > 200, which Qwen2.5-VL's resize rejects
    "unusable_image",         # decodes, but is empty or its mode does not convert to RGB
    "too_many_images",        # > data.max_images
    "too_many_patches",       # > data.max_patches after the resize
    "too_long",               # > data.max_length tokens once rendered (pipeline)
    "render_error",           # any other failure while rendering (pipeline)
)
ANSWER_TYPES = ("choice", "number", "text")
IMAGE_PLACEHOLDER = "<image>"
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
  """One record. `images` are paths, or the encoded bytes of an embedded image."""

  id: str
  images: tuple[str | bytes, ...]
  question: str
  trajectory: str
  answer: str
  task: str | None = None
  answer_type: str | None = None
  choices: tuple[str, ...] | None = None
  system: str | None = None
  history: tuple[tuple[str, str], ...] = ()

  def to_json(self) -> dict:
    d = dataclasses.asdict(self)
    d["images"] = list(self.images)
    d["choices"] = list(self.choices) if self.choices is not None else None
    d["history"] = [{"user": u, "assistant": a} for u, a in self.history]
    return d


_REQUIRED = {"id": str, "images": list, "question": str, "trajectory": str, "answer": str}


def decode_line(raw: bytes) -> str:
  """UTF-8 bytes -> str (a leading BOM dropped). Raises BadRecord."""
  try:
    return raw.decode("utf-8-sig")
  except UnicodeDecodeError as e:
    raise BadRecord("undecodable_bytes", f"byte {e.start}: {e.reason}") from None


def load_json(line: str) -> dict:
  """One JSON object. Raises BadRecord."""
  try:
    d = json.loads(line)
  except json.JSONDecodeError as e:
    raise BadRecord("malformed_json", str(e)) from None
  if not isinstance(d, dict):
    raise BadRecord("malformed_json", f"expected an object, got {type(d).__name__}")
  return d


def check_text(rec: Trajectory, allowed_tokens: Iterable[str] = FUNCTIONAL_TOKENS) -> Trajectory:
  """Unknown special tokens and the placeholder count. Returns `rec`; raises BadRecord."""
  allowed = set(allowed_tokens)
  users = [rec.question] + [u for u, _ in rec.history]
  others = [rec.trajectory] + [a for _, a in rec.history] + [rec.system or ""]
  for text in users + others:
    unknown = sorted(set(_SPECIAL.findall(text)) - allowed)
    if unknown:
      raise BadRecord("unknown_special_token", f"{unknown[0]} in record {rec.id!r}")
  placed = sum(u.count(IMAGE_PLACEHOLDER) for u in users)
  if any(IMAGE_PLACEHOLDER in t for t in others):
    raise BadRecord("image_count_mismatch", f"{IMAGE_PLACEHOLDER} outside a user turn")
  if placed not in (0, len(rec.images)):
    raise BadRecord("image_count_mismatch", f"{placed} {IMAGE_PLACEHOLDER} placeholders for "
                    f"{len(rec.images)} images")
  return rec


def resolve_path(path: str, base_dir: str, image_root: str = "") -> str:
  """An image path: absolute as is; relative under `image_root` (when set and present
  there), else under `base_dir` (the data file's folder)."""
  if os.path.isabs(path):
    return os.path.normpath(path)
  if not image_root:
    return os.path.normpath(os.path.join(base_dir, path))
  under_root = os.path.join(image_root, path)
  return os.path.normpath(under_root if os.path.isfile(under_root) else
                          os.path.join(base_dir, path))


def from_dict(d: dict, *, base_dir: str, image_root: str = "") -> Trajectory:
  """A project-schema object -> Trajectory, image paths made absolute, fields checked (the
  text is checked by `check_text`). Raises BadRecord."""
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
  for field in ("task", "answer_type", "system"):
    if d.get(field) is not None and not isinstance(d[field], str):
      raise BadRecord("bad_field_type", f"{field!r} must be a string or null")
  if d.get("answer_type") not in (None,) + ANSWER_TYPES:
    raise BadRecord("bad_field_type", f"answer_type {d['answer_type']!r} is not one of "
                    f"{ANSWER_TYPES}")
  choices = d.get("choices")
  if choices is not None and not (isinstance(choices, list) and
                                  all(isinstance(c, str) for c in choices)):
    raise BadRecord("bad_field_type", "'choices' must be a list of strings or null")
  history = d.get("history") or []
  if not (isinstance(history, list) and all(
      isinstance(h, dict) and isinstance(h.get("user"), str) and
      isinstance(h.get("assistant"), str) for h in history)):
    raise BadRecord("bad_field_type", "'history' must be a list of {'user': str, "
                    "'assistant': str}")
  images = tuple(resolve_path(p, base_dir, image_root) for p in d["images"])
  return Trajectory(id=d["id"], images=images, question=d["question"],
                    trajectory=d["trajectory"], answer=d["answer"], task=d.get("task"),
                    answer_type=d.get("answer_type"),
                    choices=tuple(choices) if choices is not None else None,
                    system=d.get("system") or None,
                    history=tuple((h["user"], h["assistant"]) for h in history))


def parse_line(line: str, *, base_dir: str, image_root: str = "",
               allowed_tokens: Iterable[str] = FUNCTIONAL_TOKENS) -> Trajectory:
  """One JSONL line -> Trajectory, image paths made absolute. Raises BadRecord."""
  return check_text(from_dict(load_json(line), base_dir=base_dir, image_root=image_root),
                    allowed_tokens)


def load_image_bytes(path: str) -> bytes:
  """The encoded bytes of an image, checked to decode. Raises BadRecord."""
  if not os.path.isfile(path):
    raise BadRecord("missing_image", path)
  with open(path, "rb") as f:
    data = f.read()
  check_image(data, where=path)
  return data


def check_image(data: bytes, *, min_pixels: int = image_lib.MIN_PIXELS,
                max_pixels: int = image_lib.MAX_PIXELS, where: str = "image") -> tuple[int, int]:
  """Checks that the preprocessing can take an encoded image: it decodes, is not a
  decompression bomb, is not empty, converts to RGB, and has an aspect ratio within
  Qwen2.5-VL's limit. Returns its resized (height, width); raises BadRecord. (Pillow
  itself refuses headers with a zero side: corrupt_image.)"""
  from PIL import Image
  if not data:
    raise BadRecord("unusable_image", f"{where}: empty file")
  try:
    with Image.open(io.BytesIO(data)) as img:
      w, h = img.size
      if w * h > (Image.MAX_IMAGE_PIXELS or float("inf")):
        raise BadRecord("image_too_large", f"{where}: {w}x{h} pixels")
      img.load()
      if w < 1 or h < 1:
        raise BadRecord("unusable_image", f"{where}: size {w}x{h}")
      if img.mode not in ("RGB", "L", "RGBA", "P"):
        try:
          img.convert("RGB")
        except Exception as e:  # noqa: BLE001
          raise BadRecord("unusable_image", f"{where}: mode {img.mode}: {e}") from None
  except BadRecord:
    raise
  except Image.DecompressionBombError as e:
    raise BadRecord("image_too_large", f"{where}: {e}") from None
  except Exception as e:  # noqa: BLE001  (Pillow raises many types for bad files)
    raise BadRecord("corrupt_image", f"{where}: {e}") from None
  try:
    return image_lib.smart_resize(h, w, 28, min_pixels, max_pixels)
  except ValueError as e:
    raise BadRecord("extreme_aspect_ratio", f"{where}: {w}x{h}: {e}") from None


def load_images(rec: Trajectory, *, min_pixels: int = image_lib.MIN_PIXELS,
                max_pixels: int = image_lib.MAX_PIXELS, max_images: int | None = None,
                max_patches: int | None = None) -> list[bytes]:
  """The encoded bytes of a record's images, each checked (`check_image`), within
  `max_images` and `max_patches` (all images together) when given. Raises BadRecord."""
  if max_images is not None and len(rec.images) > max_images:
    raise BadRecord("too_many_images", f"{len(rec.images)} images, data.max_images is "
                    f"{max_images}")
  blobs, patches = [], 0
  for k, ref in enumerate(rec.images):
    if isinstance(ref, bytes):
      data, where = ref, f"{rec.id} image {k}"
    else:
      try:
        with open(ref, "rb") as f:
          data = f.read()
      except OSError as e:
        raise BadRecord("missing_image", f"{ref}: {e.strerror}") from None
      where = ref
    h, w = check_image(data, min_pixels=min_pixels, max_pixels=max_pixels, where=where)
    patches += (h // 14) * (w // 14)
    blobs.append(data)
  if max_patches is not None and patches > max_patches:
    raise BadRecord("too_many_patches", f"{patches} patches, data.max_patches is {max_patches}")
  return blobs


def read_jsonl(path: str, *, allowed_tokens: Iterable[str] = FUNCTIONAL_TOKENS,
               check_images: bool = True, format: str = "auto", image_root: str = ""):
  """Valid records of a data file (any `formats.FORMATS`) and a Counter of skipped ones by
  reason. A missing file raises FileNotFoundError naming it; bad records never raise."""
  from atlas_jax.data import formats
  records, skipped = [], collections.Counter()
  for rec in formats.iter_records(path, format=format, image_root=image_root,
                                  allowed_tokens=allowed_tokens):
    try:
      if isinstance(rec, BadRecord):
        raise rec
      if check_images:
        load_images(rec)
    except BadRecord as e:
      skipped[e.reason] += 1
      continue
    records.append(rec)
  return records, skipped


def write_jsonl(path: str, records: Iterable[Trajectory | dict], *, base_dir: str | None = None):
  """Writes records; image paths are made relative to `base_dir` (default: the file's).
  Embedded (bytes) images must have been written to files first."""
  base = base_dir or os.path.dirname(os.path.abspath(path))
  with open(path, "w", encoding="utf-8") as f:
    for rec in records:
      d = rec.to_json() if isinstance(rec, Trajectory) else dict(rec)
      d["images"] = [os.path.relpath(p, base) if os.path.isabs(p) else p for p in d["images"]]
      if not d.get("history"):
        d.pop("history", None)
      if d.get("system") is None:
        d.pop("system", None)
      f.write(json.dumps(d, sort_keys=True, ensure_ascii=False) + "\n")
