"""From a batch of prompts to a scored rollout batch ready for the LA-GRPO update.

Only completion ids cross to the host (for decoding and rewards), and each process takes
only its own rows (`multihost.local_rows`): a multi-host run never reads arrays another host holds.
Everything else stays on device, except under DAPO's dynamic sampling (`fill_groups`),
where the kept groups' prompt and rollout rows are gathered on the host and sent back.
Letters as in `update.py`: R = B * G rollouts, T prompt length, N new tokens.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from atlas_jax import multihost
from atlas_jax.functional_tokens import TASK_TOKENS
from atlas_jax.rl import rewards as rewards_lib


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
        expected_tokens=((TASK_TOKENS[task],) if task in TASK_TOKENS
                         else None))
    samples += [sample] * group_size
  return samples


def informative_groups(rewards, group_size: int) -> np.ndarray:
  """bool[B]: the groups of rewards float32[B * G] whose rewards are not all equal (DAPO's
  dynamic-sampling filter, verl's `std > 0`); an all-equal group has zero advantages."""
  groups = np.asarray(rewards).reshape(-1, group_size)
  return groups.max(axis=1) != groups.min(axis=1)


def _take_groups(prompt_rows: dict, rollout_rows: dict, groups, group_size: int):
  rows = (np.asarray(groups)[:, None] * group_size + np.arange(group_size)).reshape(-1)
  return ({k: v[groups] for k, v in prompt_rows.items()},
          {k: v[rows] for k, v in rollout_rows.items()})


def _concat(parts: list[dict], pad_values: dict) -> dict:
  """Row-concatenation; arrays whose last axis differs (left-padded prompts of different
  length buckets) are left-padded to the longest with pad_values[name] (default 0)."""
  out = {}
  for k in parts[0]:
    xs = [p[k] for p in parts]
    if xs[0].ndim > 1 and len({x.shape[-1] for x in xs}) > 1:
      t = max(x.shape[-1] for x in xs)
      xs = [np.pad(x, [(0, 0)] * (x.ndim - 1) + [(t - x.shape[-1], 0)],
                   constant_values=pad_values.get(k, 0)) for x in xs]
    out[k] = np.concatenate(xs)
  return out


def fill_groups(draw, *, groups_needed: int, group_size: int, max_draws: int,
                pad_values: dict | None = None):
  """DAPO's dynamic sampling on this process's rows: draws prompt batches until
  `groups_needed` informative groups (`informative_groups`) are in hand, at most
  `max_draws` batches; every process draws as often as the slowest needs (the sampler is
  collective). Short after the cap, the batch is filled with dropped (all-equal, zero-
  advantage) groups and the count is reported (verl raises instead).

  Args:
    draw: `draw(i) -> (prompt_rows, rollout_rows)`: host arrays, prompt_rows [B, ...] per
      prompt (left-padded along the last axis where 2-D), rollout_rows [B * G, ...] per
      rollout (prompt-major), including "reward" float32[B * G].
    pad_values: the left-padding value per prompt field (e.g. {"input_ids": pad_id}).
  Returns:
    (prompt_rows [groups_needed, ...], rollout_rows [groups_needed * G, ...], stats dict:
    draws, informative_fraction of the drawn groups, filled_groups).
  """
  kept, dropped = [], []  # (prompt_rows, rollout_rows) pieces, at most groups_needed each
  n_kept = n_dropped = informative = drawn = draws = 0
  while True:
    prompt_rows, rollout_rows = draw(draws)
    draws += 1
    keep = informative_groups(rollout_rows["reward"], group_size)
    drawn += keep.size
    informative += int(keep.sum())
    for flag, pieces, have in ((keep, kept, n_kept), (~keep, dropped, n_dropped)):
      idx = np.flatnonzero(flag)[:max(groups_needed - have, 0)]
      if idx.size:
        pieces.append(_take_groups(prompt_rows, rollout_rows, idx, group_size))
    n_kept = sum(len(p["reward"]) for _, p in kept) // group_size
    n_dropped = sum(len(p["reward"]) for _, p in dropped) // group_size
    if multihost.all_processes(n_kept >= groups_needed) or draws >= max_draws:
      break
  if n_kept + n_dropped < groups_needed:
    raise ValueError(f"{draws} draws gave {n_kept + n_dropped} groups, fewer than the "
                     f"{groups_needed} a batch needs")
  pad_values = pad_values or {}
  parts = kept + dropped
  prompts = _concat([p for p, _ in parts], pad_values)
  rollouts = _concat([r for _, r in parts], pad_values)
  prompts = {k: v[:groups_needed] for k, v in prompts.items()}
  rollouts = {k: v[:groups_needed * group_size] for k, v in rollouts.items()}
  return prompts, rollouts, {"draws": draws, "filled_groups": max(groups_needed - n_kept, 0),
                             "informative_fraction": informative / max(drawn, 1)}


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
