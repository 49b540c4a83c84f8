"""Per-token log-probs of a batch under the model, in the *prediction layout* both losses
use: entry j of a float[B, T] (or [R, L]) array belongs to the token at j + 1, the one
predicted from position j; the last entry predicts nothing.

Letters: B rows, T length, C sequence chunk, D width, V vocab; N completion length.

  model_hidden         the final hidden states float[B, T, D]
  chunked_token_stats  log-prob, entropy and argmax of given targets, never all [B, T, V]
  targets              int32[B, T]: the token each position predicts
  shifted_mask         a per-token mask moved into the prediction layout
  token_logps          log-probs and entropies of a rollout batch's completions
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from atlas_jax.model import rope, vlm
from atlas_jax.model.config import ModelConfig


def targets(batch: dict):
  """int32[B, T]: the token each position predicts (input_ids[j + 1]; 0 at the end)."""
  return shifted_mask(batch["input_ids"])


def shifted_mask(m):
  """m[:, j + 1] at j (0 at the last position): a per-token [B, T] array (a loss or
  completion mask, the ids) in the prediction layout."""
  return jnp.concatenate([m[:, 1:], jnp.zeros_like(m[:, :1])], axis=1)


def model_hidden(config: ModelConfig, params, batch):
  """Final hidden states float[B, T, D] of a batch."""
  model = vlm.Qwen25VL(config)
  hidden, _ = model.apply(
      {"params": params}, batch["input_ids"], jnp.transpose(batch["position_ids"], (1, 0, 2)),
      vlm.text_mask(batch["attention_mask"]), batch.get("pixel_values"),
      batch.get("image_grid_thw"), method=vlm.Qwen25VL.hidden_states)
  return hidden


def chunked_token_stats(config: ModelConfig, params, hidden, targets, chunk: int,
                        temperature: float = 1.0):
  """Per-token statistics of `targets` under the model, one sequence chunk at a time.

  Never materialises float[B, T, V] (unless chunk >= T): each chunk's logits are computed,
  reduced and dropped (and recomputed in the backward pass). A single chunk is not
  rematerialised: the backward pass needs its softmax either way.
  Returns float32[B, T] dicts: `logp` (log-prob of the target), `entropy`, and int32[B, T]
  `argmax`.
  """
  b, t, d = hidden.shape
  chunk = min(chunk, t)
  if t % chunk:
    raise ValueError(f"sequence length {t} is not a multiple of the log-prob chunk {chunk}")
  model = vlm.Qwen25VL(config)

  def stats(h, y):  # h [B, C, D], y [B, C]
    logits = model.apply({"params": params}, h, method=vlm.Qwen25VL.logits) / temperature
    logz = jax.nn.logsumexp(logits, axis=-1)
    logp_all = logits - logz[..., None]
    logp = jnp.take_along_axis(logp_all, y[..., None], axis=-1)[..., 0]
    entropy = -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1)
    return logp, entropy, jnp.argmax(logits, axis=-1).astype(jnp.int32)

  if chunk == t:  # one chunk: its logits are needed anyway; no recompute in the backward
    logp, entropy, argmax = stats(hidden, targets)
    return {"logp": logp, "entropy": entropy, "argmax": argmax}
  stats = jax.checkpoint(stats)
  hs = hidden.reshape(b, t // chunk, chunk, d).swapaxes(0, 1)
  ys = targets.reshape(b, t // chunk, chunk).swapaxes(0, 1)
  logp, entropy, argmax = jax.lax.map(lambda a: stats(*a), (hs, ys))
  unchunk = lambda x: x.swapaxes(0, 1).reshape(b, t)
  return {"logp": unchunk(logp), "entropy": unchunk(entropy), "argmax": unchunk(argmax)}


def with_positions(config: ModelConfig, batch: dict) -> dict:
  """Adds M-RoPE position_ids int32[R, 3, L] (computed in-graph) if absent."""
  if "position_ids" in batch:
    return batch
  grid = batch.get("image_grid_thw")
  pos, _ = rope.get_rope_index(
      batch["input_ids"], batch["attention_mask"], None if grid is None else grid.reshape(-1, 3),
      image_token_id=config.image_token_id,
      spatial_merge_size=config.vision.spatial_merge_size, xp=jnp)
  return dict(batch, position_ids=jnp.transpose(pos, (1, 0, 2)))


def token_logps(config: ModelConfig, params, batch: dict, *, chunk: int,
                temperature: float = 1.0, completion_length: int | None = None):
  """Trainer log-probs and entropies float32[R, L] (prediction layout) of a rollout batch.

  completion_length (static): the rows end in a completion of this many tokens (the
  rollout layout: `rl.max_new_tokens`, `rollout.assemble`). The LM head and the softmax
  then run only on the N positions that predict them, j = L - N - 1 .. L - 2, and every
  other entry is 0; the prompt's positions predict nothing the loss reads (its
  completion_mask is 0). None: every position.
  """
  batch = with_positions(config, batch)
  hidden = model_hidden(config, params, batch)
  ids = targets(batch)
  length = hidden.shape[1]
  start = 0 if completion_length is None else length - completion_length - 1
  if start < 0:
    raise ValueError(f"completion_length {completion_length} leaves no prompt in rows of "
                     f"length {length}")
  stop = length if completion_length is None else length - 1
  stats = chunked_token_stats(config, params, hidden[:, start:stop], ids[:, start:stop], chunk,
                              temperature)
  place = lambda x: jnp.pad(x, ((0, 0), (start, length - stop)))
  return place(stats["logp"]), place(stats["entropy"])
