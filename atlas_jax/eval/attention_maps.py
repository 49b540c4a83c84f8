"""Attention maps: where each functional token of a trajectory looks in the image.

For every functional token of a trajectory (the row's own, or generated greedily), the
attention from its position to each image's tokens, averaged over the query heads and the
selected decoder layers, is laid back on the image. Merged token j of an image with grid
(t, h, w) patches is cell unravel(j, (t, h/m, w/m)) (m: the spatial merge, 2; the vision
tower's output order); a cell covers m x m patches, m*p x m*p pixels (p: the patch, 14)
of the resized image, which is a stretch of the original, so the cell map is stretched
back over the original (nearest) and overlaid. One PNG per example: a panel per
functional token (and image), titled with the token and the sentence before it.

The weights come from `model.forward(..., return_attention=True)`: the decoder layers'
own softmax (the "xla" attention path training uses), sown when asked.

Letters: L selected layers, N query heads, T query length, S key length, U image tokens.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import re
import textwrap

import jax
import numpy as np
from PIL import Image

from atlas_jax import multihost, sharding
from atlas_jax.data import schema
from atlas_jax.eval import evaluator
from atlas_jax.model import get_rope_index, vlm
from atlas_jax.sampler import SamplerSettings, make_sampler

_TOKEN = re.compile(r"<\|[^|<>]*\|>")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
TRAJECTORY_MODES = ("auto", "given", "generate")


def parse_layers(spec: str, num_layers: int) -> tuple[int, ...]:
  """"all", one layer "N" (negative counts from the end) or a half-open range "A:B"."""
  spec = str(spec).strip()
  bad = ValueError(f"--layers {spec!r} must be 'all', a layer N or a range A:B (half-open) "
                   f"of the model's {num_layers} decoder layers")
  if spec == "all":
    return tuple(range(num_layers))
  try:
    if ":" in spec:
      a, b = (int(x) if x else None for x in spec.split(":"))
      out = tuple(range(num_layers))[slice(a, b)]
      if not out or (b is not None and b > num_layers) or (a is not None and a >= num_layers):
        raise bad
      return out
    n = int(spec)
  except ValueError:
    raise bad from None
  if not -num_layers <= n < num_layers:
    raise bad
  return (n % num_layers,)


@dataclasses.dataclass(frozen=True)
class ImageSpan:
  """One image's tokens in a sequence: positions int[U] (in feature order) and the merged
  grid shape (t, h/m, w/m) they unravel to."""

  positions: np.ndarray
  shape: tuple[int, int, int]


def image_spans(input_ids, image_grid_thw, image_token_id: int,
                merge_size: int = 2) -> list[ImageSpan]:
  """The image tokens of one sequence (input_ids int[T]), split by image_grid_thw int[I, 3]
  (zero rows: padding images, skipped)."""
  at = np.flatnonzero(np.asarray(input_ids) == image_token_id)
  grids = [tuple(int(x) for x in g) for g in np.asarray(image_grid_thw).reshape(-1, 3)
           if int(np.prod(g))]
  shapes = [(t, h // merge_size, w // merge_size) for t, h, w in grids]
  counts = [int(np.prod(s)) for s in shapes]
  if sum(counts) != len(at):
    raise ValueError(f"the sequence has {len(at)} image tokens (id {image_token_id}) but "
                     f"image_grid_thw {grids} gives {sum(counts)}")
  starts = np.cumsum([0] + counts)
  return [ImageSpan(at[a:b], s) for a, b, s in zip(starts[:-1], starts[1:], shapes)]


def functional_positions(input_ids, functional_ids, start: int = 0) -> np.ndarray:
  """int[F]: positions >= start (the completion) holding a functional token."""
  ids = np.asarray(input_ids)
  hit = np.isin(ids, np.asarray(list(functional_ids)))
  hit[:start] = False
  return np.flatnonzero(hit)


def sentence_before(text: str, at: int) -> str:
  """The last sentence of `text[:at]` after the previous <|...|> token: the sentence a
  functional token at character `at` stands after ("" when there is none)."""
  piece = _TOKEN.split(text[:at])[-1]
  lines = [line.strip() for line in piece.splitlines() if line.strip()]
  return _SENTENCE_END.split(lines[-1])[-1] if lines else ""


def attention_to_image(probs, query: int, span: ImageSpan) -> np.ndarray:
  """float[t, h/m, w/m]: the attention from position `query` to the image's tokens, mean
  over layers and heads. probs: float[L, N, T, S] (one example)."""
  p = np.asarray(probs, np.float32)[:, :, query, span.positions]  # [L, N, U]
  return p.mean((0, 1)).reshape(span.shape)


def to_pixels(cells, size: tuple[int, int], *, patch_size: int = 14,
              merge_size: int = 2) -> np.ndarray:
  """float[H, W]: a merged-cell map float[h/m, w/m] back through the merge to the patch
  grid [h, w], to the resized image's pixels [h*p, w*p], stretched (nearest) over an
  original image of `size` (H, W)."""
  cells = np.asarray(cells, np.float32)
  patches = np.repeat(np.repeat(cells, merge_size, 0), merge_size, 1)  # [h, w]
  rh, rw = patches.shape[0] * patch_size, patches.shape[1] * patch_size
  height, width = size
  rows = np.minimum(((np.arange(height) + 0.5) * rh / height).astype(int), rh - 1)
  cols = np.minimum(((np.arange(width) + 0.5) * rw / width).astype(int), rw - 1)
  return patches[rows // patch_size][:, cols // patch_size]


@dataclasses.dataclass
class Panel:
  """One functional token: its text, position, the sentence before it, and per image the
  cell map float[t, h/m, w/m] and the attention mass on that image."""

  token: str
  position: int
  sentence: str
  cells: list
  mass: list


def panels(tokenizer, input_ids, start: int, probs, spans: list[ImageSpan],
           table) -> list[Panel]:
  """The panels of one sequence (input_ids int[T], completion from `start`), probs
  float[L, N, T, S]; `table` maps functional token -> id."""
  by_id = {v: k for k, v in table.items()}
  ids = np.asarray(input_ids)
  out = []
  for pos in functional_positions(ids, by_id, start):
    text = tokenizer.decode(ids[start:pos].tolist(), skip_special_tokens=True)
    cells = [attention_to_image(probs, int(pos), s) for s in spans]
    mass = [float(np.asarray(probs)[:, :, pos, s.positions].sum(-1).mean()) for s in spans]
    out.append(Panel(by_id[int(ids[pos])], int(pos), sentence_before(text, len(text)), cells,
                     mass))
  return out


def draw(path: str, images: list, example_panels: list[Panel], *, title: str = "",
         patch_size: int = 14, merge_size: int = 2) -> str:
  """Writes one PNG: a panel per (functional token, image), the mean-over-t cell map
  stretched over the image (colours from the panel's least to its most attended cell);
  an example without functional tokens shows its images."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  cells = [(p, k) for p in example_panels for k in range(len(images))] or \
      [(None, k) for k in range(len(images))] or [(None, None)]
  ncols = min(4, len(cells))
  nrows = math.ceil(len(cells) / ncols)
  fig, axes = plt.subplots(nrows, ncols, figsize=(3.6 * ncols, 3.9 * nrows), squeeze=False)
  for ax in axes.ravel():
    ax.axis("off")
  for ax, (panel, k) in zip(axes.ravel(), cells):
    if k is None:
      ax.text(0.5, 0.5, "no image", ha="center", va="center")
      continue
    image = np.asarray(images[k].convert("RGB"))
    ax.imshow(image)
    if panel is None:
      ax.set_title("no functional token", fontsize=8)
      continue
    heat = to_pixels(panel.cells[k].mean(0), image.shape[:2], patch_size=patch_size,
                     merge_size=merge_size)
    low, high = float(heat.min()), float(heat.max())
    shown = ax.imshow(heat, cmap="jet", alpha=0.45, vmin=low, vmax=max(high, low + 1e-12),
                      interpolation="nearest")
    fig.colorbar(shown, ax=ax, fraction=0.035, pad=0.02).ax.tick_params(labelsize=6)
    where = f" (image {k})" if len(images) > 1 else ""
    head = f"{panel.token} @{panel.position}{where}, mass {panel.mass[k]:.2f}"
    body = textwrap.fill(panel.sentence or "(no preceding sentence)", 42)
    ax.set_title(f"{head}\n{body}", fontsize=7, loc="left")
  if title:
    width = max(int(13 * 3.6 * ncols), 30)  # characters of 8 pt text across the figure
    fig.suptitle(textwrap.fill(textwrap.shorten(title, 3 * width), width), fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def _safe_name(record_id: str, used: set) -> str:
  name = re.sub(r"[^A-Za-z0-9._-]+", "_", record_id).strip("._") or "example"
  base, n = name, 1
  while name in used:
    n += 1
    name = f"{base}-{n}"
  used.add(name)
  return name


def _greedy_sampler(model, settings):
  """A greedy sampler (the RL rollout code) for `settings.max_new_tokens`."""
  return make_sampler(model.model_config, model.tokenizer,
                      SamplerSettings(max_new_tokens=settings.max_new_tokens, greedy=True))


def _generate(model, params, sampler, renderer, rows: int, rendered: dict, seed: int):
  """Greedy completion ids int32[C] of one rendered prompt, the stop token included (the
  batch is `rows` copies of it: one per batch shard of the mesh)."""
  batch = renderer.collate([rendered] * rows)
  with sharding.with_rules(model.mesh, sharding.RULES):
    out = sampler.sample(params, multihost.host_batch_to_device(batch, model.mesh),
                         jax.random.key(seed))
  tokens, mask = (multihost.local_rows(out[k])[0] for k in ("tokens", "mask"))
  return tokens[mask == 1].astype(np.int32)


_forward = jax.jit(vlm.forward, static_argnums=0,
                   static_argnames=("return_attention", "attention_layers"))


def _forward_attention(model, params, ids, pixel_values, grid, layers):
  """float32[L, N, T, T]: the attention weights of one sequence ids int[T], run
  right-padded to a multiple of 64 (one compile for examples of similar length; causal
  rows of real tokens do not see the padding)."""
  t = len(ids)
  padded = -(-t // 64) * 64
  cfg = model.model_config
  input_ids = np.full((1, padded), model.tokenizer.pad_token_id, np.int32)
  input_ids[0, :t] = ids
  mask = np.zeros((1, padded), np.int32)
  mask[0, :t] = 1
  pos, _ = get_rope_index(input_ids, mask, grid, image_token_id=cfg.image_token_id,
                          spatial_merge_size=cfg.vision.spatial_merge_size)
  _, probs = _forward(cfg, params, input_ids, mask, pixel_values, grid, pos,
                      return_attention=True, attention_layers=tuple(layers))
  return np.asarray(jax.device_get(probs))[:, 0, :, :t, :t]


def write_maps(model, params, items, settings, *, output_dir: str, layers: tuple[int, ...],
               trajectory: str = "auto", max_examples: int = 0, seed: int = 0) -> dict:
  """One PNG per example under `output_dir` (<id>.png) and index.json; returns the index.

  Args:
    model: an `eval.load.Model` (mesh, tokenizer, model_config, table); one process.
    params: its params.
    items: benchmark rows (`benchmarks.read`); rows that cannot be rendered are skipped
      and counted by reason.
    settings: an `evaluator.Settings` (prompt, data limits, max_new_tokens).
    layers: the decoder layers averaged over (`parse_layers`).
    trajectory: "auto" (the row's trajectory when it has one, else generated greedily),
      "given" (rows without one are skipped) or "generate".
  """
  if trajectory not in TRAJECTORY_MODES:
    raise ValueError(f"trajectory {trajectory!r} is not one of {TRAJECTORY_MODES}")
  if jax.process_count() > 1:
    raise ValueError(f"attention maps run in one process; found {jax.process_count()}")
  sampler = None
  mesh = model.mesh
  rows = mesh.shape["data"] * mesh.shape["fsdp"]
  renderer = evaluator._Renderer(  # noqa: SLF001  (the evaluator's prompt renderer)
      model.tokenizer, settings, settings.length_buckets, rows)
  cfg, tok = model.model_config, model.tokenizer
  end = tok.convert_tokens_to_ids("<|im_end|>")
  os.makedirs(output_dir, exist_ok=True)
  index, skipped, used = [], {}, set()
  for item in items:
    if max_examples and len(index) >= max_examples:
      break
    given = item.record.trajectory or ""
    if trajectory == "given" and not given:
      skipped["no_trajectory"] = skipped.get("no_trajectory", 0) + 1
      continue
    rendered, text = renderer.one(item)
    if rendered is None:
      skipped[text] = skipped.get(text, 0) + 1
      continue
    prompt = np.asarray(rendered["input_ids"], np.int32)
    if given and trajectory != "generate":
      completion = np.asarray(tok.encode(given + "<|im_end|>", add_special_tokens=False),
                              np.int32)
      source = "given"
    else:
      sampler = sampler or _greedy_sampler(model, settings)
      completion = _generate(model, params, sampler, renderer, rows, rendered, seed)
      source = "generated"
    ids = np.concatenate([prompt, completion])
    grid = np.asarray(rendered["image_grid_thw"], np.int32)
    probs = _forward_attention(model, params, ids, np.asarray(rendered["pixel_values"]),
                               grid, layers)
    spans = image_spans(ids, grid, cfg.image_token_id, cfg.vision.spatial_merge_size)
    found = panels(tok, ids, len(prompt), probs, spans, model.table.ids)
    blobs = schema.load_images(item.record, min_pixels=settings.min_pixels,
                               max_pixels=settings.max_pixels)
    images = [Image.open(io.BytesIO(b)).convert("RGB") for b in blobs]
    name = _safe_name(item.id, used)
    path = draw(os.path.join(output_dir, f"{name}.png"), images, found,
                title=f"{item.id}: {item.record.question}",
                patch_size=cfg.vision.patch_size, merge_size=cfg.vision.spatial_merge_size)
    index.append(dict(id=item.id, png=os.path.basename(path), source=source,
                      completion=tok.decode(completion[completion != end].tolist(),
                                            skip_special_tokens=True),
                      panels=[dict(token=p.token, position=p.position, sentence=p.sentence,
                                   image_mass=[round(m, 6) for m in p.mass]) for p in found]))
  out = dict(layers=list(layers), trajectory=trajectory, examples=index, skipped=skipped)
  with open(os.path.join(output_dir, "index.json"), "w") as f:
    json.dump(out, f, indent=1)
  return out
