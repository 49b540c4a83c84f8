"""A TFDS dataset (array_record files, no TensorFlow needed) built from trajectory JSONL.

Images are stored as their encoded bytes (PNG/JPEG) in one uint8 vector per example with
offsets, decoded later with Pillow; text fields are `Text`. Bad records are skipped and
counted by reason while building; the counts are saved next to the data and returned.
"""

from __future__ import annotations

import collections
import json
import os

import numpy as np
import tensorflow_datasets as tfds

from atlas_jax.data import schema

SKIPPED_FILE = "skipped_records.json"


class AtlasTrajectories(tfds.core.GeneratorBasedBuilder):
  """ATLAS trajectories; `splits` maps split name -> JSONL path."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Trajectories with images as encoded bytes."}

  def __init__(self, *, splits: dict[str, str] | None = None, **kwargs):
    self._jsonl = dict(splits or {})
    self.skipped: dict[str, collections.Counter] = {}
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    text = tfds.features.Text()
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "id": text, "question": text, "trajectory": text, "answer": text, "task": text,
        "answer_type": text, "choices": text,  # JSON list or "null"
        "image_bytes": tfds.features.Tensor(shape=(None,), dtype=np.uint8),
        "image_offsets": tfds.features.Tensor(shape=(None,), dtype=np.int64),
    }))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(split, path) for split, path in self._jsonl.items()}

  def _generate_examples(self, split: str, path: str):
    counter = self.skipped.setdefault(split, collections.Counter())
    if not os.path.isfile(path):
      raise FileNotFoundError(f"trajectory file {path} for split {split!r} does not exist")
    base = os.path.dirname(os.path.abspath(path))
    seen = set()
    with open(path) as f:
      for line in f:
        if not line.strip():
          continue
        try:
          rec = schema.parse_line(line, base_dir=base)
          blobs = [schema.load_image_bytes(p) for p in rec.images]
        except schema.BadRecord as e:
          counter[e.reason] += 1
          continue
        if rec.id in seen:
          counter["bad_field_type"] += 1
          continue
        seen.add(rec.id)
        offsets = np.cumsum([0] + [len(b) for b in blobs]).astype(np.int64)
        yield rec.id, {
            "id": rec.id, "question": rec.question, "trajectory": rec.trajectory,
            "answer": rec.answer, "task": rec.task or "", "answer_type": rec.answer_type or "",
            "choices": json.dumps(list(rec.choices) if rec.choices is not None else None),
            "image_bytes": np.frombuffer(b"".join(blobs), np.uint8),
            "image_offsets": offsets,
        }


def build_dataset(*, splits: dict[str, str], data_dir: str, build: bool = True) -> dict:
  """Builds the dataset once (later calls reuse it; with `build=False` one must exist).
  Returns a report dict: {"data_dir": <versioned dataset dir>, "counts": {split: n},
  "skipped": {split: {reason: n}}}.
  """
  tfds.disable_progress_bar()
  builder = AtlasTrajectories(splits=splits, data_dir=data_dir)
  skipped_path = os.path.join(builder.data_dir, SKIPPED_FILE)
  if not os.path.isfile(skipped_path):
    if not build:
      raise FileNotFoundError(f"no dataset at {builder.data_dir}: process 0 builds it, so the "
                              "data directory must be storage every process sees")
    builder.download_and_prepare(
        file_format="array_record",
        download_config=tfds.download.DownloadConfig(verify_ssl=False))
    with open(skipped_path, "w") as f:
      json.dump({s: dict(c) for s, c in builder.skipped.items()}, f)
  with open(skipped_path) as f:
    skipped = json.load(f)
  counts = {s: int(info.num_examples) for s, info in builder.info.splits.items()}
  return {"data_dir": builder.data_dir, "counts": counts, "skipped": skipped}


def open_source(report_or_dir, split: str):
  """Random-access source of one split (a grain-compatible ArrayRecord data source)."""
  data_dir = report_or_dir["data_dir"] if isinstance(report_or_dir, dict) else report_or_dir
  sources = tfds.builder_from_directory(data_dir).as_data_source()
  if split not in sources:
    raise ValueError(f"dataset {data_dir} has no split {split!r}; it has {sorted(sources)}")
  return sources[split]
