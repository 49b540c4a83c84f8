"""The Qwen2 text decoder with M-RoPE: GQA attention with q/k/v biases, RMSNorm, SwiGLU.

Letters: B batch, T query length, S key/value length, D width, N query heads, K kv heads,
H head dim, V vocab, L layers.

The KV cache is an explicit pytree `{"k": [L, B, S, K, H], "v": [L, B, S, K, H]}`; a call
with a cache writes this call's keys and values at `cache_index` and attends over all S
slots under the caller's mask.
"""

from __future__ import annotations

import flax.linen as nn
import jax
from jax.ad_checkpoint import checkpoint_name
import jax.numpy as jnp

from atlas_jax.model import layers
from atlas_jax.model.config import TextConfig


class DecoderLayer(nn.Module):
  config: TextConfig
  dtype: jnp.dtype
  attention_chunk: int = 0

  @nn.compact
  def __call__(self, x, cos, sin, mask, cache_index, cache):
    cfg = self.config
    n, kv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    h = layers.RMSNorm(cfg.rms_norm_eps, self.dtype, name="input_norm")(x)
    q = layers.dense((n, hd), -1, ("embed", "heads", "head_dim"),
                     bias_axes=("heads", "head_dim"), dtype=self.dtype, name="q")(h)
    k = layers.dense((kv, hd), -1, ("embed", "kv_heads", "head_dim"),
                     bias_axes=("kv_heads", "head_dim"), dtype=self.dtype, name="k")(h)
    v = layers.dense((kv, hd), -1, ("embed", "kv_heads", "head_dim"),
                     bias_axes=("kv_heads", "head_dim"), dtype=self.dtype, name="v")(h)
    q, k = layers.apply_rope(q, cos, sin), layers.apply_rope(k, cos, sin)
    if cache is not None:
      k = jax.lax.dynamic_update_slice_in_dim(cache["k"], k.astype(cache["k"].dtype),
                                              cache_index, axis=1)
      v = jax.lax.dynamic_update_slice_in_dim(cache["v"], v.astype(cache["v"].dtype),
                                              cache_index, axis=1)
      cache = {"k": k, "v": v}
    attn = layers.attention(q, k.astype(q.dtype), v.astype(q.dtype), mask,
                            chunk=self.attention_chunk)
    attn = checkpoint_name(attn, "attention_out")
    x = x + layers.dense(cfg.hidden_size, (-2, -1), ("heads", "head_dim", "embed"),
                         dtype=self.dtype, name="o")(attn)
    x = nn.with_logical_constraint(x, ("activation_batch", "activation_length",
                                       "activation_embed"))
    h = layers.RMSNorm(cfg.rms_norm_eps, self.dtype, name="post_attn_norm")(x)
    x = x + layers.SwiGLU(cfg.intermediate_size, cfg.hidden_act, dtype=self.dtype,
                          name="mlp")(h)
    x = nn.with_logical_constraint(x, ("activation_batch", "activation_length",
                                       "activation_embed"))
    return x, cache


class Decoder(nn.Module):
  """Embeddings in, final-norm hidden states out: float[B, T, D] -> float[B, T, D]."""

  config: TextConfig
  dtype: jnp.dtype
  remat: str = "none"
  attention_chunk: int = 0

  @nn.compact
  def __call__(self, x, cos, sin, mask, cache_index=None, cache=None):
    cfg = self.config
    block = layers.maybe_remat(DecoderLayer, self.remat)
    cache_axis = nn.broadcast if cache is None else 0
    stack = layers.scan_layers(block, cfg.num_hidden_layers,
                               in_axes=(nn.broadcast,) * 4 + (cache_axis,))
    x, cache = stack(cfg, self.dtype, self.attention_chunk, name="layers")(x, cos, sin, mask, cache_index, cache)
    x = layers.RMSNorm(cfg.rms_norm_eps, self.dtype, name="final_norm")(x)
    return x, cache
