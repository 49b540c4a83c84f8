"""From a batch of prompts to a scored rollout batch ready for the LA-GRPO update.

Only completion ids cross to the host (for decoding and rewards), and each process takes
only its own rows (`local_rows`): a multi-host run never reads arrays another host holds.
Everything else stays on device. Letters as in `update.py`: R = B * G rollouts, T prompt length, N new tokens.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from atlas_jax.rl import rewards as rewards_lib


def local_rows(x: jax.Array) -> np.ndarray:
  """This process's rows of a batch-sharded global array, in global row order: the rows of
  the prompts this process fed in (all rows in a single-process run)."""
  if x.is_fully_addressable:
    return np.asarray(jax.device_get(x))
  shards = {}
  for shard in x.addressable_shards:  # replicas (tensor axis) share a start row
    shards.setdefault(shard.index[0].start or 0, shard.data)
  return np.concatenate([np.asarray(shards[k]) for k in sorted(shards)])


def to_global_rows(local: np.ndarray, mesh) -> jax.Array:
  """Inverse of `local_rows`: each process's rows into one batch-sharded global array."""
  from atlas_jax import sharding
  return jax.make_array_from_process_local_data(sharding.batch_sharding(mesh, local.ndim),
                                                local)


def global_mean(x) -> float:
  """Mean over every process's values (a host-side scalar for logging)."""
  x = np.asarray(x, np.float64).reshape(-1)
  sums = np.array([x.sum(), x.size])
  if jax.process_count() > 1:  # every process calls this, in the same order
    from jax.experimental import multihost_utils
    sums = multihost_utils.process_allgather(sums).sum(0)
  return float(sums[0] / sums[1]) if sums[1] else float("nan")


def decode_completions(tokenizer, tokens: np.ndarray, mask: np.ndarray) -> list[str]:
  """Completion texts; special tokens (e.g. <|im_end|>) dropped, functional tokens kept."""
  return [tokenizer.decode(row[m == 1].tolist(), skip_special_tokens=True)
          for row, m in zip(tokens, mask)]


def host_samples(batch: dict, group_size: int) -> list[rewards_lib.Sample]:
  """The reward-side description of each rollout (prompt fields repeated G times)."""
  samples = []
  for i in range(len(batch["answer"])):
    task = batch["task"][i] or None
    choices = batch["choices"][i] if "choices" in batch else None
    sample = rewards_lib.Sample(
        answer=str(batch["answer"][i]),
        answer_type=(batch["answer_type"][i] or None) if "answer_type" in batch else None,
        choices=tuple(choices) if choices else None, task=task,
        expected_tokens=((rewards_lib.TASK_TOKENS[task],) if task in rewards_lib.TASK_TOKENS
                         else None))
    samples += [sample] * group_size
  return samples


@functools.partial(jax.jit, static_argnames="group_size")
def assemble(prompts: dict, rollout: dict, advantages, *, group_size: int) -> dict:
  """Prompt + completion rows in the update's layout (see update.py)."""
  rep = lambda x: jnp.repeat(x, group_size, axis=0)
  r, n = rollout["tokens"].shape
  t = prompts["input_ids"].shape[1]
  batch = {
      "input_ids": jnp.concatenate([rep(prompts["input_ids"]), rollout["tokens"]], axis=1),
      "attention_mask": jnp.concatenate([rep(prompts["attention_mask"]), rollout["mask"]],
                                        axis=1),
      "completion_mask": jnp.concatenate([jnp.zeros((r, t), jnp.int32), rollout["mask"]],
                                         axis=1),
      "sampler_logp": jnp.concatenate([jnp.zeros((r, t - 1), jnp.float32), rollout["logps"],
                                       jnp.zeros((r, 1), jnp.float32)], axis=1),
      "advantages": advantages.astype(jnp.float32),
  }
  for k in ("pixel_values", "image_grid_thw"):
    if k in prompts:
      batch[k] = rep(prompts[k])
  return batch


def functional_counts(texts: list[str], tokens) -> np.ndarray:
  """float32[R]: functional tokens used per completion."""
  return np.array([sum(t.count(tok) for tok in tokens) for t in texts], np.float32)
