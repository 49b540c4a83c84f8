"""The SFT loss: next-token cross-entropy on assistant tokens, with functional-token
metrics.

Letters: B batch, T length, V vocab. A batch is the data pipeline's device batch:
input_ids int32[B, T], attention_mask int32[B, T], loss_mask int32[B, T] (1 on tokens to be
predicted), position_ids int32[B, 3, T], and optionally pixel_values float32[B, P, 1176]
with image_grid_thw int32[B, I, 3].
"""

from __future__ import annotations

import jax.numpy as jnp

from atlas_jax.model.config import ModelConfig
from atlas_jax.run import logprobs


def sft_loss(config: ModelConfig, params, batch, functional_ids, chunk: int = 512):
  """Token-mean cross-entropy over assistant tokens, plus functional-token metrics.

  functional_ids: int32[F] ids of the functional tokens (may be empty).
  Returns (loss, metrics dict of float32 scalars).
  """
  hidden = logprobs.model_hidden(config, params, batch)
  targets = logprobs.targets(batch)
  mask = logprobs.shifted_mask(batch["loss_mask"]).astype(jnp.float32)
  stats = logprobs.chunked_token_stats(config, params, hidden, targets, chunk)
  n_tokens = jnp.sum(mask)
  loss = -jnp.sum(stats["logp"] * mask) / jnp.maximum(n_tokens, 1.0)
  is_func = jnp.isin(targets, functional_ids) & (mask > 0)
  n_func = jnp.sum(is_func)
  correct = stats["argmax"] == targets
  metrics = {
      "loss": loss,
      "tokens": n_tokens,
      "token_accuracy": jnp.sum(correct * mask) / jnp.maximum(n_tokens, 1.0),
      "functional_tokens": n_func.astype(jnp.float32),
      "functional_ce": -jnp.sum(jnp.where(is_func, stats["logp"], 0.0)) / jnp.maximum(n_func, 1),
      "functional_accuracy": jnp.sum(correct & is_func) / jnp.maximum(n_func, 1),
  }
  return loss, metrics
