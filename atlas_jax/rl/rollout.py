"""From a batch of prompts to a scored rollout batch ready for the LA-GRPO update.

`sample_and_score` draws one prompt batch, samples G completions per prompt and scores them
into one `Rollouts` value; under DAPO's dynamic sampling `dynamic_sampling` calls it until
enough informative groups are in hand (`fill_groups`) and returns one `Rollouts` of the same
shape. Only completion ids cross to the host (for decoding and rewards), and each process
takes only its own rows (`multihost.local_rows`): a multi-host run never reads arrays
another host holds. Everything else stays on device, except under dynamic sampling, where
the kept groups' prompt and rollout rows are gathered on the host and sent back.
Letters as in `update.py`: B prompts, G group size, R = B * G rollouts (r: this process's
share), T prompt length, N new tokens.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from atlas_jax import multihost, sharding
from atlas_jax.functional_tokens import TASK_TOKENS
from atlas_jax.rl import rewards as rewards_lib
from atlas_jax.sampler import decode_completions

_PROMPT_FIELDS = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")


@dataclasses.dataclass(frozen=True)
class Rollouts:
  """One step's rollouts, sampled and scored: R = B * G of them, r this process's share.

  On device (global arrays, sharded over the batch axes):
    prompts: input_ids, attention_mask int32[B, T]; pixel_values, image_grid_thw with images.
    completions: the sampler's tokens, mask int32[R, N] and logps float32[R, N], G rows per
      prompt (prompt-major).
  On the host, this process's rows:
    prompt_rows: the pipeline's prompt batch, strings included (under dynamic sampling,
      the kept prompts' `prompts` fields).
    reward: float32[r], the total (overlong penalty included); reward_parts:
      {name: float32[r]}, every reward function, and overlong_penalty when on.
    texts: the r decoded completions; lengths: int[r], their token counts.
  Of the whole step: sampled_tokens and sampling_seconds (this process's, every draw,
  dropped groups included) and dynamic_sampling_stats (DAPO's, global means; empty when
  off).
  """

  prompts: dict
  completions: dict
  prompt_rows: dict
  reward: np.ndarray
  reward_parts: dict
  texts: list
  lengths: np.ndarray
  sampled_tokens: int
  sampling_seconds: float
  dynamic_sampling_stats: dict = dataclasses.field(default_factory=dict)


def sample_and_score(run, rl, sampler, iterator, params, key) -> Rollouts:
  """The next prompt batch of `iterator`, with G = rl.group_size completions per prompt
  sampled by `sampler` (its settings: `SamplerSettings.from_rl(rl)`) from `params`, decoded
  and scored by rl.reward; rl.overlong_buffer > 0 adds DAPO's overlong penalty. `run`
  gives the mesh and the tokenizer."""
  t0 = time.perf_counter()
  prompt_rows = next(iterator)
  prompts = multihost.host_batch_to_device(prompt_rows, run.mesh)
  with sharding.with_rules(run.mesh, sharding.RULES):
    completions = sampler.sample(params, prompts, key)
  tokens, mask = (multihost.local_rows(completions[k]) for k in ("tokens", "mask"))
  seconds = time.perf_counter() - t0
  texts = decode_completions(run.tokenizer, tokens, mask)
  lengths = mask.sum(1)
  total, parts = rewards_lib.compute_rewards(texts, host_samples(prompt_rows, rl.group_size),
                                             rl.reward, num_tokens=lengths.tolist())
  if rl.overlong_buffer:
    parts["overlong_penalty"] = rewards_lib.overlong_penalty(
        lengths, rl.max_new_tokens, rl.overlong_buffer, rl.overlong_penalty)
    total = total + parts["overlong_penalty"]
  return Rollouts(prompts=prompts, completions=completions, prompt_rows=prompt_rows,
                  reward=total, reward_parts=parts, texts=texts, lengths=lengths,
                  sampled_tokens=int(lengths.sum()), sampling_seconds=seconds)


def dynamic_sampling(draw, *, groups_needed: int, group_size: int, max_draws: int, mesh,
                     pad_id: int) -> Rollouts:
  """DAPO's dynamic sampling over `draw(i) -> Rollouts` (`fill_groups` on this process's
  rows): the kept groups as one Rollouts, back on device, with every draw's tokens and
  seconds added up and the stats (draws, informative_fraction, filled_groups) averaged
  over processes. groups_needed: this process's prompts per step."""
  drawn = []

  def rows(i):
    r = draw(i)
    drawn.append(r)
    host = {k: multihost.local_rows(v) for k, v in r.completions.items()}
    host.update(reward=r.reward, reward_parts=r.reward_parts, lengths=r.lengths,
                texts=np.asarray(r.texts, object))
    return {k: v for k, v in r.prompt_rows.items() if k in _PROMPT_FIELDS}, host

  prompt_rows, host, stats = fill_groups(rows, groups_needed=groups_needed,
                                         group_size=group_size, max_draws=max_draws,
                                         pad_values={"input_ids": pad_id})
  to_device = lambda d: {k: multihost.to_global_rows(v, mesh) for k, v in d.items()}
  return Rollouts(
      prompts=to_device(prompt_rows),
      completions=to_device({k: host[k] for k in ("tokens", "mask", "logps")}),
      prompt_rows=prompt_rows, reward=host["reward"],
      reward_parts={k: host["reward_parts"][k] for k in drawn[0].reward_parts},
      texts=list(host["texts"]), lengths=host["lengths"],
      sampled_tokens=sum(r.sampled_tokens for r in drawn),
      sampling_seconds=sum(r.sampling_seconds for r in drawn),
      dynamic_sampling_stats={k: multihost.global_mean(v) for k, v in stats.items()})


def metrics(rollouts: Rollouts, functional_tokens) -> dict:
  """The rollouts' logged figures, means over every process's rows: reward, reward_<part>,
  functional_per_completion, completion_length, rollout_tokens_per_s and, under dynamic
  sampling, dynamic_sampling_<stat>. A collective: every process calls it."""
  return dict(
      reward=multihost.global_mean(rollouts.reward),
      **{f"reward_{k}": multihost.global_mean(v) for k, v in rollouts.reward_parts.items()},
      functional_per_completion=multihost.global_mean(
          functional_counts(rollouts.texts, functional_tokens)),
      completion_length=multihost.global_mean(rollouts.lengths),
      rollout_tokens_per_s=multihost.global_mean(rollouts.sampled_tokens)
      * jax.process_count() / max(rollouts.sampling_seconds, 1e-9),
      **{f"dynamic_sampling_{k}": v for k, v in rollouts.dynamic_sampling_stats.items()})


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
  return (jax.tree.map(lambda v: v[groups], prompt_rows),
          jax.tree.map(lambda v: v[rows], rollout_rows))


def _concat(parts: list[dict], pad_values: dict) -> dict:
  """Row-concatenation of dicts (nested dicts too) of host arrays; arrays whose last axis
  differs (left-padded prompts of different length buckets) are left-padded to the
  longest with pad_values[name] (default 0)."""
  def concat(path, *xs):
    if xs[0].ndim > 1 and len({x.shape[-1] for x in xs}) > 1:
      t = max(x.shape[-1] for x in xs)
      xs = [np.pad(x, [(0, 0)] * (x.ndim - 1) + [(t - x.shape[-1], 0)],
                   constant_values=pad_values.get(path[-1].key, 0)) for x in xs]
    return np.concatenate(xs)
  return jax.tree_util.tree_map_with_path(concat, *parts)


def fill_groups(draw, *, groups_needed: int, group_size: int, max_draws: int,
                pad_values: dict | None = None):
  """DAPO's dynamic sampling on this process's rows: draws prompt batches until
  `groups_needed` informative groups (`informative_groups`) are in hand, at most
  `max_draws` batches; every process draws as often as the slowest needs (the sampler is
  collective). Short after the cap, the batch is filled with dropped (all-equal, zero-
  advantage) groups and the count is reported (verl raises instead).

  Args:
    draw: `draw(i) -> (prompt_rows, rollout_rows)`: dicts of host arrays, prompt_rows
      [B, ...] per prompt (left-padded along the last axis where 2-D), rollout_rows
      [B * G, ...] per rollout (prompt-major; nested dicts allowed), including "reward"
      float32[B * G].
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
  prompts = jax.tree.map(lambda v: v[:groups_needed], prompts)
  rollouts = jax.tree.map(lambda v: v[:groups_needed * group_size], rollouts)
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


@functools.partial(jax.jit, static_argnames="parts")
def assemble_grouped(prompts: dict, rollout: dict, advantages, *, parts: int = 1) -> dict:
  """The rollout batch in the grouped form (`run.shared_prefix`): each prompt and its
  images once (prompt_ids, prompt_mask [B, T]), its G completions after it
  (completion_ids, completion_mask [R, N]); sampler_logp float32[R, N] in the completion
  layout. Nothing is repeated.

  parts > 1 (rl.shared_prefix_parts, dividing G): each group split into `parts` groups of
  G / parts completions, each with its own copy of the prompt (B * parts prompts; the
  completions keep their order): micro-batches of whole groups are then `parts` times
  smaller, the prompt computed `parts` times. The same loss and gradient."""
  batch = {
      "prompt_ids": prompts["input_ids"],
      "prompt_mask": prompts["attention_mask"],
      "completion_ids": rollout["tokens"],
      "completion_mask": rollout["mask"],
      "sampler_logp": rollout["logps"].astype(jnp.float32),
      "advantages": advantages.astype(jnp.float32),
  }
  for k in ("pixel_values", "image_grid_thw"):
    if k in prompts:
      batch[k] = prompts[k]
  return split_groups(batch, parts)


PROMPT_FIELDS = ("prompt_ids", "prompt_mask", "pixel_values", "image_grid_thw")


def split_groups(batch: dict, parts: int) -> dict:
  """A grouped batch with each group as `parts` groups (rl.shared_prefix_parts): the
  per-prompt fields (PROMPT_FIELDS) repeated `parts` times, prompt-major; the per-completion
  ones (the completions, their per-token arrays, advantages) unchanged, as the completions
  keep their order. parts 1: the batch itself."""
  return batch if parts == 1 else _repeat_prompts(batch, parts)


@functools.partial(jax.jit, static_argnames="parts")
def _repeat_prompts(batch: dict, parts: int) -> dict:
  return {k: jnp.repeat(v, parts, axis=0) if k in PROMPT_FIELDS else v
          for k, v in batch.items()}


def functional_counts(texts: list[str], tokens) -> np.ndarray:
  """float32[R]: functional tokens used per completion."""
  return np.array([sum(t.count(tok) for tok in tokens) for t in texts], np.float32)
