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
exactly as the preprocessing will take them (`load_images`); only regular files are opened
(a FIFO or a device would block or never end). A file of which no record can be used
raises `NoUsableRecord`, whose message is one sentence naming the file and the counts.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import stat
from typing import Iterable, Mapping

from atlas_jax.data import image as image_lib
from atlas_jax.functional_tokens import FUNCTIONAL_TOKENS

REASONS = (
    "undecodable_bytes",      # a line (or record) that is not valid UTF-8
    "invalid_text",           # a lone surrogate (a "\\ud800" escape): not Unicode text
    "malformed_json",         # not JSON, not an object, too deep or a too long number
    "unknown_format",         # an object no reader recognises
    "read_error",             # any other failure while reading a record or its images
    "missing_field", "bad_field_type", "duplicate_id",
    "unknown_special_token",  # a <|...|> that is neither a functional nor a known token
    "image_count_mismatch",   # <image> placeholders != images
    "missing_image", "corrupt_image",
    "not_a_regular_file",     # an image path naming a directory, FIFO, device or socket
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
_SURROGATE = re.compile("[\ud800-\udfff]")
_FILE_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
               (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
               (stat.S_ISSOCK, "a socket"))


class BadRecord(ValueError):
  """A record that cannot be used; `reason` is one of REASONS."""

  def __init__(self, reason: str, detail: str):
    assert reason in REASONS, reason
    super().__init__(f"{reason}: {detail}")
    self.reason = reason
    self.detail = detail


class NoUsableRecord(ValueError):
  """A data file none of whose records can be used. Its message is one sentence naming the
  file and the skip counts by reason, e.g. `no usable record in data/x.jsonl: missing_image
  40 (relative image paths were resolved against the file's folder /data; set
  data.image_root if they are relative to another folder)`. Raised before any training;
  launchers print the message and exit non-zero."""

  def __init__(self, path: str, skipped: Mapping[str, int], *, image_root: str = "",
               root_name: str = "data.image_root", note: str = ""):
    counts = ", ".join(f"{reason} {n}" for reason, n in sorted(skipped.items()) if n)
    message = f"no usable record in {path}: {counts or 'it holds no record'}"
    if note:
      message += f" ({note})"
    if skipped.get("missing_image"):
      folder = os.path.dirname(os.path.abspath(path))
      message += (f" (relative image paths were resolved against {root_name} {image_root}, "
                  f"then the file's folder {folder})" if image_root else
                  f" (relative image paths were resolved against the file's folder {folder}; "
                  f"set {root_name} if they are relative to another folder)")
    super().__init__(message)
    self.path, self.skipped = path, dict(skipped)


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
  """One JSON object. Raises BadRecord (also for a nesting deeper than Python's recursion
  limit and an integer longer than its 4,300-digit conversion limit)."""
  try:
    d = json.loads(line)
  except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
    raise BadRecord("malformed_json", f"{type(e).__name__}: {str(e):.200}") from None
  if not isinstance(d, dict):
    raise BadRecord("malformed_json", f"expected an object, got {type(d).__name__}")
  return d


def check_text(rec: Trajectory, allowed_tokens: Iterable[str] = FUNCTIONAL_TOKENS) -> Trajectory:
  """Text that cannot be stored (a lone surrogate in any field, image paths included),
  unknown special tokens and the placeholder count. Returns `rec`; raises BadRecord."""
  allowed = set(allowed_tokens)
  users = [rec.question] + [u for u, _ in rec.history]
  others = [rec.trajectory] + [a for _, a in rec.history] + [rec.system or ""]
  named = {"id": rec.id, "answer": rec.answer, "task": rec.task or "",
           "answer_type": rec.answer_type or "", "choices": "".join(rec.choices or ()),
           "images": "".join(p for p in rec.images if isinstance(p, str)),
           "text": "".join(users + others)}
  for field, text in named.items():
    m = _SURROGATE.search(text)
    if m:
      raise BadRecord("invalid_text", f"lone surrogate U+{ord(m.group()):04X} in the {field} "
                      f"of record {_SURROGATE.sub('?', rec.id)!r}")
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
  there), else under `base_dir` (the data file's folder). A path with a NUL character
  (which no file name holds) raises BadRecord."""
  if "\0" in path:
    raise BadRecord("bad_field_type", f"image path {path!r:.80} contains a NUL character")
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
      if image_lib.exif_orientation(img) in image_lib.SWAPS_SIDES:
        w, h = h, w
      if img.mode not in ("RGB", "L"):
        try:
          image_lib.to_rgb(img)
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


def read_image_file(path: str) -> bytes:
  """The bytes of an image file, refused before it is opened unless it is a regular file
  (a FIFO blocks, /dev/zero never ends). Raises BadRecord."""
  try:
    mode = os.stat(path).st_mode
  except (OSError, ValueError) as e:  # ValueError: a NUL or an unencodable character
    raise BadRecord("missing_image", f"{path!r:.200}: {getattr(e, 'strerror', None) or e}") \
        from None
  if not stat.S_ISREG(mode):
    kind = next((name for test, name in _FILE_KINDS if test(mode)), "not a regular file")
    raise BadRecord("not_a_regular_file", f"{path} is {kind}, not a regular file")
  try:
    with open(path, "rb") as f:
      return f.read()
  except OSError as e:
    raise BadRecord("missing_image", f"{path}: {e.strerror}") from None


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
      data, where = read_image_file(ref), ref
    h, w = check_image(data, min_pixels=min_pixels, max_pixels=max_pixels, where=where)
    patches += (h // 14) * (w // 14)
    blobs.append(data)
  if max_patches is not None and patches > max_patches:
    raise BadRecord("too_many_patches", f"{patches} patches, data.max_patches is {max_patches}")
  return blobs


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
