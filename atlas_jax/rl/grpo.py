"""GRPO and LA-GRPO losses on arrays (no model code): advantages, KL, aggregation, the
clipped surrogate, truncated importance sampling and the functional-token anchor.

Letters: B completions (prompts x G, each group consecutive), T positions (prediction
layout: entry t belongs to the token predicted at t), G group size. Everything is fp32.

LA-GRPO:  L = L_GRPO + alpha * (1/|M_func|) * sum_{t in M_func} l_t
where M_func are the functional-token positions of the batch's completions. Under plain
GRPO a sequence-level advantage spreads over hundreds of tokens and the few functional
ones get a tiny share of the gradient; the anchor, averaged over |M_func| positions only,
gives them a direct update. l_t is `pg` (the advantage-weighted clipped surrogate at t) or
`nll_pos` (-log pi(token) at t, only in rollouts with positive advantage).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")
KL_ESTIMATORS = ("k1", "k3")
ANCHORS = ("pg", "nll_pos")


def group_advantages(rewards, group_size: int, *, scale_by_std: bool = True,
                     eps: float = 1e-6):
  """float32[B]: reward minus its group's mean (divided by the group's std if asked).
  A group whose rewards are all equal gets zeros."""
  r = jnp.asarray(rewards, jnp.float32)
  if r.shape[0] % group_size:
    raise ValueError(f"{r.shape[0]} rewards do not split into groups of {group_size}")
  groups = r.reshape(-1, group_size)
  centred = groups - jnp.mean(groups, axis=1, keepdims=True)
  if scale_by_std:
    centred = centred / (jnp.std(groups, axis=1, keepdims=True) + eps)
  return centred.reshape(-1)


def kl_penalty(logp, ref_logp, estimator: str):
  """Per-token KL(pi || ref) estimate float32[B, T] from sampled-token log-probs."""
  if estimator == "k1":
    return logp - ref_logp
  if estimator == "k3":
    d = ref_logp - logp
    return jnp.exp(d) - d - 1.0
  raise ValueError(f"kl_estimator {estimator!r} is not one of {KL_ESTIMATORS}")


def aggregate(per_token, mask, mode: str, *, max_length: int | None = None):
  """Scalar loss from float32[B, T] per-token values over a float32[B, T] mask.

  token-mean: sum / number of valid tokens in the batch. seq-mean-token-mean: mean over
  sequences (with any valid token) of each one's token mean. seq-mean-token-sum-norm: mean
  over sequences of token sums / max_length (default T), as in Dr. GRPO.
  """
  mask = mask.astype(jnp.float32)
  if mode == "token-mean":
    return jnp.sum(per_token * mask) / jnp.maximum(jnp.sum(mask), 1.0)
  if mode == "seq-mean-token-mean":
    counts = jnp.sum(mask, axis=1)
    seq = jnp.sum(per_token * mask, axis=1) / jnp.maximum(counts, 1.0)
    has = (counts > 0).astype(jnp.float32)
    return jnp.sum(seq * has) / jnp.maximum(jnp.sum(has), 1.0)
  if mode == "seq-mean-token-sum-norm":
    norm = per_token.shape[1] if max_length is None else max_length
    return jnp.mean(jnp.sum(per_token * mask, axis=1) / norm)
  raise ValueError(f"loss aggregation {mode!r} is not one of {AGGREGATIONS}")


def grpo_loss(logp, old_logp, advantages, mask, *, clip_low: float = 0.2,
              clip_high: float = 0.28, loss_agg: str = "token-mean", beta: float = 0.0,
              ref_logp=None, kl_estimator: str = "k3", sampler_logp=None, tis_cap=None,
              functional_mask=None, alpha: float = 0.0, anchor: str = "pg"):
  """GRPO (alpha = 0) or LA-GRPO loss and metrics.

  Args:
    logp: float32[B, T] log-probs of the taken tokens under the current params.
    old_logp: float32[B, T] the same under the params that produced the rollouts' update
      target (stored before the mu inner updates).
    advantages: float32[B]. mask: float32[B, T], 1 on completion tokens.
    beta, ref_logp, kl_estimator: KL to a frozen reference (beta 0 needs no reference).
    sampler_logp, tis_cap: truncated importance sampling of the sampler/trainer mismatch:
      each token's surrogate is weighted by min(exp(old - sampler), cap) (no gradient).
    functional_mask: float32[B, T], 1 at functional-token positions; alpha its weight.
    anchor: "pg" or "nll_pos".
  Returns:
    (loss float32[], metrics dict of float32 scalars).
  """
  if anchor not in ANCHORS:
    raise ValueError(f"anchor {anchor!r} is not one of {ANCHORS}")
  mask = mask.astype(jnp.float32)
  adv = advantages.astype(jnp.float32)[:, None]
  log_ratio = logp - old_logp
  ratio = jnp.exp(log_ratio)
  clipped_ratio = jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
  surrogate = -jnp.minimum(ratio * adv, clipped_ratio * adv)
  metrics = {}
  if sampler_logp is not None and tis_cap is not None:
    weight = jax.lax.stop_gradient(jnp.minimum(jnp.exp(old_logp - sampler_logp), tis_cap))
    surrogate = surrogate * weight
    metrics["tis_weight_mean"] = aggregate(weight, mask, "token-mean")
  pg_loss = aggregate(surrogate, mask, loss_agg)
  loss = pg_loss

  if ref_logp is not None:
    kl = kl_penalty(logp, ref_logp, kl_estimator)
    metrics["kl"] = aggregate(kl, mask, "token-mean")
    if beta > 0:
      loss = loss + beta * aggregate(kl, mask, loss_agg)
  elif beta > 0:
    raise ValueError("beta > 0 needs ref_logp (the frozen reference's log-probs)")

  anchor_loss = jnp.zeros((), jnp.float32)
  n_func = jnp.zeros((), jnp.float32)
  if functional_mask is not None:
    fmask = functional_mask.astype(jnp.float32) * mask
    if anchor == "pg":
      per_token = surrogate
    else:
      fmask = fmask * (adv > 0).astype(jnp.float32)
      per_token = -logp
    n_func = jnp.sum(fmask)
    anchor_loss = jnp.sum(per_token * fmask) / jnp.maximum(n_func, 1.0)
    if alpha != 0.0:
      loss = loss + alpha * anchor_loss

  low = (ratio < 1.0 - clip_low) & (adv < 0)
  high = (ratio > 1.0 + clip_high) & (adv > 0)
  metrics.update(
      pg_loss=pg_loss, anchor_loss=anchor_loss, functional_positions=n_func,
      ratio_mean=aggregate(ratio, mask, "token-mean"),
      clip_fraction=aggregate((low | high).astype(jnp.float32), mask, "token-mean"),
      clip_low_fraction=aggregate(low.astype(jnp.float32), mask, "token-mean"),
      clip_high_fraction=aggregate(high.astype(jnp.float32), mask, "token-mean"))
  return loss, metrics
