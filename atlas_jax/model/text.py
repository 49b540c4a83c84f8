"""The Qwen2 text decoder with M-RoPE: GQA attention with q/k/v biases, RMSNorm, SwiGLU.

Letters: B batch, T query length, S key/value length, D width, N query heads, K kv heads,
H head dim, V vocab, L layers.

Two ways of running with a KV cache (the "xla" attention path, which reads the head-major
layout without a transpose; under "splash" the decode step's one query per row attends on
`attention.decode_kernel`):

* the prefill (`Decoder` with `return_kv`): the layer scan attends over the prompt alone
  and returns each layer's keys and values {"k", "v"}: [L, B, K, T, H] as its per-layer
  outputs (no cache in the carry, no slots for new tokens); the caller builds the decode's
  caches from them.
* the decode step (`decode_layers`), per-layer caches, a tuple of L `{"k", "v"}:
  [B, K, S, H]`: a call writes its keys and values at `cache_index` and attends over all S
  slots under the caller's mask. The layers are unrolled over per-layer weights, split
  from the stack once per call (`split_layers`). In a scanned step XLA:CPU copies each
  layer's weights and its cache slice out of the stacks at every token; unrolled, a token
  reads the weights and the cache where they lie and writes one [B, K, 1, H] slot per
  layer in place.
"""

from __future__ import annotations

import flax.linen as nn
import jax
from jax.ad_checkpoint import checkpoint_name
import jax.numpy as jnp

from atlas_jax import sharding
from atlas_jax.model import attention as attention_lib
from atlas_jax.model import layers
from atlas_jax.model.config import TextConfig


RESIDUAL_AXES = ("activation_batch", "activation_length", "activation_embed")


class _LayerParts:
  """One decoder layer's submodules, declared in the calling module's compact scope: the
  parameter names `DecoderLayer` and `SharedPrefixLayer` share (input_norm, q, k, v, o,
  post_attn_norm, mlp), and the computation around the attention."""

  def __init__(self, cfg: TextConfig, dtype):
    n, kv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    self.input_norm = layers.RMSNorm(cfg.rms_norm_eps, dtype, name="input_norm")
    self.q = layers.dense((n, hd), -1, ("embed", "heads", "head_dim"),
                          bias_axes=("heads", "head_dim"), dtype=dtype, name="q")
    self.k = layers.dense((kv, hd), -1, ("embed", "kv_heads", "head_dim"),
                          bias_axes=("kv_heads", "head_dim"), dtype=dtype, name="k")
    self.v = layers.dense((kv, hd), -1, ("embed", "kv_heads", "head_dim"),
                          bias_axes=("kv_heads", "head_dim"), dtype=dtype, name="v")
    self.o = layers.dense(cfg.hidden_size, (-2, -1), ("heads", "head_dim", "embed"),
                          dtype=dtype, name="o")
    self.post_attn_norm = layers.RMSNorm(cfg.rms_norm_eps, dtype, name="post_attn_norm")
    self.mlp = layers.SwiGLU(cfg.intermediate_size, cfg.hidden_act, dtype=dtype, name="mlp")

  def qkv(self, x, cos, sin):
    """Queries, keys (both rotated) and values of the residual stream x float[B, T, D]."""
    h = self.input_norm(x)
    return (layers.apply_rope(self.q(h), cos, sin), layers.apply_rope(self.k(h), cos, sin),
            self.v(h))

  def rest(self, x, attn):
    """The residual stream after the attention output attn float[B, T, N, H]: the output
    projection, then the MLP block."""
    x = x + self.o(checkpoint_name(attn, "attention_out"))
    x = sharding.constrain(x, RESIDUAL_AXES)
    x = x + self.mlp(self.post_attn_norm(x))
    return sharding.constrain(x, RESIDUAL_AXES)


class DecoderLayer(nn.Module):
  config: TextConfig
  dtype: jnp.dtype
  attention_chunk: int = 0
  attention_impl: str = "xla"
  unroll: bool = False
  return_kv: bool = False  # the prefill: also return this layer's keys and values

  @nn.compact
  def __call__(self, carry, cos, sin, mask, cache_index=None):
    """carry: x float[B, T, D], or (x, cache) with this layer's cache {"k", "v"}:
    [B, K, S, H] (the decode step). Returns (the carry updated, None), or with `return_kv`
    (x, this layer's keys and values {"k", "v"}: [B, K, T, H], which the queries attend to
    alone under mask bool[B, T, T]). cache_index: where the decode step writes this call's
    keys and values. With the `layers.ATTENTION_COLLECTION` collection mutable, sows the
    attention weights float32[B, N, T, S] as "probs"."""
    x, cache = carry if isinstance(carry, tuple) else (carry, None)
    cfg = self.config
    # Static: only a caller asking for the attention weights (the collection mutable)
    # gets them; every other graph is unchanged.
    want_probs = self.is_mutable_collection(layers.ATTENTION_COLLECTION)
    parts = _LayerParts(cfg, self.dtype)
    q, k, v = parts.qkv(x, cos, sin)
    if cache is not None:
      zero = jnp.zeros((), jnp.int32)
      at = (zero, zero, jnp.asarray(cache_index, jnp.int32), zero)
      cache = {name: jax.lax.dynamic_update_slice(
          cache[name], jnp.swapaxes(x, 1, 2).astype(cache[name].dtype), at)
               for name, x in (("k", k), ("v", v))}
      dense = attention_lib.as_dense(mask)
      keys, values = cache["k"].astype(q.dtype), cache["v"].astype(q.dtype)
      if self.attention_impl == "splash" and not want_probs and q.shape[1] == 1:
        attn = attention_lib.decode_kernel(q, keys, values, dense[:, 0], cache_index)
      else:
        attn = attention_lib.grouped(q, keys, values, dense, want_probs)
    elif self.return_kv:
      cache = {"k": jnp.swapaxes(k, 1, 2), "v": jnp.swapaxes(v, 1, 2)}
      attn = attention_lib.grouped(q, cache["k"], cache["v"], attention_lib.as_dense(mask),
                                   want_probs)
    else:
      attn = attention_lib.attention(q, k, v, mask, chunk=self.attention_chunk,
                                     impl=self.attention_impl, return_probs=want_probs,
                                     unroll=self.unroll)
    if want_probs:
      attn, probs = attn
      self.sow(layers.ATTENTION_COLLECTION, "probs", probs)
    x = parts.rest(x, attn)
    if self.return_kv:
      return x, cache
    return ((x, cache) if cache is not None else x), None


class Decoder(nn.Module):
  """Embeddings in, final-norm hidden states out: float[B, T, D] -> float[B, T, D]."""

  config: TextConfig
  dtype: jnp.dtype
  remat: str = "none"
  attention_chunk: int = 0
  attention_impl: str = "xla"
  unroll: bool = False  # ModelConfig.unroll_loops

  @nn.compact
  def __call__(self, x, cos, sin, mask, return_kv: bool = False):
    """mask: bool[B, T, T] or an `attention.Mask`. Returns (hidden states, None), or with
    `return_kv` (static; the prefill) (hidden states, each layer's keys and values
    {"k", "v"}: [L, B, K, T, H])."""
    cfg = self.config
    block = layers.maybe_remat(DecoderLayer, self.remat)
    stack = layers.scan_layers(block, cfg.num_hidden_layers, in_axes=(nn.broadcast,) * 3,
                               unroll=self.unroll)
    x, kv = stack(cfg, self.dtype, self.attention_chunk, self.attention_impl, self.unroll,
                  return_kv, name="layers")(x, cos, sin, mask)
    x = layers.RMSNorm(cfg.rms_norm_eps, self.dtype, name="final_norm")(x)
    return x, kv


def split_layers(layer_params, num_layers: int) -> tuple:
  """Stacked layer params ([L, ...] leaves) as a tuple of L per-layer pytrees (one copy)."""
  return tuple(jax.tree.map(lambda x, i=i: x[i], layer_params) for i in range(num_layers))


def unfoldable_zero(x) -> jax.Array:
  """int32 0 computed from x (1 if x's first element is NaN, where the result is NaN
  anyway): a value the compiler cannot fold, so whatever is indexed or selected by it is
  computed after x, in the loop that computes x."""
  return jnp.isnan(x.reshape(-1)[0]).astype(jnp.int32)


def decode_layers(config: TextConfig, dtype, layer_params, final_norm, x, cos, sin, mask,
                  cache_index, caches: tuple, *, one_layer_at_a_time: bool = False,
                  attention_impl: str = "xla"):
  """`Decoder` with a cache, its layers unrolled over per-layer caches (the decode step).

  layer_params: `split_layers` of params["decoder"]["layers"] (a tuple of L per-layer
  pytrees), or the stacked params themselves with `one_layer_at_a_time`: each layer then
  takes its slice of the stack only once the previous layer's output exists, so inside a
  decode loop the slices (and any all-gather of them) can be neither hoisted out of the
  loop nor started early: a token holds one layer's slice at a time instead of a copy of
  every layer's for the whole loop. final_norm:
  params["decoder"]["final_norm"]; caches: L x {"k", "v"}: [B, K, S, H]. x: float[B, T, D]
  embeddings. Returns (final-norm hidden states float[B, T, D], the updated caches).
  attention_impl "splash" (TPU): one query per row attends on `attention.decode_kernel`;
  otherwise the einsums.
  """
  layer = DecoderLayer(config, dtype, attention_impl=attention_impl)
  new = []
  for i, cache in enumerate(caches):
    if one_layer_at_a_time:
      # Layer i's index read from x: its weights' slice and all-gather cannot start before
      # the previous layer's output exists, nor be hoisted out of a loop. (An optimization
      # barrier does not survive XLA:CPU's pipeline: its scheduler started every layer's
      # all-gather at the top of the loop.)
      at = i + unfoldable_zero(x)
      p = jax.tree.map(lambda w: jax.lax.dynamic_index_in_dim(w, at, 0, keepdims=False),
                       layer_params)
    else:
      p = layer_params[i]
    (x, cache), _ = layer.apply({"params": p}, (x, cache), cos, sin, mask, cache_index)
    new.append(cache)
  norm = layers.RMSNorm(config.rms_norm_eps, dtype)
  return norm.apply({"params": final_norm}, x), tuple(new)


class SharedPrefixLayer(nn.Module):
  """`DecoderLayer` (the same parameters, the same computation) on prompts and the C
  completions that continue each: the prompts attend causally to themselves; each
  completion attends to its prompt's keys and values (computed once, shared by the C
  completions) and causally to its own tokens (`attention.shared_prefix`). The prompt's
  gradient is the sum over its completions by construction. R = B*C rows, prompt-major."""

  config: TextConfig
  dtype: jnp.dtype
  attention_chunk: int = 0
  attention_impl: str = "xla"
  unroll: bool = False

  @nn.compact
  def __call__(self, carry, prompt_rope, completion_rope, prompt_mask, completion_mask):
    """carry: (prompts float[B, T, D], completions float[R, N, D]); *_rope: (cos, sin)
    float32[B, T, H] / [R, N, H]; prompt_mask: the prompts' `attention.Mask` (segment ids:
    their attention mask); completion_mask: the completions' `attention.Mask` (causal,
    segment ids: their attention mask). "splash" and "cudnn" run the prompts' attention and
    the completions' (`attention.shared_prefix_kernel`) on the kernel; "xla" the einsums."""
    xp, xc = carry
    parts = _LayerParts(self.config, self.dtype)
    qp, kp, vp = parts.qkv(xp, *prompt_rope)
    qc, kc, vc = parts.qkv(xc, *completion_rope)
    attn_p = attention_lib.attention(qp, kp, vp, prompt_mask, chunk=self.attention_chunk,
                                     impl=self.attention_impl, unroll=self.unroll)
    prefix_keys = prompt_mask.segment_ids > 0
    if self.attention_impl in ("splash", "cudnn"):
      attn_c = attention_lib.shared_prefix_kernel(qc, kp, vp, kc, vc, prefix_keys,
                                                  completion_mask, self.attention_impl)
    else:
      attn_c = attention_lib.shared_prefix(qc, kp, vp, kc, vc, prefix_keys,
                                           completion_mask.dense, self.attention_chunk,
                                           unroll=self.unroll)
    return (parts.rest(xp, attn_p), parts.rest(xc, attn_c)), None


class SharedPrefixDecoder(nn.Module):
  """`Decoder` (the same parameters: apply it to params["decoder"]) on prompts float[B, T, D]
  and their completions float[R, N, D] (`SharedPrefixLayer`); returns both final-norm
  hidden states."""

  config: TextConfig
  dtype: jnp.dtype
  remat: str = "none"
  attention_chunk: int = 0
  attention_impl: str = "xla"
  unroll: bool = False

  @nn.compact
  def __call__(self, xp, xc, prompt_rope, completion_rope, prompt_mask, completion_mask):
    cfg = self.config
    block = layers.maybe_remat(SharedPrefixLayer, self.remat)
    stack = layers.scan_layers(block, cfg.num_hidden_layers, in_axes=(nn.broadcast,) * 4,
                               unroll=self.unroll)
    (xp, xc), _ = stack(cfg, self.dtype, self.attention_chunk, self.attention_impl,
                        self.unroll, name="layers")((xp, xc), prompt_rope, completion_rope,
                                                    prompt_mask, completion_mask)
    norm = layers.RMSNorm(cfg.rms_norm_eps, self.dtype, name="final_norm")
    return norm(xp), norm(xc)
