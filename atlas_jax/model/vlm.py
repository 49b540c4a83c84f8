"""Qwen2.5-VL: vision features scattered into `<|image_pad|>` positions, then the decoder.

Letters: B batch, T length, D width, V vocab, P patches, I images.

Public functions are pure: `forward(config, params, ...)` and `init_params(config, rng)`.
Parameters are a plain pytree (no boxing); `param_axes(config)` gives the matching pytree
of logical axis names for sharding.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from atlas_jax import sharding
from atlas_jax.model import attention, layers, rope
from atlas_jax.model.config import ModelConfig
from atlas_jax.model.text import Decoder, SharedPrefixDecoder
from atlas_jax.model.vision import VisionTower


def scatter_image_features(embeds, input_ids, features, image_token_id: int):
  """Puts feature row j at the j-th image-pad token (row-major over the batch).

  embeds: float[B, T, D]; input_ids: int[B, T]; features: float[U, D] (U >= number of
  image-pad tokens; extra rows come from padded patches and are dropped).
  """
  is_img = input_ids == image_token_id
  idx = jnp.cumsum(is_img.reshape(-1)).reshape(is_img.shape) - 1
  gathered = features[jnp.clip(idx, 0, features.shape[0] - 1)].astype(embeds.dtype)
  return jnp.where(is_img[..., None], gathered, embeds)


class Qwen25VL(nn.Module):
  config: ModelConfig

  def setup(self):
    cfg = self.config
    dtype = layers.dtype_of(cfg.dtype)
    self.visual = VisionTower(cfg.vision, dtype, cfg.remat, cfg.attention_impl,
                              cfg.unroll_loops)
    self.embed = nn.Embed(
        cfg.text.vocab_size, cfg.text.hidden_size, dtype=dtype, param_dtype=jnp.float32,
        embedding_init=layers.logical_init(layers.DEFAULT_INIT, ("vocab", "embed")))
    self.decoder = Decoder(cfg.text, dtype, cfg.remat, cfg.attention_chunk, cfg.attention_impl,
                           cfg.unroll_loops)
    if not cfg.text.tie_word_embeddings:
      self.lm_head = layers.dense(cfg.text.vocab_size, -1, ("embed", "vocab"), dtype=dtype,
                                  name="lm_head")

  def embed_inputs(self, input_ids, pixel_values, image_grid_thw):
    """Token embeddings with image features in the image-pad positions.

    Flat (HF) form: pixel_values float[P, C*T*p*p], image_grid_thw int[I, 3], features
    placed row-major over the batch. Batch-major form (training, rollout; shards over the
    batch): pixel_values float[B, P, C*T*p*p], image_grid_thw int[B, I, 3], each sample's
    features placed in its own row.
    """
    x = self.embed(input_ids)
    if pixel_values is None:
      return x
    image_id = self.config.image_token_id
    if pixel_values.ndim == 2:
      features = self.visual(pixel_values, image_grid_thw)
      return scatter_image_features(x, input_ids, features, image_id)
    towers = nn.vmap(lambda tower, px, g: tower(px, g), variable_axes={"params": None},
                     split_rngs={"params": False})
    features = towers(self.visual, pixel_values, image_grid_thw)  # [B, U, D]
    return jax.vmap(lambda e, i, f: scatter_image_features(e[None], i[None], f, image_id)[0])(
        x, input_ids, features)

  def hidden_states(self, input_ids, position_ids, mask, pixel_values=None,
                    image_grid_thw=None, return_kv: bool = False):
    """Final-norm hidden states float[B, T, D], and with `return_kv` (static; the sampler's
    prefill) each layer's keys and values {"k", "v"}: [L, B, K, T, H] (else None)."""
    x, cos, sin = self.decoder_inputs(input_ids, position_ids, pixel_values, image_grid_thw)
    return self.decoder(x, cos, sin, mask, return_kv)

  def decoder_inputs(self, input_ids, position_ids, pixel_values=None, image_grid_thw=None):
    """The decoder's inputs: embeddings float[B, T, D] (image features in place) and the
    M-RoPE cos, sin float32[B, T, H] of position_ids int[3, B, T]."""
    cfg = self.config.text
    x = self.embed_inputs(input_ids, pixel_values, image_grid_thw)
    x = sharding.constrain(x, ("activation_batch", "activation_length", "activation_embed"))
    cos, sin = rope.text_rope(position_ids, cfg.head_dim, cfg.rope_theta, cfg.mrope_section)
    return x, cos, sin

  def logits(self, hidden):
    """float32[..., V] from hidden states float[..., D]."""
    if self.config.text.tie_word_embeddings:
      out = self.embed.attend(hidden)
    else:
      out = self.lm_head(hidden)
    return out.astype(jnp.float32)

  def __call__(self, input_ids, position_ids, mask, pixel_values=None, image_grid_thw=None):
    hidden, _ = self.hidden_states(input_ids, position_ids, mask, pixel_values, image_grid_thw)
    return self.logits(hidden)


def causal_mask(attention_mask):
  """bool[B, T, T]: causal and not attending to padding keys."""
  t = attention_mask.shape[1]
  causal = jnp.tril(jnp.ones((t, t), bool))
  return causal[None] & attention_mask.astype(bool)[:, None, :]


def text_mask(attention_mask) -> attention.Mask:
  """The causal padding mask of a batch, dense (bool[B, T, T]) and structured (segment ids
  = attention_mask, causal) for the attention kernels."""
  attention_mask = jnp.asarray(attention_mask)
  return attention.Mask(dense=causal_mask(attention_mask),
                        segment_ids=attention_mask.astype(jnp.int32), causal=True)


def shared_prefix_hidden(config: ModelConfig, params, prompt_ids, prompt_positions,
                         prompt_mask, pixel_values, image_grid_thw, completion_ids,
                         completion_positions, completion_mask):
  """Final-norm hidden states of B prompts and of the R = B*C completions that continue
  them, the vision tower and the prompts' layers run once per prompt (`SharedPrefixDecoder`).

  prompt_ids, prompt_mask: int[B, T] (left-padded); prompt_positions: int[3, B, T];
  pixel_values / image_grid_thw: batch-major (float[B, P, C], int[B, I, 3]) or None;
  completion_ids, completion_mask: int[R, N] (prompt-major: row r continues prompt
  r // C); completion_positions: int[3, R, N] (continuing the prompt's M-RoPE positions).
  Returns (float[B, T, D], float[R, N, D]), each row equal to the unshared `hidden_states`
  of [prompt; completion] at those positions.
  """
  model = Qwen25VL(config)
  apply = lambda *a, **k: model.apply({"params": params}, *a, **k,
                                      method=Qwen25VL.decoder_inputs)
  xp, cos_p, sin_p = apply(prompt_ids, prompt_positions, pixel_values, image_grid_thw)
  xc, cos_c, sin_c = apply(completion_ids, completion_positions)
  own = text_mask(completion_mask)
  decoder = SharedPrefixDecoder(config.text, layers.dtype_of(config.dtype), config.remat,
                                config.attention_chunk, config.attention_impl,
                                config.unroll_loops)
  return decoder.apply({"params": params["decoder"]}, xp, xc, (cos_p, sin_p), (cos_c, sin_c),
                       text_mask(prompt_mask), own)


def _is_concrete(*xs) -> bool:
  return not any(isinstance(x, jax.core.Tracer) for x in xs if x is not None)


def check_image_inputs(config: ModelConfig, input_ids, pixel_values, image_grid_thw) -> None:
  """Raises ValueError when image-pad tokens, grids and patches disagree (host-side)."""
  if pixel_values is None:
    return
  if image_grid_thw is None:
    raise ValueError("pixel_values given without image_grid_thw")
  grid = np.asarray(image_grid_thw)
  ids = np.asarray(input_ids)
  if pixel_values.ndim == 3:  # batch-major: check each sample
    for b in range(ids.shape[0]):
      _check_sample(config, ids[b], pixel_values.shape[1], grid[b], f"sample {b}: ")
  else:
    _check_sample(config, ids, pixel_values.shape[0], grid, "")


def _check_sample(config, ids, num_rows, grid, where):
  patches = int(grid.prod(-1).sum())
  if num_rows < patches:
    raise ValueError(f"{where}image_grid_thw describes {patches} patches but pixel_values has "
                     f"{num_rows} rows")
  features = patches // config.vision.spatial_merge_size**2
  n_tokens = int((ids == config.image_token_id).sum())
  if n_tokens != features:
    raise ValueError(f"{where}Image features and image tokens do not match: input_ids has "
                     f"{n_tokens} <|image_pad|> tokens (id {config.image_token_id}) but "
                     f"image_grid_thw gives {features} features")


def forward(config: ModelConfig, params, input_ids, attention_mask, pixel_values=None,
            image_grid_thw=None, position_ids=None, *, return_attention: bool = False,
            attention_layers: tuple[int, ...] | None = None):
  """Logits of a batch (and, when asked, the decoder's attention weights).

  Args:
    config: static ModelConfig (hashable; use `jax.jit(forward, static_argnums=0)`).
    params: the parameter pytree.
    input_ids: int[B, T]. attention_mask: int[B, T] (1 = real token).
    pixel_values: float[P, 3*2*14*14] flattened patches of all images (rows may be padded
      past the grids' total), or batch-major float[B, P, 3*2*14*14], or None.
    image_grid_thw: int[I, 3] (zero rows = padding images), or int[B, I, 3], or None.
    position_ids: int[3, B, T] M-RoPE ids; computed in-graph with `get_rope_index` when
      None (the data pipeline precomputes them on the host).
    return_attention: static; also return the decoder's attention weights, computed by the
      same layer code as training (the "xla" attention path, whatever attention_impl is).
    attention_layers: static; the decoder layers whose weights to return (None: all).
  Returns:
    float32[B, T, V] logits; with return_attention, (logits, float32[L, B, N, T, S]): per
    selected layer, each query head's softmax over the keys (rows of padding queries are
    meaningless).
  """
  layer_ids = _layer_ids(config, attention_layers) if return_attention else ()
  if _is_concrete(input_ids, image_grid_thw):
    check_image_inputs(config, input_ids, pixel_values, image_grid_thw)
  if position_ids is None:
    grid = None if image_grid_thw is None else jnp.reshape(image_grid_thw, (-1, 3))
    position_ids, _ = rope.get_rope_index(
        input_ids, attention_mask, grid, image_token_id=config.image_token_id,
        spatial_merge_size=config.vision.spatial_merge_size, xp=jnp)
  inputs = (jnp.asarray(input_ids), jnp.asarray(position_ids), text_mask(attention_mask),
            pixel_values, image_grid_thw)
  if not return_attention:
    return Qwen25VL(config).apply({"params": params}, *inputs)
  logits, sown = Qwen25VL(config).apply({"params": params}, *inputs,
                                        mutable=[layers.ATTENTION_COLLECTION])
  (probs,) = sown[layers.ATTENTION_COLLECTION]["decoder"]["layers"]["probs"]  # [L, B, N, T, S]
  if layer_ids != tuple(range(config.text.num_hidden_layers)):
    probs = probs[np.asarray(layer_ids)]
  return logits, probs


def _layer_ids(config: ModelConfig, attention_layers) -> tuple[int, ...]:
  n = config.text.num_hidden_layers
  if attention_layers is None:
    return tuple(range(n))
  ids = tuple(int(i) for i in attention_layers)
  if not ids or any(not 0 <= i < n for i in ids):
    raise ValueError(f"attention_layers {attention_layers!r} must be a non-empty tuple of "
                     f"decoder layer indices in [0, {n})")
  return ids


def _dummy_inputs(config: ModelConfig):
  m = config.vision.spatial_merge_size
  ids = jnp.full((1, 2), config.image_token_id, jnp.int32)
  pixels = jnp.zeros((m * m, config.vision.patch_dim), jnp.float32)
  grid = jnp.array([[1, m, m]], jnp.int32)
  return ids, jnp.zeros((3, 1, 2), jnp.int32), jnp.ones((1, 2, 2), bool), pixels, grid


def _init_boxed(config: ModelConfig, rng):
  return Qwen25VL(config).init(rng, *_dummy_inputs(config))["params"]


def init_params(config: ModelConfig, rng):
  """Random parameters (normal(0.02) weights, unit norms, zero biases), unboxed. Jitted: to
  create them sharded, call it under `jax.jit(..., out_shardings=...)`."""
  return _init_unboxed(config, rng)


@functools.partial(jax.jit, static_argnums=0)
def _init_unboxed(config: ModelConfig, rng):
  return nn.unbox(_init_boxed(config, rng))


def abstract_params(config: ModelConfig):
  """ShapeDtypeStructs of the parameter pytree; allocates nothing."""
  return nn.unbox(_boxed_shapes(config))


def param_axes(config: ModelConfig):
  """Pytree of logical axis-name tuples (a `PartitionSpec` per leaf) matching the params."""
  return nn.get_partition_spec(_boxed_shapes(config))


def param_shardings(mesh, config: ModelConfig, rules=sharding.RULES):
  """Shardings of the params over `mesh` (logical axes mapped by `rules`; every sharded dim
  checked for divisibility)."""
  return sharding.logical_to_shardings(mesh, param_axes(config), rules, abstract_params(config))


def _boxed_shapes(config: ModelConfig):
  """The boxed parameter shapes of `config`, traced once per config (a model trace costs
  about half a second; setup, sharding and checkpointing ask for them many times). A
  fresh copy of the nested dicts each call, so callers may edit theirs."""
  return jax.tree.map(lambda x: x, _boxed_shapes_once(config),
                      is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))


@functools.lru_cache(maxsize=16)
def _boxed_shapes_once(config: ModelConfig):
  return jax.eval_shape(lambda: _init_boxed(config, jax.random.key(0)))
