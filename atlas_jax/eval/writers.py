"""Benchmark rows written back out as VLMEvalKit TSV or Hugging Face parquet: to convert a
JSONL benchmark to the formats other toolkits read, and to check that every reader sees the
same questions (tests, the format-agreement report).

  write_tsv      index, image (base64; a Python-list string for a multi-image row; with
                 `reuse`, a repeated image is the index of the first row holding it, as
                 VLMEvalKit writes them), question, hint, A, B, ..., answer, category,
                 l2-category, split
  write_parquet  idx, image_1 ... image_N ({bytes, path}), question, choices, answer "(A)",
                 sub_task (needs pyarrow)
"""

from __future__ import annotations

import base64
import csv
import string

from atlas_jax.eval.benchmarks import Item


def _bytes(ref) -> bytes:
  if isinstance(ref, bytes):
    return ref
  with open(ref, "rb") as f:
    return f.read()


def write_tsv(items: list[Item], path: str, *, reuse: bool = True) -> None:
  letters = max((len(i.options) for i in items), default=0)
  header = ["index", "image", "question", "hint", *string.ascii_uppercase[:letters],
            "answer", "category", "l2-category", "split"]
  first_row: dict[bytes, str] = {}
  with open(path, "w", encoding="utf-8", newline="") as f:
    w = csv.writer(f, delimiter="\t", lineterminator="\n")
    w.writerow(header)
    for item in items:
      blobs = [_bytes(r) for r in item.record.images]
      if reuse and len(blobs) == 1 and blobs[0] in first_row:
        image = first_row[blobs[0]]
      else:
        codes = [base64.b64encode(b).decode("ascii") for b in blobs]
        image = codes[0] if len(codes) == 1 else (repr(codes) if codes else "")
        if len(blobs) == 1:
          first_row[blobs[0]] = item.id
      options = dict(item.options)
      w.writerow([item.id, image, item.record.question, item.hint or "",
                  *[options.get(k, "") for k in string.ascii_uppercase[:letters]],
                  item.record.answer, item.category, item.l2_category, item.split])


def write_parquet(items: list[Item], path: str) -> None:
  import pyarrow as pa
  import pyarrow.parquet as pq
  n_images = max((len(i.record.images) for i in items), default=0)
  columns = {"idx": [i.id for i in items], "question": [i.record.question for i in items],
             "choices": [[v for _, v in i.options] for i in items],
             "answer": [f"({i.record.answer})" if i.options else i.record.answer
                        for i in items],
             "sub_task": [i.category for i in items]}
  for k in range(n_images):
    columns[f"image_{k + 1}"] = [
        {"bytes": _bytes(i.record.images[k]), "path": f"{i.id}-{k}.png"}
        if k < len(i.record.images) else None for i in items]
  pq.write_table(pa.table(columns), path)
