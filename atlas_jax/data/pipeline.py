"""grain pipelines over the TFDS trajectory dataset: deterministic, sharded per process,
padded to a few static shapes, checkpointable.

  source -> [this process's shard] -> shuffle(seed) -> repeat -> decode + render
         -> drop bad records (counted) -> batch, padding to a length bucket

Batches are numpy, batch-major (B = per-process batch):
  input_ids int32[B, T], attention_mask int32[B, T], loss_mask int32[B, T],
  position_ids int32[B, 3, T], pixel_values float32[B, max_patches, 1176],
  image_grid_thw int32[B, max_images, 3], valid int32[B] (0 on rows that only fill the
  last batch of a finite pass), and host-only object arrays id, answer, task, answer_type,
  choices. T is the smallest length bucket that holds the batch's longest row. SFT batches
  pad on the right; RL prompt batches pad on the left (generation continues the row).

Skipped records are counted per process in `pipeline.skipped`, once per record however
many epochs pass (grain runs the transforms in this process); `report_skipped` formats
the counts. The build decided every other reason already, so these are mostly `too_long`.
A repeating pipeline whose every record is skipped (say, none fits data.max_length) raises
`schema.NoUsableRecord` once it has seen each record, instead of looking for a usable one
forever; a finite pass just ends (its caller sees no batch, and on several processes
others may have rows).
"""

from __future__ import annotations

import collections
import json

import grain
import numpy as np

from atlas_jax.data import chat, image as image_lib, schema
from atlas_jax.data.tfds_builder import open_source  # noqa: F401  (re-exported for loops)
from atlas_jax.model.rope import get_rope_index

HOST_FIELDS = ("id", "answer", "task", "answer_type", "choices")


def _text(x) -> str:
  return x.decode("utf-8") if isinstance(x, bytes) else str(x)


class _Skip:
  """What `_Render` returns for a bad record; counted (once per record) when the iterator
  consumes it."""

  def __init__(self, reason: str, record_id: str):
    self.reason, self.id = reason, record_id


class _Render:
  """Decodes one stored example and renders it; a bad one becomes a `_Skip`. The build
  already checked images and limits, so what fails here is mostly length after rendering;
  anything else that raises is skipped too, never fatal, except a missing dependency or
  memory (ImportError, MemoryError), which would otherwise skip every record."""

  def __init__(self, tokenizer, *, min_pixels, max_pixels, max_length, max_images, max_patches,
               prompt_suffix, prompt_only):
    self.tokenizer, self.prompt_only = tokenizer, prompt_only
    self.min_pixels, self.max_pixels = min_pixels, max_pixels
    self.max_length, self.max_images, self.max_patches = max_length, max_images, max_patches
    self.prompt_suffix = prompt_suffix

  def __call__(self, ex):
    record_id = _text(ex["id"])
    try:
      return self._render(ex, record_id)
    except (ImportError, MemoryError):  # the environment, not the record: stop the run
      raise
    except Exception:  # noqa: BLE001  (a record must never end a run)
      return _Skip("render_error", record_id)

  def _render(self, ex, record_id):
    offsets = np.asarray(ex["image_offsets"])
    blob = np.asarray(ex["image_bytes"]).tobytes()
    if len(offsets) - 1 > self.max_images:
      return _Skip("too_many_images", record_id)
    try:  # upright by EXIF, transparency on white: as transformers decodes
      images = [image_lib.to_rgb(image_lib.open_image(blob[a:b]))
                for a, b in zip(offsets[:-1], offsets[1:])]
    except Exception:  # noqa: BLE001  (Pillow raises many types for bad bytes)
      return _Skip("corrupt_image", record_id)
    try:
      pixels, grid = image_lib.preprocess(images, min_pixels=self.min_pixels,
                                          max_pixels=self.max_pixels)
    except ValueError:
      return _Skip("extreme_aspect_ratio", record_id)
    if pixels.shape[0] > self.max_patches:
      return _Skip("too_many_patches", record_id)
    stored = _text(ex["trajectory"])
    trajectory = None if self.prompt_only else stored
    history = _text(ex.get("history", b""))
    try:
      out = chat.render(self.tokenizer, _text(ex["question"]), trajectory,
                        image_lib.num_image_tokens(grid).tolist(),
                        system=_text(ex.get("system", b"")) or None,
                        history=[tuple(h) for h in json.loads(history)] if history else (),
                        prompt_suffix=chat.suffix_for(self.prompt_suffix, stored))
    except ValueError as e:
      return _Skip("image_count_mismatch" if "placeholder" in str(e) else "render_error",
                   record_id)
    if len(out["input_ids"]) > self.max_length:
      return _Skip("too_long", record_id)
    choices = json.loads(_text(ex["choices"]))
    return dict(out, pixel_values=pixels, image_grid_thw=grid, id=record_id,
                answer=_text(ex["answer"]), task=_text(ex["task"]) or None,
                answer_type=_text(ex["answer_type"]) or None,
                choices=tuple(choices) if choices else None)


class _Collate:
  """Pads examples to a static batch: a length bucket, max_patches, max_images."""

  def __init__(self, *, batch_size, length_buckets, max_patches, max_images, pad_id, image_id,
               left_pad):
    self.batch_size, self.buckets = batch_size, tuple(length_buckets)
    self.max_patches, self.max_images = max_patches, max_images
    self.pad_id, self.image_id, self.left_pad = pad_id, image_id, left_pad

  def __call__(self, examples):
    valid = [1] * len(examples) + [0] * (self.batch_size - len(examples))
    examples = list(examples) + [examples[-1]] * (self.batch_size - len(examples))
    longest = max(len(e["input_ids"]) for e in examples)
    t = next(b for b in self.buckets if b >= longest)
    b = len(examples)
    patch_dim = examples[0]["pixel_values"].shape[-1]
    ids = np.full((b, t), self.pad_id, np.int32)
    mask = np.zeros((b, t), np.int32)
    loss = np.zeros((b, t), np.int32)
    pixels = np.zeros((b, self.max_patches, patch_dim), np.float32)
    grid = np.zeros((b, self.max_images, 3), np.int32)
    for i, e in enumerate(examples):
      n = len(e["input_ids"])
      sl = slice(t - n, t) if self.left_pad else slice(0, n)
      ids[i, sl], mask[i, sl], loss[i, sl] = e["input_ids"], 1, e["loss_mask"]
      pixels[i, :len(e["pixel_values"])] = e["pixel_values"]
      grid[i, :len(e["image_grid_thw"])] = e["image_grid_thw"]
    pos, _ = get_rope_index(ids, mask, grid.reshape(-1, 3), image_token_id=self.image_id,
                            spatial_merge_size=2)
    batch = dict(input_ids=ids, attention_mask=mask, loss_mask=loss,
                 position_ids=np.ascontiguousarray(pos.transpose(1, 0, 2)),
                 pixel_values=pixels, image_grid_thw=grid, valid=np.asarray(valid, np.int32))
    for k in HOST_FIELDS:
      batch[k] = np.empty(b, object)
      batch[k][:] = [e[k] for e in examples]
    return batch


class Pipeline:
  """An iterator of batches with `get_state`/`set_state`, a `skipped` Counter and the
  `source_file` it reads (None when the source does not say)."""

  def __init__(self, dataset: grain.IterDataset, skipped: collections.Counter,
               source_file: str | None = None):
    self._dataset = dataset
    self._iter = iter(dataset)
    self.skipped = skipped
    self.source_file = source_file

  def __iter__(self):
    return self

  def __next__(self):
    return next(self._iter)

  def get_state(self):
    return self._iter.get_state()

  def set_state(self, state):
    self._iter.set_state(state)


def _pipeline(source, *, tokenizer, min_pixels, max_pixels, max_length, length_buckets,
              max_images, max_patches, batch_size, seed, shuffle=True, num_epochs=None,
              prompt_suffix="", prompt_only, shard_index=None, shard_count=None) -> Pipeline:
  import jax
  shard_index = jax.process_index() if shard_index is None else shard_index
  shard_count = jax.process_count() if shard_count is None else shard_count
  if length_buckets[-1] < max_length:
    max_length = length_buckets[-1]
  skipped: collections.Counter = collections.Counter()
  ds = grain.MapDataset.source(source)[shard_index::shard_count]
  source_file = getattr(source, "source_file", None)
  build_skipped = getattr(source, "build_skipped", None) or {}
  records = len(ds)

  def nothing_usable(note: str) -> schema.NoUsableRecord:
    counts = collections.Counter(build_skipped)
    counts.update(skipped)
    return schema.NoUsableRecord(source_file or "the dataset", counts, note=note)
  if num_epochs is None and not records:
    raise nothing_usable(f"process {shard_index} of {shard_count} gets none of its "
                         f"{len(source)} records: more processes than records")
  if shuffle:
    ds = ds.shuffle(seed=seed)
  ds = ds.repeat(num_epochs)
  ds = ds.map(_Render(tokenizer, min_pixels=min_pixels, max_pixels=max_pixels,
                      max_length=max_length, max_images=max_images, max_patches=max_patches,
                      prompt_suffix=prompt_suffix, prompt_only=prompt_only))

  counted: set = set()

  def keep(example) -> bool:  # runs as the iterator consumes, after any read-ahead
    if isinstance(example, _Skip):
      if example.id not in counted:  # once per record, not once per epoch
        counted.add(example.id)
        skipped[example.reason] += 1
        if num_epochs is None and len(counted) >= records:  # every record, none usable
          raise nothing_usable(
              f"every record was skipped once rendered, with data.max_length {max_length}, "
              f"data.max_images {max_images} and data.max_patches {max_patches}")
      return False
    return True
  collate = _Collate(batch_size=batch_size, length_buckets=length_buckets,
                     max_patches=max_patches, max_images=max_images,
                     pad_id=tokenizer.pad_token_id,
                     image_id=tokenizer.convert_tokens_to_ids("<|image_pad|>"),
                     left_pad=prompt_only)
  iter_ds = ds.to_iter_dataset().filter(keep).batch(batch_size, batch_fn=collate)
  return Pipeline(iter_ds, skipped, source_file)


def sft_pipeline(source, **kwargs) -> Pipeline:
  """Trajectories with loss masks, right-padded. See `_pipeline` for the arguments."""
  return _pipeline(source, prompt_only=False, **kwargs)


def rl_pipeline(source, **kwargs) -> Pipeline:
  """Prompts only (ending with the assistant header), left-padded, for rollouts."""
  return _pipeline(source, prompt_only=True, **kwargs)


def report_skipped(counter) -> str:
  """One line: 'skipped 3 records: corrupt_image=1, too_long=2' (or 'no records skipped')."""
  total = sum(counter.values())
  if not total:
    return "no records skipped"
  return f"skipped {total} records: " + ", ".join(f"{k}={v}" for k, v in sorted(counter.items()))
