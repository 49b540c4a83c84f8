"""Benchmark readers: one list of `Item`s from the files benchmarks are distributed in.

  jsonl    this project's JSONL, or any reader of `data/formats.py` (chat, llava, rl)
  tsv      VLMEvalKit's TSV (V*Bench, HR-Bench, BLINK, MMStar, CV-Bench, MME-RealWorld,
           WeMath): index, image (base64; a Python-list string of base64 images for a
           multi-image row; a value of at most 64 characters is the index of the row whose
           image it reuses), optional image_path, question, optional hint, option columns
           A, B, ... (the non-empty ones count), answer (the letter), category, optional
           l2-category and split
  parquet  a local file in the Hugging Face datasets layout: image, images or
           image_1 ... image_N columns holding {bytes, path}, question and/or prompt,
           choices (or option columns A, B, ...), answer such as "(A)", and a category
           column (category, sub_task, task, ...)

Every item is a `schema.Trajectory` (images as paths or encoded bytes, the gold answer: a
letter for a multiple-choice question) plus what a benchmark adds: its options, hint,
ready-made prompt, category, l2-category and split. Images are decoded only when a row is
rendered. A bad row becomes a `schema.BadRecord`, counted by reason, never raised; a file
with no usable row raises `schema.NoUsableRecord` (one sentence: the file and the counts).
"""

from __future__ import annotations

import ast
import base64
import binascii
import collections
import csv
import dataclasses
import os
import re
import string
from typing import Iterator

from atlas_jax.config import EVAL_FORMATS
from atlas_jax.data import formats, schema
from atlas_jax.data.schema import BadRecord, Trajectory
from atlas_jax.functional_tokens import FUNCTIONAL_TOKENS

# What pandas.read_csv reads as NaN, which VLMEvalKit drops from options and hints.
_NA = {"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND",
       "1.#QNAN", "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"}
_REUSE_MAX = 64  # VLMEvalKit: an image field this short names the row whose image it reuses
_GOLD_LETTER = re.compile(r"\s*\(?\s*([A-Z])\s*\)?\s*[.:]?\s*")
_INLINE = re.compile(r"\(([A-Z])\)\s*(.*?)\s*(?=\([A-Z]\)|$)", re.S)


@dataclasses.dataclass(frozen=True)
class Item:
  """One benchmark row.

  record: the question as a trajectory record (id, images, question, gold answer, system,
    history); `record.answer` is an option letter when `options` is non-empty.
  options: ((letter, text), ...) in order; () for an open question.
  prompt: the file's own ready-made prompt (a Hugging Face `prompt` column), or None.
  kind: the reader that made it: "jsonl", "tsv" or "parquet" (it picks the prompt style).
  """

  record: Trajectory
  options: tuple[tuple[str, str], ...] = ()
  hint: str | None = None
  prompt: str | None = None
  category: str = ""
  l2_category: str = ""
  split: str = ""
  kind: str = "jsonl"

  @property
  def id(self) -> str:
    return self.record.id


def detect(path: str) -> str:
  """The reader of a file, from its extension: .tsv, .parquet, else jsonl (.json/.jsonl)."""
  ext = os.path.splitext(path)[1].lower()
  return {".tsv": "tsv", ".parquet": "parquet"}.get(ext, "jsonl")


def read(path: str, *, format: str = "auto", image_root: str = "", max_rows: int = 0,
         allowed_tokens=FUNCTIONAL_TOKENS) -> tuple[list[Item], collections.Counter]:
  """The usable rows of a benchmark file (the first `max_rows` usable ones when > 0) and a
  Counter of skipped rows by reason. A missing file or unknown format raises; so does a
  file with no usable row (`schema.NoUsableRecord`, a ValueError)."""
  if format not in EVAL_FORMATS:
    raise ValueError(f"benchmark format {format!r} is not one of {EVAL_FORMATS}")
  formats.check_data_file(path, "benchmark file")
  kind = detect(path) if format == "auto" else format
  if kind == "tsv":
    rows = _tsv_items(path, image_root)
  elif kind == "parquet":
    rows = _parquet_items(path, image_root)
  else:
    rows = _jsonl_items(path, "auto" if kind == "jsonl" else kind, image_root, allowed_tokens)
  items, skipped, seen = [], collections.Counter(), set()
  for item in rows:
    try:
      if isinstance(item, BadRecord):
        raise item
      schema.check_text(item.record, allowed_tokens)
      if item.id in seen:
        raise BadRecord("duplicate_id", item.id)
    except BadRecord as e:
      skipped[e.reason] += 1
      continue
    seen.add(item.id)
    items.append(item)
    if max_rows and len(items) >= max_rows:
      break
  if not items:
    raise schema.NoUsableRecord(path, skipped, image_root=image_root,
                                root_name="the image root (data.image_root, --image_root)")
  return items, skipped


# ---------------------------------------------------------------------------------------
# Shared field handling


def _present(value) -> bool:
  return value is not None and not (isinstance(value, float) and value != value) and \
      str(value).strip() not in _NA


def _text(value) -> str:
  return str(value).strip() if _present(value) else ""


def gold_letter(answer: str, options) -> str:
  """The gold answer as an option letter ("(A)", "A.", "A", or an option's exact text);
  the answer unchanged when it is none of those."""
  m = _GOLD_LETTER.fullmatch(answer)
  letters = [k for k, _ in options]
  if m and m.group(1) in letters:
    return m.group(1)
  same = [k for k, v in options if v.strip().lower() == answer.strip().lower()]
  return same[0] if len(same) == 1 else answer


def inline_options(question: str) -> tuple[tuple[str, str], ...]:
  """Options written into a question as "(A) red (B) blue ..." (from A, in order)."""
  found = _INLINE.findall(question[question.find("(A)"):]) if "(A)" in question else []
  out = []
  for k, (letter, text) in enumerate(found):
    if letter != string.ascii_uppercase[k]:
      break
    out.append((letter, text.strip().rstrip(",;")))
  return tuple(out) if len(out) >= 2 else ()


def _b64(value) -> bytes:
  if not isinstance(value, str):
    raise BadRecord("bad_field_type", f"image {value!r:.40} is not base64 text")
  try:
    return base64.b64decode(value, validate=False)
  except (binascii.Error, ValueError) as e:
    raise BadRecord("corrupt_image", f"base64: {e}") from None


def _literal_list(value: str, field: str) -> list:
  """A Python-list string ("['a', 'b']") parsed without evaluating code."""
  try:
    out = ast.literal_eval(value)
  except (ValueError, SyntaxError, MemoryError, RecursionError):
    raise BadRecord("bad_field_type", f"{field} starts with '[' but is not a list") from None
  if not isinstance(out, (list, tuple)):
    raise BadRecord("bad_field_type", f"{field} is not a list")
  return list(out)


def _item(*, rid, images, question, answer, options, kind, hint="", prompt=None, category="",
          l2_category="", split="") -> Item:
  if not question:
    raise BadRecord("missing_field", f"row {rid}: no question")
  if not answer:
    raise BadRecord("missing_field", f"row {rid}: no answer")
  options = tuple(options)
  gold = gold_letter(answer, options) if options else answer
  record = Trajectory(id=rid, images=tuple(images), question=question, trajectory="",
                      answer=gold, task=category or None,
                      answer_type="choice" if options and gold in dict(options) else None,
                      choices=tuple(v for _, v in options) or None)
  return Item(record, options, hint or None, prompt or None, category, l2_category, split,
              kind)


# ---------------------------------------------------------------------------------------
# JSONL (this project's schema and the formats of data/formats.py)


def _jsonl_items(path, format, image_root, allowed_tokens) -> Iterator[Item | BadRecord]:
  for rec in formats.iter_records(path, format=format, image_root=image_root,
                                  allowed_tokens=allowed_tokens):
    if isinstance(rec, BadRecord):
      yield rec
      continue
    options = tuple(zip(string.ascii_uppercase, rec.choices)) if rec.choices else \
        inline_options(rec.question)
    gold = gold_letter(rec.answer, options) if options else rec.answer
    if rec.answer_type in ("number", "text"):
      options, gold = (), rec.answer
    yield Item(dataclasses.replace(rec, answer=gold), options, category=rec.task or "",
               kind="jsonl")


# ---------------------------------------------------------------------------------------
# VLMEvalKit TSV


def _tsv_rows(path: str) -> Iterator[tuple[int, dict | BadRecord]]:
  csv.field_size_limit(2**31 - 1)  # base64 images are far longer than csv's default limit
  with open(path, encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
    reader = csv.reader(f, delimiter="\t")
    header = next(reader, None)
    if not header:
      return
    for n, row in enumerate(reader):
      if not any(cell.strip() for cell in row):
        continue
      if len(row) != len(header):
        yield n, BadRecord("malformed_json", f"TSV row {n} has {len(row)} fields, the header "
                           f"{len(header)}")
        continue
      d = dict(zip(header, row))
      try:
        "".join(row).encode("utf-8")
      except UnicodeEncodeError:
        yield n, BadRecord("undecodable_bytes", f"TSV row {n}")
        continue
      yield n, d


def _tsv_images(d: dict, by_index: dict, base_dir: str, image_root: str) -> list:
  value = d.get("image", "").strip()
  if value and len(value) <= _REUSE_MAX:
    if value not in by_index or len(by_index[value]) <= _REUSE_MAX:
      raise BadRecord("missing_image", f"image {value!r} names no row holding an image")
    value = by_index[value].strip()
  if value:
    refs = _literal_list(value, "image") if value.startswith("[") else [value]
    return [_b64(r) for r in refs]
  paths = d.get("image_path", "").strip()
  if not _present(paths):
    return []
  paths = _literal_list(paths, "image_path") if paths.startswith("[") else [paths]
  return [schema.resolve_path(str(p), base_dir, image_root) for p in paths]


def _tsv_items(path: str, image_root: str) -> Iterator[Item | BadRecord]:
  base_dir = os.path.dirname(os.path.abspath(path))
  rows = list(_tsv_rows(path))
  by_index = {str(d.get("index", "")).strip(): d.get("image", "")
              for _, d in rows if isinstance(d, dict)}
  stem = os.path.splitext(os.path.basename(path))[0]
  for n, d in rows:
    if isinstance(d, BadRecord):
      yield d
      continue
    try:
      letters = [c for c in d if len(c) == 1 and c in string.ascii_uppercase]
      options = [(k, _text(d[k])) for k in sorted(letters) if _present(d[k])]
      rid = _text(d.get("index")) or f"{stem}-{n:06d}"
      yield _item(rid=rid, images=_tsv_images(d, by_index, base_dir, image_root),
                  question=_text(d.get("question")), answer=_text(d.get("answer")),
                  options=options, kind="tsv", hint=_text(d.get("hint")),
                  category=_text(d.get("category")),
                  l2_category=_text(d.get("l2-category", d.get("l2_category"))),
                  split=_text(d.get("split")))
    except BadRecord as e:
      yield e


# ---------------------------------------------------------------------------------------
# Hugging Face datasets parquet

_ID_COLUMNS = ("idx", "index", "id", "question_id", "qid", "pid")
_CATEGORY_COLUMNS = ("category", "sub_task", "subtask", "task", "type")
_L2_COLUMNS = ("l2-category", "l2_category", "subcategory")
_ANSWER_COLUMNS = ("answer", "solution", "gt_answer", "label")


def _first(d: dict, names):
  return next((d[k] for k in names if k in d and _present(d[k])), None)


def _parquet_image(value, base_dir: str, image_root: str):
  if isinstance(value, dict):
    data = value.get("bytes")
    if data:
      if isinstance(data, (bytes, bytearray)) or isinstance(data, list) and all(
          type(b) is int and 0 <= b < 256 for b in data):
        return bytes(data)
      raise BadRecord("bad_field_type", f"image bytes are {type(data).__name__}, expected "
                      "binary or a list of integers 0-255")
    value = value.get("path")
  if isinstance(value, (bytes, bytearray)):
    return bytes(value)
  if isinstance(value, str) and value:
    return schema.resolve_path(value, base_dir, image_root)
  raise BadRecord("missing_image", f"image {value!r:.60} holds no bytes and no path")


def _parquet_images(d: dict, base_dir: str, image_root: str) -> list:
  numbered = sorted((int(k.split("_")[1]), k) for k in d
                    if re.fullmatch(r"image_\d+", k))
  if numbered:
    values = [d[k] for _, k in numbered]
  else:
    values = d.get("images", d.get("image"))
    values = values if isinstance(values, list) else [values]
  return [_parquet_image(v, base_dir, image_root) for v in values if v is not None]


def _parquet_options(d: dict) -> list:
  choices = d.get("choices", d.get("options"))
  if isinstance(choices, str) and choices.strip().startswith("["):
    choices = _literal_list(choices.strip(), "choices")
  if isinstance(choices, (list, tuple)) and choices:
    return [(string.ascii_uppercase[k], str(c).strip()) for k, c in enumerate(choices)]
  letters = sorted(c for c in d if len(c) == 1 and c in string.ascii_uppercase)
  return [(k, _text(d[k])) for k in letters if _present(d[k])]


def _parquet_items(path: str, image_root: str) -> Iterator[Item | BadRecord]:
  try:
    import pyarrow.parquet as pq
  except ImportError:
    raise ImportError("reading .parquet benchmarks needs pyarrow (pip install pyarrow)") \
        from None
  base_dir = os.path.dirname(os.path.abspath(path))
  stem = os.path.splitext(os.path.basename(path))[0]
  n = 0
  for batch in pq.ParquetFile(path).iter_batches(batch_size=64):
    for d in batch.to_pylist():
      try:
        rid = _first(d, _ID_COLUMNS)
        question = _text(d.get("question")) or _text(d.get("prompt"))
        yield _item(rid=str(rid) if rid is not None else f"{stem}-{n:06d}",
                    images=_parquet_images(d, base_dir, image_root), question=question,
                    answer=_text(_first(d, _ANSWER_COLUMNS)), options=_parquet_options(d),
                    kind="parquet", hint=_text(d.get("hint")),
                    prompt=_text(d.get("prompt")) or None,
                    category=_text(_first(d, _CATEGORY_COLUMNS)),
                    l2_category=_text(_first(d, _L2_COLUMNS)), split=_text(d.get("split")))
      except BadRecord as e:
        yield e
      n += 1
