"""The Qwen2.5-VL vision tower: patch embedding, 2-D RoPE, window/full attention blocks and
the 2x2 patch merger.

Letters: P patches, U merged units (P/4), D vision width, N heads, H head dim, F MLP width,
O output width (the decoder's D), I images.

Window attention without reordering: transformers permutes patches so that each window is
contiguous and runs attention per window. Attention is permutation-equivariant, so here
every patch instead carries a window id and a frame id (computed from `image_grid_thw`
inside the graph) and attention is masked to equal ids. The result is the same, shapes stay
static (P is the only size), and padded patches (beyond the grids' total) form one inert
segment of their own, which lets batches pad `pixel_values` to a fixed length.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from atlas_jax.model import attention, layers, rope
from atlas_jax.model.config import VisionConfig


def patch_layout(image_grid_thw, num_patches: int, config: VisionConfig):
  """Per-patch (row, col) positions and attention segment ids, from the image grids.

  image_grid_thw: int[I, 3]; rows of zeros are padding images.
  Returns pos_hw int32[P, 2], window_id int32[P], frame_id int32[P]. Patches past the grids'
  total get id -1 in both.
  """
  m, ws = config.spatial_merge_size, config.window_units
  grid = jnp.asarray(image_grid_thw, jnp.int32)
  gt, lh, lw = grid[:, 0], grid[:, 1] // m, grid[:, 2] // m
  units = gt * lh * lw
  ends = jnp.cumsum(units)
  n_wh, n_ww = -(-lh // ws), -(-lw // ws)  # windows per frame, rounded up
  window_base = jnp.cumsum(gt * n_wh * n_ww) - gt * n_wh * n_ww
  frame_base = jnp.cumsum(gt) - gt

  u = jnp.arange(num_patches, dtype=jnp.int32) // (m * m)
  sub = jnp.arange(num_patches, dtype=jnp.int32) % (m * m)
  img = jnp.searchsorted(ends, u, side="right")
  valid = img < grid.shape[0]
  img = jnp.minimum(img, grid.shape[0] - 1)
  off = u - (ends - units)[img]
  h, w = jnp.maximum(lh[img], 1), jnp.maximum(lw[img], 1)
  frame = off // (h * w)
  uh, uw = (off // w) % h, off % w
  pos_hw = jnp.stack([uh * m + sub // m, uw * m + sub % m], axis=-1)
  window = window_base[img] + (frame * n_wh[img] + uh // ws) * n_ww[img] + uw // ws
  frame_id = frame_base[img] + frame
  return (jnp.where(valid[:, None], pos_hw, 0), jnp.where(valid, window, -1),
          jnp.where(valid, frame_id, -1))


class VisionBlock(nn.Module):
  config: VisionConfig
  dtype: jnp.dtype
  attention_impl: str = "xla"

  @nn.compact
  def __call__(self, x, cos, sin, window_id, frame_id, is_full):
    cfg = self.config
    seg = jnp.where(is_full, frame_id, window_id)
    mask = seg[:, None] == seg[None, :]
    h = layers.RMSNorm(cfg.rms_norm_eps, self.dtype, name="norm1")(x)
    qkv = layers.dense((3, cfg.num_heads, cfg.head_dim), -1,
                       ("embed", None, "heads", "head_dim"),
                       bias_axes=(None, "heads", "head_dim"), dtype=self.dtype, name="qkv")(h)
    q, k, v = (qkv[:, i][None] for i in range(3))  # [1, P, N, H]
    q, k = layers.apply_rope(q, cos[None], sin[None]), layers.apply_rope(k, cos[None], sin[None])
    segments = attention.Mask(dense=mask[None], segment_ids=seg[None])
    attn = attention.attention(q, k, v, segments, impl=self.attention_impl)[0]
    x = x + layers.dense(cfg.hidden_size, (-2, -1), ("heads", "head_dim", "embed"),
                         bias_axes=("embed",), dtype=self.dtype, name="out")(attn)
    h = layers.RMSNorm(cfg.rms_norm_eps, self.dtype, name="norm2")(x)
    x = x + layers.SwiGLU(cfg.intermediate_size, cfg.hidden_act, use_bias=True,
                          dtype=self.dtype, name="mlp")(h)
    return x, None


class VisionTower(nn.Module):
  """pixel_values float[P, C*T*p*p] + image_grid_thw int[I, 3] -> features float[P/4, O]."""

  config: VisionConfig
  dtype: jnp.dtype
  remat: str = "none"
  attention_impl: str = "xla"
  unroll: bool = False  # ModelConfig.unroll_loops

  @nn.compact
  def __call__(self, pixel_values, image_grid_thw):
    cfg = self.config
    num_patches = pixel_values.shape[0]
    if num_patches % (cfg.spatial_merge_size**2):
      raise ValueError(f"pixel_values has {num_patches} patches, not a multiple of "
                       f"{cfg.spatial_merge_size**2} (one merged unit)")
    pos_hw, window_id, frame_id = patch_layout(image_grid_thw, num_patches, cfg)
    cos, sin = rope.vision_rope(pos_hw, cfg.head_dim, cfg.rope_theta)

    x = layers.dense(cfg.hidden_size, -1, (None, "embed"), dtype=self.dtype,
                     name="patch_embed")(pixel_values.astype(self.dtype))
    is_full = jnp.zeros((cfg.depth,), bool).at[jnp.asarray(
        cfg.fullatt_block_indexes, jnp.int32)].set(True)
    block = layers.maybe_remat(VisionBlock, self.remat)
    blocks = layers.scan_layers(block, cfg.depth, in_axes=(nn.broadcast,) * 4 + (0,),
                                unroll=self.unroll)
    x, _ = blocks(cfg, self.dtype, self.attention_impl, name="blocks")(x, cos, sin, window_id, frame_id, is_full)

    # Patch merger: norm, group each 2x2 unit, MLP to the decoder width.
    x = layers.RMSNorm(cfg.rms_norm_eps, self.dtype, name="merger_norm")(x)
    x = x.reshape(num_patches // cfg.spatial_merge_size**2, -1)
    merged = x.shape[-1]
    x = layers.dense(merged, -1, (None, "mlp"), bias_axes=("mlp",), dtype=self.dtype,
                     name="merger_fc1")(x)
    x = jax.nn.gelu(x, approximate=False)
    return layers.dense(cfg.out_hidden_size, -1, ("mlp", "embed"), bias_axes=("embed",),
                        dtype=self.dtype, name="merger_fc2")(x)
