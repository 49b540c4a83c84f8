"""A TFDS dataset (array_record files, no TensorFlow needed) built from users' data files.

Records come from `formats.iter_records` (any supported format); every check that can be
made once is made here (text, images exactly as the preprocessing takes them, image and
patch limits), and a record that fails is skipped and counted by reason. Images are stored
as their encoded bytes in one uint8 vector per example with offsets, decoded later with
Pillow; text fields are `Text`. A split of which no record is usable stops the build with
`schema.NoUsableRecord` (one sentence: the file and the counts), not TFDS's "No examples
were yielded".

The dataset remembers its sources: `build_report.json` next to the data holds a
fingerprint (each file's path, size, mtime and sha256; each referenced image's path, size,
mtime and sha256; the build options) and the skip counts. A later `build_dataset` whose sources
or options differ rebuilds, or stops naming the file (`on_source_change="error"`).
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import itertools
import json
import logging
import os
import shutil
import time
import warnings

import numpy as np
import tensorflow_datasets as tfds

from atlas_jax.data import chat, formats, image as image_lib, schema
from atlas_jax.functional_tokens import FUNCTIONAL_TOKENS

BUILD_FILE = "build_report.json"
ON_SOURCE_CHANGE = ("rebuild", "error")


@dataclasses.dataclass(frozen=True)
class BuildOptions:
  """What changes the built content besides the files. None: not checked at build."""

  format: str = "auto"
  image_root: str = ""
  min_pixels: int = image_lib.MIN_PIXELS
  max_pixels: int = image_lib.MAX_PIXELS
  max_images: int | None = None
  max_patches: int | None = None
  allowed_tokens: tuple[str, ...] = FUNCTIONAL_TOKENS


class AtlasTrajectories(tfds.core.GeneratorBasedBuilder):
  """ATLAS trajectories; `splits` maps split name -> data file path."""

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {"1.0.0": "Trajectories with images as encoded bytes.",
                   "1.1.0": "System prompt and earlier turns (history)."}

  def __init__(self, *, splits: dict[str, str] | None = None,
               options: BuildOptions | None = None, **kwargs):
    self._files = dict(splits or {})
    self._options = options or BuildOptions()
    self.skipped: dict[str, collections.Counter] = {}
    self.images: dict[str, dict[str, list]] = {}  # split -> {path: [size, mtime, sha256]}
    self.answers: dict[str, collections.Counter] = {}  # split -> {chat.answer_kind: n}
    self.empty: schema.NoUsableRecord | None = None  # the split that yielded nothing
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    text = tfds.features.Text()
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "id": text, "question": text, "trajectory": text, "answer": text, "task": text,
        "answer_type": text, "choices": text,  # JSON list or "null"
        "system": text, "history": text,       # "" / JSON list of [user, assistant]
        "image_bytes": tfds.features.Tensor(shape=(None,), dtype=np.uint8),
        "image_offsets": tfds.features.Tensor(shape=(None,), dtype=np.int64),
    }))

  def _log_download_bytes(self):  # TFDS prints "Downloading and preparing ..."; nothing is
    pass

  def _log_download_done(self):
    pass

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(split, path) for split, path in self._files.items()}

  def _generate_examples(self, split: str, path: str):
    """Records in file order; their images are checked by a few threads (Pillow decodes
    without the GIL) while this one serializes. Raises NoUsableRecord if none is usable."""
    counter = self.skipped.setdefault(split, collections.Counter())
    images = self.images.setdefault(split, {})
    o, yielded = self._options, 0
    records = formats.iter_records(path, format=o.format, image_root=o.image_root,
                                   allowed_tokens=o.allowed_tokens)
    chunks = iter(lambda: list(itertools.islice(records, _CHUNK)), [])
    with concurrent.futures.ThreadPoolExecutor(_THREADS) as pool:
      window = collections.deque()
      for chunk in itertools.chain(chunks, [None] * _WINDOW):
        if chunk is not None:
          window.append((chunk, pool.submit(lambda c: [self._check(r) for r in c], chunk)))
        if len(window) < _WINDOW and chunk is not None or not window:
          continue
        chunk, future = window.popleft()
        for rec, (blobs, stats) in zip(chunk, future.result()):
          images.update(stats)
          if isinstance(blobs, schema.BadRecord):
            counter[blobs.reason] += 1
            continue
          yielded += 1
          self.answers.setdefault(split, collections.Counter())[
              chat.answer_kind(rec.trajectory)] += 1
          yield rec.id, _example(rec, blobs)
    if not yielded:
      self.empty = schema.NoUsableRecord(path, counter, image_root=o.image_root)
      raise self.empty

  def _check(self, rec):
    """(image bytes or the BadRecord, {path: [size, mtime_ns, sha256]}) of a record."""
    if isinstance(rec, schema.BadRecord):
      return rec, {}
    stats = {ref: _stat(ref) + [None] for ref in rec.images if isinstance(ref, str)}
    o = self._options
    try:
      blobs = schema.load_images(rec, min_pixels=o.min_pixels, max_pixels=o.max_pixels,
                                 max_images=o.max_images, max_patches=o.max_patches)
    except schema.BadRecord as e:
      return e, stats
    except (ImportError, MemoryError):  # the environment, not the record
      raise
    except Exception as e:  # noqa: BLE001  (a record must never end the build)
      return schema.BadRecord("read_error", f"{rec.id}: {type(e).__name__}: {e}"), stats
    for ref, blob in zip(rec.images, blobs):
      if isinstance(ref, str):
        stats[ref][2] = hashlib.sha256(blob).hexdigest()
    return blobs, stats


_THREADS = min(4, os.cpu_count() or 1)
_WINDOW = 2 * _THREADS  # chunks in flight
_CHUNK = 32  # records per task


def _example(rec: schema.Trajectory, blobs: list[bytes]) -> dict:
  offsets = np.cumsum([0] + [len(b) for b in blobs]).astype(np.int64)
  return {
      "id": rec.id, "question": rec.question, "trajectory": rec.trajectory,
      "answer": rec.answer, "task": rec.task or "", "answer_type": rec.answer_type or "",
      "choices": json.dumps(list(rec.choices) if rec.choices is not None else None),
      "system": rec.system or "",
      "history": json.dumps([list(h) for h in rec.history]) if rec.history else "",
      "image_bytes": np.frombuffer(b"".join(blobs), np.uint8),
      "image_offsets": offsets,
  }


def _stat(path: str) -> list:
  """[size, mtime_ns] of a file, [-1, -1] if it does not exist (or cannot: a NUL)."""
  try:
    st = os.stat(path)
  except (OSError, ValueError):
    return [-1, -1]
  return [st.st_size, st.st_mtime_ns]


def _sha256(path: str) -> str:
  with open(path, "rb") as f:
    return hashlib.file_digest(f, "sha256").hexdigest()


def _file_fingerprint(path: str) -> dict:
  path = os.path.abspath(path)
  formats.check_data_file(path, "trajectory file")
  size, mtime = _stat(path)
  return {"path": path, "size": size, "mtime_ns": mtime, "sha256": _sha256(path)}


def source_change(saved: dict, splits: dict[str, str], options: BuildOptions) -> str | None:
  """What differs between a saved fingerprint and the current sources, or None."""
  old = saved.get("splits", {})
  if sorted(old) != sorted(splits):
    return f"the splits are now {sorted(splits)}, built with {sorted(old)}"
  for split, path in splits.items():
    was, path = old[split], os.path.abspath(path)
    if was["path"] != path:
      return f"split {split!r} now reads {path}, built from {was['path']}"
    if not os.path.isfile(path):
      return f"{path} no longer exists"
    size, mtime = _stat(path)
    if [size, mtime] != [was["size"], was["mtime_ns"]] and _sha256(path) != was["sha256"]:
      return f"{path} changed since the build (size {was['size']} -> {size} bytes)"
    for image, (size, mtime, digest) in saved.get("images", {}).get(split, {}).items():
      if _stat(image) != [size, mtime] and (
          digest is None or not os.path.isfile(image) or _sha256(image) != digest):
        return f"image {image} (used by {path}) changed since the build"
  was, now = saved.get("options", {}), _options_json(options)
  changed = [f"{k} {was.get(k)!r} -> {now[k]!r}" for k in sorted(now) if was.get(k) != now[k]]
  return f"build options changed: {', '.join(changed)}" if changed else None


def _options_json(options: BuildOptions) -> dict:
  d = dataclasses.asdict(options)
  d["allowed_tokens"] = list(d["allowed_tokens"])
  d["version"] = str(AtlasTrajectories.VERSION)
  return d


@contextlib.contextmanager
def _quiet_tfds():
  """Silences TFDS's own log lines (absl / python logging) and Pillow's decompression-bomb
  warning (such images are counted as image_too_large) for the duration of a build."""
  from PIL import Image
  loggers = [logging.getLogger(n) for n in ("absl", "tensorflow_datasets")]
  levels = [l.level for l in loggers]
  for l in loggers:
    l.setLevel(logging.ERROR)
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", Image.DecompressionBombWarning)
      yield
  finally:
    for l, level in zip(loggers, levels):
      l.setLevel(level)


def format_skipped(skipped: dict) -> str:
  """'corrupt_image=1, too_long=2' summed over splits, or 'none'."""
  total = collections.Counter()
  for counts in skipped.values():
    total.update(counts)
  return ", ".join(f"{k}={v}" for k, v in sorted(total.items()) if v) or "none"


def build_dataset(*, splits: dict[str, str], data_dir: str, build: bool = True,
                  options: BuildOptions | None = None,
                  on_source_change: str = "rebuild") -> dict:
  """Builds the dataset once; later calls reuse it while its sources and options are
  unchanged, and on a change rebuild it or (`on_source_change="error"`) raise ValueError
  naming the file. With `build=False` (other processes) one must exist; its sources are
  not rechecked. Returns a report dict: {"data_dir": <versioned dataset dir>, "counts":
  {split: n}, "skipped": {split: {reason: n}}, "sources": {split: path}, "answers":
  {split: {"boxed" | "unboxed" | "none": n}} (`chat.answer_kind`: what an "auto" prompt
  suffix does with each record)}. A split of which
  no record is usable raises `schema.NoUsableRecord` (a ValueError) and leaves no dataset.
  """
  if on_source_change not in ON_SOURCE_CHANGE:
    raise ValueError(f"on_source_change {on_source_change!r} is not one of {ON_SOURCE_CHANGE}")
  options = options or BuildOptions()
  tfds.disable_progress_bar()
  builder = AtlasTrajectories(splits=splits, options=options, data_dir=data_dir)
  report_path = os.path.join(builder.data_dir, BUILD_FILE)
  built = False
  if os.path.isfile(report_path) and build and splits:
    with open(report_path) as f:
      change = source_change(json.load(f), splits, options)
    if change:
      if on_source_change == "error":
        raise ValueError(f"the dataset in {builder.data_dir} is stale: {change}; set "
                         "config.data.on_source_change='rebuild' or use another "
                         "config.data.dataset_dir")
      print(f"[data] {change}: rebuilding {builder.data_dir}", flush=True)
      os.remove(report_path)
  if not os.path.isfile(report_path):
    if not build:
      raise FileNotFoundError(f"no dataset at {builder.data_dir}: process 0 builds it, so the "
                              "data directory must be storage every process sees")
    if not splits:
      raise ValueError(f"no dataset at {builder.data_dir} and no source files to build it from")
    if os.path.isdir(builder.data_dir):  # stale or half-written
      shutil.rmtree(builder.data_dir)
      builder = AtlasTrajectories(splits=splits, options=options, data_dir=data_dir)
    _build(builder, splits, options, report_path)
    builder = AtlasTrajectories(splits=splits, options=options, data_dir=data_dir)
    built = True
  with open(report_path) as f:
    saved = json.load(f)
  counts = {s: int(info.num_examples) for s, info in builder.info.splits.items()}
  if build and not built:
    print(f"[data] reusing the dataset in {builder.data_dir} "
          f"({' '.join(f'{s}={n}' for s, n in counts.items())}; skipped: "
          f"{format_skipped(saved['skipped'])})", flush=True)
  return {"data_dir": builder.data_dir, "counts": counts, "skipped": saved["skipped"],
          "sources": {s: v["path"] for s, v in saved["splits"].items()},
          "answers": saved.get("answers", {})}


def _build(builder, splits, options, report_path):
  t0 = time.perf_counter()
  fingerprint = {s: _file_fingerprint(p) for s, p in splits.items()}
  print(f"[data] building dataset from {len(set(splits.values()))} source file(s) in "
        f"{builder.data_dir}", flush=True)
  try:
    with _quiet_tfds():
      builder.download_and_prepare(
          file_format="array_record",
          download_config=tfds.download.DownloadConfig(verify_ssl=False))
  except Exception:
    if builder.empty is None:
      raise
    e = builder.empty  # raised in TFDS's generator loop, which may wrap it: raise it bare
    raise schema.NoUsableRecord(e.path, e.skipped, image_root=options.image_root) from None
  skipped = {s: dict(c) for s, c in builder.skipped.items()}
  report = {"splits": fingerprint, "images": builder.images, "options": _options_json(options),
            "skipped": skipped, "answers": {s: dict(c) for s, c in builder.answers.items()},
            "seconds": round(time.perf_counter() - t0, 3)}
  with open(report_path + ".tmp", "w") as f:
    json.dump(report, f)
  os.replace(report_path + ".tmp", report_path)
  counts = " ".join(f"{s}={int(i.num_examples)}" for s, i in builder.info.splits.items())
  print(f"[data] built {counts} in {report['seconds']:.1f} s; skipped: "
        f"{format_skipped(skipped)}", flush=True)


def open_source(report_or_dir, split: str):
  """Random-access source of one split (a grain-compatible ArrayRecord data source). Given
  a build report, it carries `source_file` (the data file) and `build_skipped` ({reason:
  n}) for the pipeline's messages."""
  data_dir = report_or_dir["data_dir"] if isinstance(report_or_dir, dict) else report_or_dir
  sources = tfds.builder_from_directory(data_dir).as_data_source()
  if split not in sources:
    raise ValueError(f"dataset {data_dir} has no split {split!r}; it has {sorted(sources)}")
  source = sources[split]
  if isinstance(report_or_dir, dict):
    source.source_file = report_or_dir.get("sources", {}).get(split)
    source.build_skipped = dict(report_or_dir.get("skipped", {}).get(split, {}))
  return source
