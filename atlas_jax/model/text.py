"""The Qwen2 text decoder with M-RoPE: GQA attention with q/k/v biases, RMSNorm, SwiGLU.

Letters: B batch, T query length, S key/value length, D width, N query heads, K kv heads,
H head dim, V vocab, L layers.

The KV cache is an explicit pytree; a call with a cache writes this call's keys and values
at `cache_index` and attends over all S slots under the caller's mask (always the "xla"
attention path, which reads the head-major layout without a transpose). Two layouts:

* stacked, `{"k", "v"}: [L, B, K, S, H]` (the prefill, `Decoder` with a cache): the cache
  rides in the layer scan's carry; layer l writes its [B, K, T, H] slice at
  (l, :, :, cache_index) and reads its own layer back.
* per layer, a tuple of L `{"k", "v"}: [B, K, S, H]` (the decode step, `decode_layers`):
  the layers are unrolled over per-layer weights, split from the stack once per call
  (`split_layers`). In a scanned step XLA:CPU copies each layer's weights and its cache
  slice out of the stacks at every token; unrolled, a token reads the weights and the
  cache where they lie and writes one [B, K, 1, H] slot per layer in place.
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


class DecoderLayer(nn.Module):
  config: TextConfig
  dtype: jnp.dtype
  attention_chunk: int = 0
  attention_impl: str = "xla"
  unroll: bool = False

  @nn.compact
  def __call__(self, carry, cos, sin, mask, cache_index, layer_index):
    """carry: x float[B, T, D], or (x, cache): a stacked cache [L, B, K, S, H] with
    layer_index int32[] (this layer's slot), or this layer's own [B, K, S, H] with None.
    With the `layers.ATTENTION_COLLECTION` collection mutable, sows the attention weights
    float32[B, N, T, S] as "probs"."""
    x, cache = carry if isinstance(carry, tuple) else (carry, None)
    cfg = self.config
    # Static: only a caller asking for the attention weights (the collection mutable)
    # gets them; every other graph is unchanged.
    want_probs = self.is_mutable_collection(layers.ATTENTION_COLLECTION)
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
      zero = jnp.zeros((), jnp.int32)
      at = (zero, zero, jnp.asarray(cache_index, jnp.int32), zero)
      if layer_index is not None:  # stacked [L, ...] cache: this layer's slot
        at = (jnp.asarray(layer_index, jnp.int32),) + at
      new = lambda x: jnp.swapaxes(x, 1, 2).reshape((1,) * (len(at) - 4) + (
          x.shape[0], x.shape[2], x.shape[1], x.shape[3]))
      cache = {name: jax.lax.dynamic_update_slice(cache[name], new(x).astype(
          cache[name].dtype), at) for name, x in (("k", k), ("v", v))}
      if layer_index is not None:
        k, v = (jax.lax.dynamic_index_in_dim(cache[name], layer_index, 0, keepdims=False)
                for name in ("k", "v"))
      else:
        k, v = cache["k"], cache["v"]
      attn = attention_lib.grouped(q, k.astype(q.dtype), v.astype(q.dtype),
                                   attention_lib.as_dense(mask), want_probs)
    else:
      attn = attention_lib.attention(q, k, v, mask, chunk=self.attention_chunk,
                                     impl=self.attention_impl, return_probs=want_probs,
                                     unroll=self.unroll)
    if want_probs:
      attn, probs = attn
      self.sow(layers.ATTENTION_COLLECTION, "probs", probs)
    attn = checkpoint_name(attn, "attention_out")
    x = x + layers.dense(cfg.hidden_size, (-2, -1), ("heads", "head_dim", "embed"),
                         dtype=self.dtype, name="o")(attn)
    x = sharding.constrain(x, ("activation_batch", "activation_length", "activation_embed"))
    h = layers.RMSNorm(cfg.rms_norm_eps, self.dtype, name="post_attn_norm")(x)
    x = x + layers.SwiGLU(cfg.intermediate_size, cfg.hidden_act, dtype=self.dtype,
                          name="mlp")(h)
    x = sharding.constrain(x, ("activation_batch", "activation_length", "activation_embed"))
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
  def __call__(self, x, cos, sin, mask, cache_index=None, cache=None):
    """With a cache (prefill, decode): returns it updated; else returns None for it."""
    cfg = self.config
    block = layers.maybe_remat(DecoderLayer, self.remat)
    if cache is None:
      layer_index, index_axis = None, nn.broadcast
    else:
      layer_index, index_axis = jnp.arange(cfg.num_hidden_layers, dtype=jnp.int32), 0
    stack = layers.scan_layers(block, cfg.num_hidden_layers,
                               in_axes=(nn.broadcast,) * 4 + (index_axis,), unroll=self.unroll)
    carry, _ = stack(cfg, self.dtype, self.attention_chunk, self.attention_impl, self.unroll,
                     name="layers")(x if cache is None else (x, cache), cos, sin, mask,
                                    cache_index, layer_index)
    x, cache = carry if cache is not None else (carry, None)
    x = layers.RMSNorm(cfg.rms_norm_eps, self.dtype, name="final_norm")(x)
    return x, cache


def split_layers(layer_params, num_layers: int) -> tuple:
  """Stacked layer params ([L, ...] leaves) as a tuple of L per-layer pytrees (one copy)."""
  return tuple(jax.tree.map(lambda x, i=i: x[i], layer_params) for i in range(num_layers))


def unfoldable_zero(x) -> jax.Array:
  """int32 0 computed from x (1 if x's first element is NaN, where the result is NaN
  anyway): a value the compiler cannot fold, so whatever is indexed or selected by it is
  computed after x, in the loop that computes x."""
  return jnp.isnan(x.reshape(-1)[0]).astype(jnp.int32)


def decode_layers(config: TextConfig, dtype, layer_params, final_norm, x, cos, sin, mask,
                  cache_index, caches: tuple, *, one_layer_at_a_time: bool = False):
  """`Decoder` with a cache, its layers unrolled over per-layer caches (the decode step).

  layer_params: `split_layers` of params["decoder"]["layers"] (a tuple of L per-layer
  pytrees), or the stacked params themselves with `one_layer_at_a_time`: each layer then
  takes its slice of the stack only once the previous layer's output exists, so inside a
  decode loop neither the slices nor their casts and all-gathers can be hoisted out of the
  loop or started early: a token holds one layer's gathered weights at a time instead of
  every layer's for the whole loop. final_norm:
  params["decoder"]["final_norm"]; caches: L x {"k", "v"}: [B, K, S, H]. x: float[B, T, D]
  embeddings. Returns (final-norm hidden states float[B, T, D], the updated caches).
  """
  layer = DecoderLayer(config, dtype)
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
    (x, cache), _ = layer.apply({"params": p}, (x, cache), cos, sin, mask, cache_index, None)
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
    cfg = self.config
    n, kv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    norm = layers.RMSNorm(cfg.rms_norm_eps, self.dtype, name="input_norm")
    q_proj = layers.dense((n, hd), -1, ("embed", "heads", "head_dim"),
                          bias_axes=("heads", "head_dim"), dtype=self.dtype, name="q")
    k_proj = layers.dense((kv, hd), -1, ("embed", "kv_heads", "head_dim"),
                          bias_axes=("kv_heads", "head_dim"), dtype=self.dtype, name="k")
    v_proj = layers.dense((kv, hd), -1, ("embed", "kv_heads", "head_dim"),
                          bias_axes=("kv_heads", "head_dim"), dtype=self.dtype, name="v")
    o_proj = layers.dense(cfg.hidden_size, (-2, -1), ("heads", "head_dim", "embed"),
                          dtype=self.dtype, name="o")
    post_norm = layers.RMSNorm(cfg.rms_norm_eps, self.dtype, name="post_attn_norm")
    mlp = layers.SwiGLU(cfg.intermediate_size, cfg.hidden_act, dtype=self.dtype, name="mlp")

    def qkv(x, rope):
      h = norm(x)
      return (layers.apply_rope(q_proj(h), *rope), layers.apply_rope(k_proj(h), *rope),
              v_proj(h))

    qp, kp, vp = qkv(xp, prompt_rope)
    qc, kc, vc = qkv(xc, completion_rope)
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
    axes = ("activation_batch", "activation_length", "activation_embed")

    def rest(x, attn):
      x = x + o_proj(checkpoint_name(attn, "attention_out"))
      x = sharding.constrain(x, axes)
      x = x + mlp(post_norm(x))
      return sharding.constrain(x, axes)

    return (rest(xp, attn_p), rest(xc, attn_c)), None


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
