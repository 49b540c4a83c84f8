"""Trainer log-probs of a rollout batch in the grouped form: each prompt (its images, its
tokens) once, its G completions after it, so the vision tower and the prompt's layers run
once per prompt instead of G times (`vlm.shared_prefix_hidden`).

Letters: B prompts, G completions per prompt, R = B * G, T prompt length, N completion
length, D width.

A grouped batch holds prompt_ids, prompt_mask int32[B, T] (left-padded), optional
pixel_values float32[B, P, C] / image_grid_thw int32[B, I, 3], and completion_ids,
completion_mask int32[R, N] (prompt-major: row r continues prompt r // G). Per-token
arrays are in the *completion layout*: entry i of a float32[R, N] array belongs to
completion token i (the unshared prediction layout's entry T - 1 + i).

  is_grouped       whether a batch is in this form
  positions        M-RoPE ids of the prompts and of the completions (continuing them)
  token_logps      log-probs and entropies float32[R, N] of the completions
"""

from __future__ import annotations

import jax.numpy as jnp

from atlas_jax.model import rope, vlm
from atlas_jax.model.config import ModelConfig
from atlas_jax.run import logprobs


def is_grouped(batch: dict) -> bool:
  """True for a grouped rollout batch (prompts once: `prompt_ids`)."""
  return "prompt_ids" in batch


def positions(config: ModelConfig, batch: dict):
  """(prompt positions int32[3, B, T], completion positions int32[3, R, N]): the M-RoPE ids
  the unshared rows [prompt; completion] get from `rope.get_rope_index`. A completion's
  real tokens continue from its prompt's next position (its real-token count plus
  rope_deltas, as the sampler's decode); padding tokens get 0."""
  grid = batch.get("image_grid_thw")
  prompt_mask = batch["prompt_mask"]
  prompt_pos, deltas = rope.get_rope_index(
      batch["prompt_ids"], prompt_mask, None if grid is None else grid.reshape(-1, 3),
      image_token_id=config.image_token_id,
      spatial_merge_size=config.vision.spatial_merge_size, xp=jnp)
  mask = batch["completion_mask"].astype(jnp.int32)
  g = mask.shape[0] // prompt_mask.shape[0]
  start = jnp.repeat(jnp.sum(prompt_mask, axis=1).astype(jnp.int32) + deltas, g)
  pos = jnp.where(mask > 0, start[:, None] + jnp.cumsum(mask, axis=1) - mask, 0)
  return prompt_pos, jnp.broadcast_to(pos[None], (3,) + pos.shape).astype(jnp.int32)


def hidden(config: ModelConfig, params, batch: dict):
  """float[R, N, D]: the hidden state each completion token is predicted from: the
  prompt's last (shared by its G completions) for token 0, completion token i - 1's
  for token i."""
  prompt_pos, completion_pos = positions(config, batch)
  hp, hc = vlm.shared_prefix_hidden(
      config, params, batch["prompt_ids"], prompt_pos, batch["prompt_mask"],
      batch.get("pixel_values"), batch.get("image_grid_thw"), batch["completion_ids"],
      completion_pos, batch["completion_mask"])
  g = hc.shape[0] // hp.shape[0]
  return jnp.concatenate([jnp.repeat(hp[:, -1:], g, axis=0), hc[:, :-1]], axis=1)


def token_logps(config: ModelConfig, params, batch: dict, *, chunk: int,
                temperature: float = 1.0):
  """Trainer log-probs and entropies float32[R, N] (completion layout) of a grouped
  rollout batch: `logprobs.token_logps` with completion_length N on the unshared rows,
  computed with each prompt once. chunk: the LM head's sequence chunk (dividing N)."""
  stats = logprobs.chunked_token_stats(config, params, hidden(config, params, batch),
                                       batch["completion_ids"], chunk, temperature)
  return stats["logp"], stats["entropy"]
