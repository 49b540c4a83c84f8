"""Rollouts with the training params and forward code: one jitted prefill (vision tower and
prompt), then a `lax.while_loop` decode over an explicit, static KV cache.

Letters: B prompts, G samples per prompt, R = B*G rows, T prompt length (left-padded),
N max new tokens, S = T + N cache length, L layers, K kv heads, H head dim, V vocab.
The prefill's layer scan returns each layer's prompt keys and values [L, B, K, T, H], from
which it writes, once each, the tuple of L per-layer caches {"k", "v"}: [R, K, S, H] it
hands the decode loop (repeated G times, zeros in the N new tokens' slots; no stacked
S-slot cache is ever held); the decode step runs the layers unrolled and writes each
layer's [R, K, 1, H] slot in place (`text.decode_layers`), so a token never copies the
cache. Its weights stay where they lie: the token loop traces under
`sharding.DECODE_RULES` (each matmul contracts the chip's own weight shard and all-reduces
its small output; nothing is gathered). They are split from the stack once per call where
they are whole on each device; where they are sharded over fsdp, sliced one layer at a time
at every token (`decode`'s one_layer_at_a_time), so no per-layer copy of the stack is
hoisted out of the loop: sampling holds no more than the params' shards.

The loop state is an immutable dataclass; `SamplerSettings` holds only static, hashable
settings. Log-probs returned are fp32, of the sampled token under the full-vocabulary,
temperature-scaled distribution (what the trainer computes); ids that no token owns and
the vision placeholders are never sampled.
"""

from __future__ import annotations

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp

from atlas_jax import functional_tokens, sharding
from atlas_jax.model import rope, text, vlm
from atlas_jax.model.config import ModelConfig

# The prefill's keys and values [L, B, K, T, H]; one layer's cache [R, K, S, H].
CACHE_AXES = ("layers", "cache_batch", "kv_heads", "activation_length", "head_dim")
LAYER_CACHE_AXES = CACHE_AXES[1:]  # one layer's cache in the decode loop
HEAD = ("lm_head", "embed")  # the params the LM head reads (untied or tied)


@dataclasses.dataclass(frozen=True)
class SamplerSettings:
  """Static settings. temperature 0 (or greedy=True) is greedy decoding; top_k 0 and
  top_p 1.0 disable those filters."""

  max_new_tokens: int
  samples_per_prompt: int = 1
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  greedy: bool = False
  stop_ids: tuple[int, ...] = ()
  pad_id: int = 0

  @property
  def is_greedy(self) -> bool:
    return self.greedy or self.temperature == 0.0

  @classmethod
  def from_rl(cls, rl, *, greedy: bool = False, samples_per_prompt: int | None = None,
              max_new_tokens: int | None = None) -> SamplerSettings:
    """The settings of a config's rl group (samples_per_prompt: default rl.group_size;
    max_new_tokens: default rl.max_new_tokens); stop and pad ids come from the tokenizer
    in `make_sampler`."""
    return cls(max_new_tokens=max_new_tokens or rl.max_new_tokens,
               samples_per_prompt=samples_per_prompt or rl.group_size,
               temperature=rl.temperature, top_k=rl.top_k, top_p=rl.top_p, greedy=greedy)


@flax.struct.dataclass
class SamplerState:
  step: jax.Array          # int32[]: tokens generated so far
  tokens: jax.Array        # int32[R, N]
  logps: jax.Array         # float32[R, N]
  done: jax.Array          # bool[R]
  next_position: jax.Array  # int32[R]: M-RoPE position of the next token (all 3 axes)
  prompt_mask: jax.Array   # bool[R, T]
  cache: tuple             # L x {"k", "v"}: [R, K, S, H] (updated in place)
  rng: jax.Array           # typed key


def _filter_logits(logits, settings: SamplerSettings):
  """Top-k then top-p (nucleus) filtering of float32[R, V] logits."""
  neg = jnp.finfo(jnp.float32).min
  if settings.top_k > 0:
    kth = jax.lax.top_k(logits, settings.top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, neg, logits)
  if settings.top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each token
    keep = before < settings.top_p
    cutoff = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < cutoff, neg, logits)
  return logits


def _choose(logits, allowed, rng, settings: SamplerSettings):
  """Samples int32[R] from float32[R, V] logits; returns (token, its full-vocab log-prob)."""
  temperature = 1.0 if settings.is_greedy else settings.temperature
  scaled = logits / temperature
  logp_all = jax.nn.log_softmax(scaled, axis=-1)
  masked = jnp.where(allowed[None, :], scaled, jnp.finfo(jnp.float32).min)
  if settings.is_greedy:
    token = jnp.argmax(masked, axis=-1)
  else:
    token = jax.random.categorical(rng, _filter_logits(masked, settings), axis=-1)
  token = token.astype(jnp.int32)
  return token, jnp.take_along_axis(logp_all, token[:, None], axis=-1)[:, 0]


def _record(state_tokens, state_logps, step, token, logp, done, settings):
  token = jnp.where(done, settings.pad_id, token)
  logp = jnp.where(done, 0.0, logp)
  tokens = jax.lax.dynamic_update_slice_in_dim(state_tokens, token[:, None], step, axis=1)
  logps = jax.lax.dynamic_update_slice_in_dim(state_logps, logp[:, None], step, axis=1)
  stopped = done | jnp.isin(token, jnp.asarray(settings.stop_ids, jnp.int32))
  return _rows(tokens), _rows(logps), _rows(stopped)


def _rows(x):
  """x with its rows over the batch shards: the loop state stays where its rows' prompts
  are, so each process reads back its own rows (rollout.local_rows)."""
  return sharding.constrain(x, ("cache_batch",) + (None,) * (x.ndim - 1))


def prefill(config: ModelConfig, params, input_ids, attention_mask, pixel_values,
            image_grid_thw, rng, allowed, settings: SamplerSettings) -> SamplerState:
  """Encodes images and prompts, samples the first token of each of the G rollouts.

  input_ids, attention_mask: int32[B, T], left-padded. pixel_values / image_grid_thw: in
  the batch-major form (float32[B, P, C], int32[B, I, 3]) or None. allowed: bool[V].
  """
  b = input_ids.shape[0]
  g, n = settings.samples_per_prompt, settings.max_new_tokens
  model = vlm.Qwen25VL(config)
  grid = None if image_grid_thw is None else image_grid_thw.reshape(-1, 3)
  position_ids, deltas = rope.get_rope_index(
      input_ids, attention_mask, grid, image_token_id=config.image_token_id,
      spatial_merge_size=config.vision.spatial_merge_size, xp=jnp)
  prompt_mask = attention_mask.astype(bool)
  hidden, kv = model.apply({"params": params}, input_ids, position_ids,
                           vlm.causal_mask(attention_mask), pixel_values, image_grid_thw,
                           return_kv=True, method=vlm.Qwen25VL.hidden_states)
  kv = sharding.constrain(kv, CACHE_AXES)
  logits = model.apply({"params": params}, hidden[:, -1], method=vlm.Qwen25VL.logits)

  # G rollouts per prompt share the prompt's keys and values; the N new tokens' slots are
  # zeros. Each layer's cache is written once, from the layer scan's outputs.
  repeat = lambda x: jnp.repeat(x, g, axis=0)
  cache = tuple({name: jnp.pad(repeat(kv[name][i]), ((0, 0), (0, 0), (0, n), (0, 0)))
                 for name in ("k", "v")} for i in range(config.text.num_hidden_layers))
  cache = sharding.constrain(cache, LAYER_CACHE_AXES)
  rng, key = jax.random.split(rng)
  token, logp = _choose(repeat(logits), allowed, key, settings)
  done = jnp.zeros((b * g,), bool)
  tokens, logps, done = _record(jnp.full((b * g, n), settings.pad_id, jnp.int32),
                                jnp.zeros((b * g, n), jnp.float32), 0, token, logp, done,
                                settings)
  next_position = repeat(prompt_mask.sum(-1).astype(jnp.int32) + deltas)
  return SamplerState(step=jnp.ones((), jnp.int32), tokens=tokens, logps=logps, done=done,
                      next_position=next_position, prompt_mask=repeat(prompt_mask),
                      cache=cache, rng=rng)


def decode(config: ModelConfig, params, state: SamplerState, allowed,
           settings: SamplerSettings, one_layer_at_a_time: bool = False) -> SamplerState:
  """Generates until every row has stopped or N tokens exist (`lax.while_loop`).

  The loop body traces under `sharding.DECODE_RULES`: the weights are read where they lie,
  the activations move. one_layer_at_a_time (`weights_split_over_batch(params)` where a
  Sampler calls it): each token takes one layer's slice of the stacked weights after the
  previous layer is done (`text.decode_layers`). Off, the layers are split from the stack
  once per call, and XLA hoists every layer's slice (a copy of the stack) out of the loop;
  on TPU that also cost 1.3x the bytes per token (AOT, 7B)."""
  model = vlm.Qwen25VL(config)
  n = settings.max_new_tokens
  t = state.prompt_mask.shape[1]
  tc, dtype = config.text, jnp.dtype(config.dtype)
  layer_params = params["decoder"]["layers"]
  if not one_layer_at_a_time:
    layer_params = text.split_layers(layer_params, tc.num_hidden_layers)

  def cond(st: SamplerState):
    return (st.step < n) & ~jnp.all(st.done)

  def body(st: SamplerState):
    last = jax.lax.dynamic_slice_in_dim(st.tokens, st.step - 1, 1, axis=1)  # [R, 1]
    index = t + st.step - 1  # cache slot of `last`
    slots = jnp.arange(t + n)
    keys = jnp.concatenate([st.prompt_mask, jnp.zeros((st.done.shape[0], n), bool)], axis=1)
    keys = keys | ((slots >= t) & (slots <= index))[None, :]
    positions = jnp.broadcast_to(st.next_position[None, :, None] + st.step - 1,
                                 (3, st.done.shape[0], 1))
    x, cos, sin = model.apply({"params": params}, last, positions,
                              method=vlm.Qwen25VL.decoder_inputs)
    hidden, cache = text.decode_layers(tc, dtype, layer_params,
                                       params["decoder"]["final_norm"], x, cos, sin,
                                       keys[:, None, :], index, st.cache,
                                       one_layer_at_a_time=one_layer_at_a_time,
                                       attention_impl=config.attention_impl)
    cache = sharding.constrain(cache, LAYER_CACHE_AXES)
    head = params
    if one_layer_at_a_time:  # the LM head's weights, too, read after its input, in the loop
      zero = text.unfoldable_zero(hidden)
      head = {k: jax.tree.map(lambda w: jnp.where(zero > 0, 0, w), v) if k in HEAD else v
              for k, v in params.items()}
    logits = model.apply({"params": head}, hidden[:, 0], method=vlm.Qwen25VL.logits)
    rng, key = jax.random.split(st.rng)
    token, logp = _choose(logits, allowed, key, settings)
    tokens, logps, done = _record(st.tokens, st.logps, st.step, token, logp, st.done, settings)
    return st.replace(step=st.step + 1, tokens=tokens, logps=logps, done=done, cache=cache,
                      rng=rng)

  return jax.lax.while_loop(cond, sharding.traced_under(body, sharding.DECODE_RULES), state)


def weights_split_over_batch(params) -> bool:
  """Whether the decoder layers' weights are sharded over a batch axis of the mesh (fsdp or
  data): the decode then takes them one layer at a time. params: arrays or
  ShapeDtypeStructs with NamedShardings."""
  for leaf in jax.tree.leaves(params["decoder"]["layers"]):
    sh = getattr(leaf, "sharding", None)
    if not isinstance(sh, jax.sharding.NamedSharding):
      continue
    if any(a in ("data", "fsdp") and sh.mesh.shape[a] > 1
           for axes in sh.spec for a in sharding.spec_axes(axes)):
      return True
  return False


def completion_mask(tokens, settings: SamplerSettings):
  """int32[R, N]: 1 on generated tokens up to and including the first stop token."""
  is_stop = jnp.isin(tokens, jnp.asarray(settings.stop_ids, jnp.int32))
  stopped_before = jnp.cumsum(is_stop, axis=1) - is_stop
  return (stopped_before == 0).astype(jnp.int32)


# Jitted once per (config, settings): every Sampler with the same settings shares them.
jit_prefill = jax.jit(prefill, static_argnames=("config", "settings"), static_argnums=0)
jit_decode = jax.jit(decode, static_argnames=("config", "settings", "one_layer_at_a_time"),
                     static_argnums=0, donate_argnums=2)


class Sampler:
  """Jitted prefill + decode for one model config and settings; params are arguments.

  `sample(params, batch, rng)` -> dict(tokens int32[R, N], mask int32[R, N],
  logps float32[R, N]) with R = B * samples_per_prompt, rows grouped by prompt.
  """

  def __init__(self, config: ModelConfig, settings: SamplerSettings, allowed):
    self.config, self.settings = config, settings
    self.allowed = jnp.asarray(allowed, bool)

  def sample(self, params, batch: dict, rng) -> dict:
    state = jit_prefill(self.config, params, batch["input_ids"], batch["attention_mask"],
                         batch.get("pixel_values"), batch.get("image_grid_thw"), rng,
                         self.allowed, settings=self.settings)
    state = jit_decode(self.config, params, state, self.allowed, settings=self.settings,
                       one_layer_at_a_time=weights_split_over_batch(params))
    mask = completion_mask(state.tokens, self.settings)
    return {"tokens": state.tokens, "mask": mask, "logps": state.logps * mask}


def allowed_ids(tokenizer, config: ModelConfig):
  """bool[V]: the ids a sampler may emit: tokens the tokenizer owns, minus the vision
  placeholders (image/video pads, vision start/end)."""
  allowed = functional_tokens.owned_ids_mask(tokenizer, config.text.vocab_size)
  for tid in (config.image_token_id, config.video_token_id, config.vision_start_token_id,
              config.vision_end_token_id):
    allowed[tid] = False
  return allowed


def make_sampler(config: ModelConfig, tokenizer, settings: SamplerSettings) -> Sampler:
  """A Sampler for `tokenizer`'s vocabulary: it stops at <|im_end|> or EOS and pads with
  the tokenizer's pad id (unless `settings` names its own stop ids)."""
  if not settings.stop_ids:
    stop = tuple(sorted({tokenizer.convert_tokens_to_ids("<|im_end|>"),
                         tokenizer.eos_token_id}))
    settings = dataclasses.replace(settings, stop_ids=stop, pad_id=tokenizer.pad_token_id)
  return Sampler(config, settings, allowed_ids(tokenizer, config))


def decode_completions(tokenizer, tokens, mask) -> list[str]:
  """Completion texts of int32[R, N] tokens (numpy, this process's rows) where mask is 1;
  special tokens (e.g. <|im_end|>) dropped, functional tokens kept."""
  return [tokenizer.decode(row[m == 1].tolist(), skip_special_tokens=True)
          for row, m in zip(tokens, mask)]
