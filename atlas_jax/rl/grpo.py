"""GRPO and LA-GRPO losses on arrays (no model code): advantages, KL, aggregation, the
clipped surrogate, truncated importance sampling and the functional-token anchor.

Letters: B completions (prompts x G, each group consecutive), T positions (prediction
layout: entry t belongs to the token predicted at t), G group size. Everything is fp32 and
jittable; string and int arguments are static (close over them or mark them static).

LA-GRPO:  L = L_GRPO + alpha * (1/|M_func|) * sum_{t in M_func} l_t
where M_func are the functional-token positions of the batch's completions. Under plain
GRPO a sequence-level advantage spreads over hundreds of tokens and the few functional
ones get a tiny share of the gradient ("gradient dilution"); the anchor, averaged over
|M_func| positions only, gives them a direct update. l_t is `pg` (the advantage-weighted
clipped surrogate at t, TIS weight included) or `nll_pos` (-log pi(token) at t, only in
rollouts with positive advantage; |M_func| then counts only those positions).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")
KL_ESTIMATORS = ("k1", "k3")
ANCHORS = ("pg", "nll_pos")


def _is_zero(x) -> bool:
  """True for a concrete 0 (a Python or NumPy scalar); a traced weight is never 'zero'."""
  return not isinstance(x, jax.core.Tracer) and float(x) == 0.0


def _check_shape(name: str, x, shape):
  if x.shape != tuple(shape):
    raise ValueError(f"{name} has shape {x.shape}, expected {tuple(shape)}")


def group_advantages(rewards, group_size: int, *, scale_by_std: bool = True,
                     eps: float = 1e-6):
  """Group-relative advantages float32[B] of rewards float32[B] (groups: consecutive G).

  (r - group mean) / (group std + eps), std with ddof 0; without the std when
  `scale_by_std` is False (Dr. GRPO). A group whose rewards are all equal gets exactly 0
  (its float mean may differ from the rewards by an ulp, which the std would amplify).
  """
  r = jnp.asarray(rewards, jnp.float32)
  if r.ndim != 1 or group_size < 1 or r.shape[0] % group_size:
    raise ValueError(f"rewards of shape {r.shape} do not split into groups of {group_size}")
  groups = r.reshape(-1, group_size)
  centred = groups - jnp.mean(groups, axis=1, keepdims=True)
  if scale_by_std:
    centred = centred / (jnp.std(groups, axis=1, keepdims=True) + eps)
  constant = jnp.max(groups, axis=1, keepdims=True) == jnp.min(groups, axis=1, keepdims=True)
  return jnp.where(constant, 0.0, centred).reshape(-1)


def kl_penalty(logp, ref_logp, estimator: str):
  """Per-token KL(pi || ref) estimate float32[B, T] from sampled-token log-probs [B, T].

  k1 = logp - ref_logp (unbiased, can be negative); k3 = exp(d) - d - 1 with
  d = ref_logp - logp (unbiased, >= 0, lower variance).
  """
  logp = jnp.asarray(logp, jnp.float32)
  ref_logp = jnp.asarray(ref_logp, jnp.float32)
  if estimator == "k1":
    return logp - ref_logp
  if estimator == "k3":
    d = ref_logp - logp
    return jnp.exp(d) - d - 1.0
  raise ValueError(f"kl_estimator {estimator!r} is not one of {KL_ESTIMATORS}")


def aggregate(per_token, mask, mode: str, *, max_length: int | None = None):
  """Scalar float32[] from per-token values float32[B, T] over a float32[B, T] mask.

  token-mean: sum over valid tokens / their number in the batch. seq-mean-token-mean: mean
  over sequences (those with a valid token) of each one's token mean.
  seq-mean-token-sum-norm: mean over all B sequences of token sums / max_length (a
  constant, default T), as in Dr. GRPO. An empty mask gives 0.
  """
  mask = jnp.asarray(mask, jnp.float32)
  per_token = jnp.where(mask > 0, jnp.asarray(per_token, jnp.float32) * mask, 0.0)
  if mode == "token-mean":
    return jnp.sum(per_token) / jnp.maximum(jnp.sum(mask), 1.0)
  if mode == "seq-mean-token-mean":
    counts = jnp.sum(mask, axis=1)
    seq = jnp.sum(per_token, axis=1) / jnp.maximum(counts, 1.0)
    has = (counts > 0).astype(jnp.float32)
    return jnp.sum(seq * has) / jnp.maximum(jnp.sum(has), 1.0)
  if mode == "seq-mean-token-sum-norm":
    norm = per_token.shape[1] if max_length is None else max_length
    return jnp.mean(jnp.sum(per_token, axis=1) / norm)
  raise ValueError(f"loss aggregation {mode!r} is not one of {AGGREGATIONS}")


def grpo_loss(logp, old_logp, advantages, mask, *, clip_low: float = 0.2,
              clip_high: float = 0.28, loss_agg: str = "token-mean", beta: float = 0.0,
              ref_logp=None, kl_estimator: str = "k3", sampler_logp=None, tis_cap=None,
              functional_mask=None, alpha: float = 0.0, anchor: str = "pg"):
  """GRPO (alpha = 0) or LA-GRPO loss and metrics.

  Args:
    logp: float32[B, T] log-probs of the taken tokens under the current params.
    old_logp: float32[B, T] the same under the params before this batch's inner updates.
    advantages: float32[B], one per completion. mask: float32[B, T], 1 on completion tokens.
    clip_low, clip_high: the ratio is clipped to [1 - clip_low, 1 + clip_high].
    loss_agg: one of AGGREGATIONS, for the surrogate and the KL term.
    beta, ref_logp float32[B, T], kl_estimator: KL to a frozen reference, added as
      beta * aggregate(kl); beta 0 needs no reference.
    sampler_logp float32[B, T], tis_cap: truncated importance sampling of the
      sampler/trainer mismatch: each token's surrogate is weighted by
      min(exp(old_logp - sampler_logp), tis_cap), without gradient. Off unless both given.
    functional_mask: float32[B, T], 1 at functional-token positions (M_func); alpha its
      anchor's weight (a nonzero alpha needs it). anchor: one of ANCHORS.
  Returns:
    (loss float32[], metrics dict of float32[]: pg_loss, anchor_loss, functional_positions,
    ratio_mean, clip_fraction, clip_low_fraction, clip_high_fraction, and kl when ref_logp
    is given, tis_weight_mean when TIS is on).
  """
  choices = {"anchor": (anchor, ANCHORS), "loss aggregation": (loss_agg, AGGREGATIONS),
             "kl_estimator": (kl_estimator, KL_ESTIMATORS)}
  for what, (value, allowed) in choices.items():
    if value not in allowed:
      raise ValueError(f"{what} {value!r} is not one of {allowed}")
  logp = jnp.asarray(logp, jnp.float32)
  shape = logp.shape
  old_logp = jnp.asarray(old_logp, jnp.float32)
  mask = jnp.asarray(mask, jnp.float32)
  advantages = jnp.asarray(advantages, jnp.float32)
  _check_shape("old_logp", old_logp, shape)
  _check_shape("mask", mask, shape)
  _check_shape("advantages", advantages, shape[:1])
  adv = advantages[:, None]
  # Masked positions may hold garbage log-probs: differences there are zeroed before any
  # exp, so neither the loss nor its gradient can meet inf * 0.
  valid = mask > 0
  ratio = jnp.exp(jnp.where(valid, logp - old_logp, 0.0))
  clipped_ratio = jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
  surrogate = -jnp.minimum(ratio * adv, clipped_ratio * adv)
  metrics = {}
  if tis_cap is not None:
    if sampler_logp is None:
      raise ValueError(f"tis_cap {tis_cap} needs sampler_logp (the sampler's log-probs)")
    sampler_logp = jnp.asarray(sampler_logp, jnp.float32)
    _check_shape("sampler_logp", sampler_logp, shape)
    log_weight = jnp.where(valid, old_logp - sampler_logp, 0.0)
    weight = jax.lax.stop_gradient(jnp.minimum(jnp.exp(log_weight), tis_cap))
    surrogate = surrogate * weight
    metrics["tis_weight_mean"] = aggregate(weight, mask, "token-mean")
  pg_loss = aggregate(surrogate, mask, loss_agg)
  loss = pg_loss

  if ref_logp is not None:
    ref_logp = jnp.asarray(ref_logp, jnp.float32)
    _check_shape("ref_logp", ref_logp, shape)
    kl = kl_penalty(logp, jnp.where(valid, ref_logp, logp), kl_estimator)
    metrics["kl"] = aggregate(kl, mask, "token-mean")
    if not _is_zero(beta):
      loss = loss + beta * aggregate(kl, mask, loss_agg)
  elif not _is_zero(beta):
    raise ValueError(f"beta {beta} needs ref_logp (the frozen reference's log-probs)")

  anchor_loss = jnp.zeros((), jnp.float32)
  n_func = jnp.zeros((), jnp.float32)
  if functional_mask is not None:
    fmask = jnp.asarray(functional_mask, jnp.float32)
    _check_shape("functional_mask", fmask, shape)
    fmask = fmask * mask
    if anchor == "pg":
      per_token = surrogate
    else:
      fmask = fmask * (adv > 0).astype(jnp.float32)
      per_token = -logp
    n_func = jnp.sum(fmask)
    anchor_loss = jnp.sum(jnp.where(fmask > 0, per_token * fmask, 0.0)) / jnp.maximum(n_func, 1.0)
    if not _is_zero(alpha):
      loss = loss + alpha * anchor_loss
  elif not _is_zero(alpha):
    raise ValueError(f"alpha {alpha} needs functional_mask (the functional-token positions)")

  # Clipping is active where the clipped term wins the min, i.e. its gradient is cut.
  low = (ratio < 1.0 - clip_low) & (adv < 0)
  high = (ratio > 1.0 + clip_high) & (adv > 0)
  metrics.update(
      pg_loss=pg_loss, anchor_loss=anchor_loss, functional_positions=n_func,
      ratio_mean=aggregate(ratio, mask, "token-mean"),
      clip_fraction=aggregate((low | high).astype(jnp.float32), mask, "token-mean"),
      clip_low_fraction=aggregate(low.astype(jnp.float32), mask, "token-mean"),
      clip_high_fraction=aggregate(high.astype(jnp.float32), mask, "token-mean"))
  return loss, metrics
