"""The benchmark evaluator: prompts rendered as training renders them, sampled over the mesh
with the RL sampler (greedy, or k samples for pass@k), answers extracted by rule.

Multi-host: process p takes rows p, p + P, ...; every process runs the same number of
batches, ceil(ceil(N / P) / (B / P)), so the collective sampler never waits on a process
that ran out (a short or empty batch is filled with rows marked invalid), and with more
than one process every batch pads to the longest length bucket (so global shapes agree).
The scored rows are gathered on every process, so every process returns the same summary;
process 0 writes the files.

Letters: N rows, P processes, B prompts per batch (global), k samples per prompt.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import time

import jax
import numpy as np

from atlas_jax import multihost, sharding
from atlas_jax import sampler as sampler_lib
from atlas_jax.data import pipeline, schema
from atlas_jax.eval import extract, prompts, report
from atlas_jax.eval.benchmarks import Item


@dataclasses.dataclass(frozen=True)
class Settings:
  """How to evaluate. `samples` 1 with `greedy` is greedy decoding; samples k > 1 draws k
  completions per row at `temperature` and reports pass@k. The data limits are the run's
  (config.data); `prompt_suffix` is the native suffix of JSONL rows."""

  batch_size: int
  prompt: str
  prompt_suffix: str
  samples: int
  temperature: float
  top_k: int
  top_p: float
  max_new_tokens: int
  seed: int
  min_pixels: int
  max_pixels: int
  max_length: int
  length_buckets: tuple[int, ...]
  max_images: int
  max_patches: int
  subtasks: tuple[str, ...]

  @property
  def greedy(self) -> bool:
    return self.samples == 1

  @property
  def sampling(self) -> sampler_lib.SamplerSettings:
    return sampler_lib.SamplerSettings(
        max_new_tokens=self.max_new_tokens, samples_per_prompt=self.samples,
        temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
        greedy=self.greedy)

  @classmethod
  def from_config(cls, c, **changes) -> Settings:
    """From a run config: data limits from config.data, sampling from config.rl, the rest
    from config.eval when the config has it; `changes` win."""
    d, rl = c.data, c.rl
    kw = dict(prompt="native", subtasks=(), samples=1, prompt_suffix=d.prompt_suffix, temperature=rl.temperature, top_k=rl.top_k,
              top_p=rl.top_p, max_new_tokens=rl.max_new_tokens, seed=c.seed,
              min_pixels=d.min_pixels, max_pixels=d.max_pixels, max_length=d.max_length,
              length_buckets=tuple(d.length_buckets), max_images=d.max_images,
              max_patches=d.max_patches, batch_size=rl.eval_batch_size)
    if "eval" in c:
      e = c.eval
      kw.update(batch_size=e.batch_size, prompt=e.prompt, subtasks=tuple(e.subtasks))
      if e.max_new_tokens:
        kw["max_new_tokens"] = e.max_new_tokens
    kw.update(changes)
    return cls(**kw)

  def check(self, mesh) -> None:
    """Stops with one sentence naming the bad setting."""
    if self.prompt not in prompts.PROMPTS:
      raise ValueError(f"eval prompt {self.prompt!r} is not one of {prompts.PROMPTS}")
    if self.samples < 1 or self.max_new_tokens < 1:
      raise ValueError(f"eval samples {self.samples} and max_new_tokens "
                       f"{self.max_new_tokens} must be >= 1")
    ways = math.lcm(mesh.shape["data"] * mesh.shape["fsdp"], jax.process_count())
    if self.batch_size < 1 or self.batch_size % ways:
      raise ValueError(f"eval batch_size {self.batch_size} must be a positive multiple of "
                       f"{ways} (the mesh's data x fsdp batch shards and the processes)")
    if not self.length_buckets or self.length_buckets[-1] > self.max_length:
      raise ValueError(f"eval length_buckets {self.length_buckets} must end at or below "
                       f"max_length {self.max_length}")


def _example(item: Item, text: str, settings: Settings) -> dict:
  """`item` as a stored dataset example (what `pipeline`'s renderer reads). Raises
  BadRecord for an image the preprocessing cannot take."""
  blobs = schema.load_images(item.record, min_pixels=settings.min_pixels,
                             max_pixels=settings.max_pixels, max_images=settings.max_images,
                             max_patches=settings.max_patches)
  offsets = np.cumsum([0] + [len(b) for b in blobs]).astype(np.int64)
  rec = item.record
  return dict(id=rec.id, question=text, trajectory="", answer=rec.answer, task="",
              answer_type="", choices="null", system=rec.system or "",
              history=json.dumps([list(h) for h in rec.history]) if rec.history else "",
              image_offsets=offsets, image_bytes=np.frombuffer(b"".join(blobs), np.uint8))


class _Renderer:
  """Items -> rendered prompts, with the training pipeline's renderer and collator."""

  def __init__(self, tokenizer, settings: Settings, buckets: tuple[int, ...], rows: int):
    self.settings = settings
    self.render = pipeline._Render(  # noqa: SLF001  (the training renderer, reused)
        tokenizer, min_pixels=settings.min_pixels, max_pixels=settings.max_pixels,
        max_length=settings.max_length, max_images=settings.max_images,
        max_patches=settings.max_patches, prompt_suffix="", prompt_only=True)
    self.collate = pipeline._Collate(  # noqa: SLF001
        batch_size=rows, length_buckets=buckets, max_patches=settings.max_patches,
        max_images=settings.max_images, pad_id=tokenizer.pad_token_id,
        image_id=tokenizer.convert_tokens_to_ids("<|image_pad|>"), left_pad=True)

  def one(self, item: Item):
    """(rendered example, prompt text) or (None, skip reason)."""
    text = prompts.build(item, self.settings.prompt, suffix=self.settings.prompt_suffix)
    try:
      out = self.render(_example(item, text, self.settings))
    except schema.BadRecord as e:
      return None, e.reason
    if isinstance(out, pipeline._Skip):  # noqa: SLF001
      return None, out.reason
    return out, text


def evaluate(model, params, items: list[Item], settings: Settings, *, output_dir: str = "",
             skipped=None, progress: bool = True, plot: bool = True, info=None) -> dict:
  """Scores `items` and returns the summary (`report.summarize`); with `output_dir`,
  process 0 writes predictions.jsonl, summary.json and (with `plot`) summary.png there.

  Args:
    model: what the sampler needs: `mesh`, `tokenizer`, `model_config`, `table` (a
      training `Run` will do).
    params: the model's params, sharded over `model.mesh`.
    items: the rows (`benchmarks.read`), the same list on every process.
    skipped: rows the reader skipped, {reason: count}, added to the report.
    info: extra JSON fields for the summary (checkpoint, data file, ...).
  """
  settings.check(model.mesh)
  if not items:
    raise ValueError("the benchmark has no usable rows to evaluate"
                     + (f" ({dict(skipped)} skipped)" if skipped else ""))
  procs, me = jax.process_count(), jax.process_index()
  local = settings.batch_size // procs
  shard = list(range(me, len(items), procs))
  n_batches = math.ceil(math.ceil(len(items) / procs) / local)
  buckets = settings.length_buckets if procs == 1 else settings.length_buckets[-1:]
  renderer = _Renderer(model.tokenizer, settings, buckets, local)
  sampler = sampler_lib.make_sampler(model.model_config, model.tokenizer, settings.sampling)
  k, tokens = settings.samples, tuple(model.table.tokens)
  rows, local_skipped, filler = [], collections.Counter(), None
  generated, t0 = 0, time.perf_counter()
  bar = _progress(n_batches, enabled=progress and me == 0)
  with sharding.with_rules(model.mesh, sharding.RULES):
    for b in range(n_batches):
      examples, kept = [], []
      for i in shard[b * local:(b + 1) * local]:
        out, text = renderer.one(items[i])
        if out is None:
          local_skipped[text] += 1
          continue
        examples.append(out)
        kept.append((i, text))
      if not examples:
        filler = filler or _filler(renderer, items)
        examples = [filler]
      batch = renderer.collate(examples)
      batch["valid"][len(kept):] = 0
      key = jax.random.fold_in(jax.random.key(settings.seed), b)
      out = sampler.sample(params, multihost.host_batch_to_device(batch, model.mesh), key)
      out = {name: multihost.local_rows(out[name]) for name in ("tokens", "mask")}
      texts = sampler_lib.decode_completions(model.tokenizer, out["tokens"], out["mask"])
      lengths = out["mask"].sum(1)
      generated += int(lengths.sum())
      for r, (i, text) in enumerate(kept):
        rows.append(_scored_row(i, items[i], text, texts[r * k:(r + 1) * k],
                                lengths[r * k:(r + 1) * k], tokens))
      bar.update(1)
  bar.close()
  seconds = time.perf_counter() - t0
  gathered = multihost.gather_json({"rows": rows, "skipped": dict(local_skipped), "tokens": generated})
  all_rows = sorted((r for g in gathered for r in g["rows"]), key=lambda r: r["index"])
  render_skipped = collections.Counter(skipped or {})
  for g in gathered:
    render_skipped.update(g["skipped"])
  summary = report.summarize(all_rows, samples=k, subtasks=settings.subtasks,
                             functional_tokens=tokens, skipped=dict(render_skipped))
  summary.update(prompt=settings.prompt, greedy=settings.greedy,
                 max_new_tokens=settings.max_new_tokens, seconds=round(seconds, 3),
                 generated_tokens_per_s=sum(g["tokens"] for g in gathered) / max(seconds, 1e-9),
                 **(info or {}))
  if output_dir and me == 0:
    report.write(output_dir, all_rows, summary, plot=plot)
  return summary


def _filler(renderer: _Renderer, items: list[Item]) -> dict:
  """Any renderable row, to fill a batch of this process that has no row of its own."""
  for item in items:
    out, _ = renderer.one(item)
    if out is not None:
      return out
  raise ValueError("no row of the benchmark could be rendered within the data limits "
                   "(max_length, max_images, max_patches)")


def _scored_row(index: int, item: Item, prompt: str, completions, lengths, tokens) -> dict:
  scored = [extract.score(item, c) for c in completions]
  return {"index": index, "id": item.id, "category": item.category,
          "l2_category": item.l2_category, "answer": item.record.answer, "prompt": prompt,
          "completions": list(completions), "extracted": [s.extracted for s in scored],
          "method": [s.method for s in scored], "correct": [s.correct for s in scored],
          "lengths": [int(n) for n in lengths],
          "functional": [{t: c.count(t) for t in tokens if t in c} for c in completions]}


class _NoBar:
  def update(self, n):
    pass

  def close(self):
    pass


def _progress(total: int, *, enabled: bool):
  if not enabled:
    return _NoBar()
  try:
    from tqdm import tqdm
  except ImportError:
    return _NoBar()
  return tqdm(total=total, desc="eval", unit="batch", leave=False)
