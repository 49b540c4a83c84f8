"""Rotary position embeddings: 3-D M-RoPE for the decoder and 2-D RoPE for the vision tower.

`get_rope_index` has transformers' `get_rope_index` semantics for images (several images per
sample, left or right padding, text-only samples) and is written once for both array
libraries: with `xp=numpy` it runs on the host in the data pipeline, with `xp=jax.numpy` it
runs inside a jitted forward. Shapes: B batch, T length, I images.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def get_rope_index(input_ids, attention_mask, image_grid_thw, *, image_token_id: int,
                   spatial_merge_size: int, xp=np):
  """M-RoPE position ids.

  Args:
    input_ids: int[B, T].
    attention_mask: int[B, T] (1 = real token) or None (all real).
    image_grid_thw: int[I, 3] patch grids of the images in the order their `<|image_pad|>`
      runs appear, row by row; rows of zeros (padding images) are allowed. None or I = 0
      for text-only batches.
  Returns:
    position_ids: int32[3, B, T] (temporal, height, width); padding positions are 0.
    rope_deltas: int32[B]: max position + 1 - number of real tokens, the offset that decode
      steps add to their cache position.
  """
  input_ids = xp.asarray(input_ids)
  b, t = input_ids.shape
  mask = (xp.ones((b, t), dtype=bool) if attention_mask is None
          else xp.asarray(attention_mask).astype(bool))
  is_img = (input_ids == image_token_id) & mask
  m = spatial_merge_size
  if image_grid_thw is None or len(image_grid_thw) == 0:
    grid = xp.zeros((1, 3), dtype=xp.int32)
  else:
    grid = xp.asarray(image_grid_thw).astype(xp.int32)
  gt, gh, gw = grid[:, 0], grid[:, 1] // m, grid[:, 2] // m
  n_tokens = gt * gh * gw
  ends = xp.cumsum(n_tokens)
  starts = ends - n_tokens

  # k: running index of each image token over the whole batch (row-major).
  k = xp.cumsum(is_img.reshape(-1).astype(xp.int32)).reshape(b, t) - 1
  img = xp.clip(xp.searchsorted(ends, k, side="right"), 0, grid.shape[0] - 1)
  offset = k - starts[img]
  lh, lw = xp.maximum(gh[img], 1), xp.maximum(gw[img], 1)
  t_off = offset // (lh * lw)
  h_off = (offset // lw) % lh
  w_off = offset % lw

  # Every real text token advances the position by 1; an image advances it by
  # max(h, w) / merge at its last token.
  last_of_image = is_img & (offset == n_tokens[img] - 1)
  advance = xp.where(mask & ~is_img, 1, 0) + xp.where(last_of_image, xp.maximum(gh, gw)[img], 0)
  before = xp.cumsum(advance, axis=1) - advance  # exclusive cumsum: the start position

  zero = xp.zeros_like(before)
  pos_t = before + xp.where(is_img, t_off, zero)
  pos_h = before + xp.where(is_img, h_off, zero)
  pos_w = before + xp.where(is_img, w_off, zero)
  position_ids = xp.stack([pos_t, pos_h, pos_w]).astype(xp.int32)
  position_ids = xp.where(mask[None], position_ids, 0)
  max_pos = xp.max(xp.where(mask[None], position_ids, -1), axis=(0, 2))
  rope_deltas = (max_pos + 1 - mask.sum(axis=1)).astype(xp.int32)
  return position_ids, rope_deltas


def text_rope(position_ids, head_dim: int, theta: float, mrope_section):
  """cos, sin: float32[B, T, H] for M-RoPE position ids int[3, B, T].

  The H/2 frequencies are split into `mrope_section` chunks; chunk i takes its angle from
  position component i % 3 (temporal, height, width).
  """
  inv_freq = 1.0 / (theta**(jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  freqs = position_ids.astype(jnp.float32)[..., None] * inv_freq[None, None, None]
  # freqs: [3, B, T, H/2]
  bounds = np.cumsum(mrope_section)[:-1]
  chunks = jnp.split(freqs, bounds, axis=-1)
  freqs = jnp.concatenate([c[i % 3] for i, c in enumerate(chunks)], axis=-1)
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def vision_rope(pos_hw, head_dim: int, theta: float):
  """cos, sin: float32[P, H] for patch (row, column) positions int[P, 2].

  A quarter of the head dim rotates with the row, a quarter with the column; the pair is
  repeated to span the whole head (rotate-half layout).
  """
  spatial = head_dim // 2
  inv_freq = 1.0 / (theta**(jnp.arange(0, spatial, 2, dtype=jnp.float32) / spatial))
  freqs = pos_hw.astype(jnp.float32)[..., None] * inv_freq[None, None]  # [P, 2, H/4]
  freqs = freqs.reshape(freqs.shape[0], -1)  # [P, H/2]: rows then columns
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)
