"""GRPO and LA-GRPO losses on arrays (no model code): advantages, KL, aggregation, the
clipped surrogate (dual-clip, token or sequence (GSPO) importance ratio), truncated
importance sampling and the functional-token anchor.

Names mean what the peers' names mean (each docstring names the peer): advantages divide
by the sample std as verl, TRL, OpenRLHF and EasyR1 do; the aggregation modes are verl's
`agg_loss` modes plus TRL's `dr_grpo`; the surrogate is verl's vanilla policy loss (dual-
clip c = 3, log-ratio clamped at 20) or its `gspo` loss.

Letters: B completions (prompts x G, each group consecutive), T positions (prediction
layout: entry t belongs to the token predicted at t), G group size. Everything is fp32 and
jittable; `grpo_loss` takes its settings as one frozen, hashable `LossSettings`.

LA-GRPO:  L = L_GRPO + alpha * (1/|M_func|) * sum_{t in M_func} l_t   (`anchor_loss`)
where M_func are the functional-token positions of the batch's completions. Under plain
GRPO a sequence-level advantage spreads over hundreds of tokens and the few functional
ones get a tiny share of the gradient ("gradient dilution"); the anchor, averaged over
|M_func| positions only, gives them a direct update. l_t is `pg` (the advantage-weighted
clipped surrogate at t, TIS weight included) or `nll_pos` (-log pi(token) at t, only in
rollouts with positive advantage; |M_func| then counts only those positions).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from atlas_jax.config import ADV_STDS, AGGREGATIONS, ANCHORS, IMPORTANCE_LEVELS, KL_ESTIMATORS


def _is_zero(x) -> bool:
  """True for a concrete 0 (a Python or NumPy scalar); a traced weight is never 'zero'."""
  return not isinstance(x, jax.core.Tracer) and float(x) == 0.0


def _check_shape(name: str, x, shape):
  if x.shape != tuple(shape):
    raise ValueError(f"{name} has shape {x.shape}, expected {tuple(shape)}")


@dataclasses.dataclass(frozen=True)
class LossSettings:
  """The settings of `grpo_loss`: frozen and hashable (a static jit argument, a step-cache
  key). `from_rl` takes them from a config's rl group, whose fields have the same names
  (max_length is rl.max_new_tokens); the defaults are the base config's values except
  alpha 0 (plain GRPO) and max_length None.

    clip_low, clip_high: the ratio is clipped to [1 - clip_low, 1 + clip_high].
    loss_agg: one of AGGREGATIONS (see `aggregate`), for the surrogate and the KL term;
      max_length its constant for seq-mean-token-sum-norm and dr_grpo (None: T).
    beta, kl_estimator: KL to a frozen reference, added as beta * aggregate(kl); beta 0
      needs no reference.
    tis_cap: truncated importance sampling of the sampler/trainer mismatch: each token's
      surrogate is weighted by min(exp(old_logp - sampler_logp), tis_cap), without
      gradient. 0 = off.
    alpha, anchor: the LA-GRPO anchor's weight (0 = plain GRPO) and its per-token term,
      one of ANCHORS (see `anchor_loss`).
    clip_ratio_c: dual-clip bound c > 1 (verl's default 3.0); 0 turns it off. Token level
      only.
    log_ratio_clamp: the log-ratio is clipped to +-this before exp (verl: 20); 0 = off.
    importance_level: "token" or "sequence" (GSPO), see `log_importance_ratio`.
  """

  clip_low: float = 0.2
  clip_high: float = 0.28
  loss_agg: str = "token-mean"
  beta: float = 0.0
  kl_estimator: str = "k3"
  tis_cap: float = 0.0
  alpha: float = 0.0
  anchor: str = "pg"
  clip_ratio_c: float = 3.0
  log_ratio_clamp: float = 20.0
  importance_level: str = "token"
  max_length: int | None = None

  def __post_init__(self):
    choices = {"anchor": (self.anchor, ANCHORS),
               "loss aggregation": (self.loss_agg, AGGREGATIONS),
               "kl_estimator": (self.kl_estimator, KL_ESTIMATORS),
               "importance_level": (self.importance_level, IMPORTANCE_LEVELS)}
    for what, (value, allowed) in choices.items():
      if value not in allowed:
        raise ValueError(f"{what} {value!r} is not one of {allowed}")
    if self.clip_ratio_c != 0 and self.clip_ratio_c <= 1:
      raise ValueError(f"clip_ratio_c {self.clip_ratio_c} must be > 1 (the dual-clip bound) "
                       "or 0 (off)")

  @classmethod
  def from_rl(cls, rl) -> LossSettings:
    """The settings of a config's rl group."""
    return cls(clip_low=rl.clip_low, clip_high=rl.clip_high, loss_agg=rl.loss_agg,
               beta=rl.beta, kl_estimator=rl.kl_estimator, tis_cap=rl.tis_cap,
               alpha=rl.alpha, anchor=rl.anchor, clip_ratio_c=rl.clip_ratio_c,
               log_ratio_clamp=rl.log_ratio_clamp, importance_level=rl.importance_level,
               max_length=rl.max_new_tokens)


def group_advantages(rewards, group_size: int, *, scale_by_std: bool = True,
                     std: str = "sample", eps: float = 1e-6):
  """Group-relative advantages float32[B] of rewards float32[B] (groups: consecutive G).

  (r - group mean) / (group std + eps). `std` "sample" (ddof 1, the default) is what verl
  (compute_grpo_outcome_advantage), TRL, OpenRLHF and EasyR1 divide by; "population"
  (ddof 0) is smaller by sqrt((G - 1) / G). Without the std when `scale_by_std` is False
  (Dr. GRPO; verl's norm_adv_by_std_in_grpo=False). A group whose rewards are all equal
  gets exactly 0 (its float mean may differ from the rewards by an ulp, which the std
  would amplify).
  """
  if std not in ADV_STDS:
    raise ValueError(f"advantage std {std!r} is not one of {ADV_STDS}")
  r = jnp.asarray(rewards, jnp.float32)
  if r.ndim != 1 or group_size < 1 or r.shape[0] % group_size:
    raise ValueError(f"rewards of shape {r.shape} do not split into groups of {group_size}")
  groups = r.reshape(-1, group_size)
  centred = groups - jnp.mean(groups, axis=1, keepdims=True)
  if scale_by_std:
    ddof = 1 if std == "sample" and group_size > 1 else 0
    centred = centred / (jnp.std(groups, axis=1, keepdims=True, ddof=ddof) + eps)
  constant = jnp.max(groups, axis=1, keepdims=True) == jnp.min(groups, axis=1, keepdims=True)
  return jnp.where(constant, 0.0, centred).reshape(-1)


def kl_penalty(logp, ref_logp, estimator: str):
  """Per-token KL(pi || ref) estimate float32[B, T] from sampled-token log-probs [B, T].

  k1 = logp - ref_logp (unbiased, can be negative; verl's "kl"/"k1", TRL's beta term
  uses k3). k3 = exp(d) - d - 1 with d = ref_logp - logp clipped to [-20, 20], the result
  capped at 10 (>= 0, lower variance): verl's "low_var_kl"/"k3" exactly, and TRL's
  per-token KL wherever neither clamp is active.
  """
  logp = jnp.asarray(logp, jnp.float32)
  ref_logp = jnp.asarray(ref_logp, jnp.float32)
  if estimator == "k1":
    return logp - ref_logp
  if estimator == "k3":
    d = jnp.clip(ref_logp - logp, -20.0, 20.0)
    return jnp.clip(jnp.exp(d) - d - 1.0, -10.0, 10.0)
  raise ValueError(f"kl_estimator {estimator!r} is not one of {KL_ESTIMATORS}")


def aggregate(per_token, mask, mode: str, *, max_length: int | None = None):
  """Scalar float32[] from per-token values float32[B, T] over a float32[B, T] mask.

  Each mode is the peer's of the same name (verl's `agg_loss` on one batch, TRL's
  `loss_type`); "sequences" below are those with at least one valid token.
    token-mean: sum over valid tokens / their number (verl; TRL "bnpo", and "dapo" on
      one process).
    seq-mean-token-mean: mean over sequences of each one's token mean (verl; TRL "grpo"
      except that TRL also counts empty sequences).
    seq-mean-token-sum: mean over sequences of each one's token sum (verl).
    seq-mean-token-sum-norm: the batch's token sum / max_length (verl, whose
      loss_scale_factor defaults to the padded response length); no mean over sequences.
    dr_grpo: the batch's token sum / (B * max_length), B counting every row (TRL's
      "dr_grpo", Dr. GRPO's constant normaliser).
  max_length is a constant, default T: pass the completion budget (max_new_tokens) when
  the T axis also holds the prompt. An empty mask gives 0.
  """
  mask = jnp.asarray(mask, jnp.float32)
  per_token = jnp.where(mask > 0, jnp.asarray(per_token, jnp.float32) * mask, 0.0)
  norm = per_token.shape[1] if max_length is None else max_length
  if mode == "token-mean":
    return jnp.sum(per_token) / jnp.maximum(jnp.sum(mask), 1.0)
  if mode in ("seq-mean-token-mean", "seq-mean-token-sum"):
    counts = jnp.sum(mask, axis=1)
    seq = jnp.sum(per_token, axis=1)
    if mode == "seq-mean-token-mean":
      seq = seq / jnp.maximum(counts, 1.0)
    has = (counts > 0).astype(jnp.float32)
    return jnp.sum(seq * has) / jnp.maximum(jnp.sum(has), 1.0)
  if mode == "seq-mean-token-sum-norm":
    return jnp.sum(per_token) / norm
  if mode == "dr_grpo":
    return jnp.sum(per_token) / (per_token.shape[0] * norm)
  raise ValueError(f"loss aggregation {mode!r} is not one of {AGGREGATIONS}")


def log_importance_ratio(logp, old_logp, mask, level: str, *, clamp: float = 20.0):
  """log pi/pi_old float32[B, T] of the surrogate (0 at masked positions).

  token: per token (PPO / GRPO). sequence: GSPO's s_i = exp(mean_t log-ratio of row i) as
  the value at every token of the row, with each token's own gradient: log s_it =
  sg(log s_i) + logp - sg(logp), as verl's "gspo" loss; TRL's
  importance_sampling_level="sequence" has the same value and gradient. `clamp` > 0 clips
  the log-ratio to [-clamp, clamp] before any exp (verl clamps token log-ratios at 20 and
  GSPO's from above at 10); 0 turns it off.
  """
  valid = mask > 0
  if level == "token":
    log_ratio = jnp.where(valid, logp - old_logp, 0.0)
  elif level == "sequence":
    diff = jnp.where(valid, logp - old_logp, 0.0)
    seq = jnp.sum(diff, axis=1) / jnp.maximum(jnp.sum(mask, axis=1), 1.0)
    own = jnp.where(valid, logp, 0.0)
    log_ratio = jnp.where(valid, own - jax.lax.stop_gradient(own)
                          + jax.lax.stop_gradient(seq)[:, None], 0.0)
  else:
    raise ValueError(f"importance_level {level!r} is not one of {IMPORTANCE_LEVELS}")
  if clamp > 0:
    log_ratio = jnp.clip(log_ratio, -clamp, clamp)
  return log_ratio


def anchor_loss(surrogate, logp, advantages, mask, functional_mask, anchor: str):
  """LA-GRPO's anchor term: the mean per-token loss over the functional-token positions,

      anchor = (1 / |M_func|) * sum_{t in M_func} l_t,   M_func = {t: functional_mask *
      mask = 1}

  with l_t = surrogate[t] (the clipped surrogate float32[B, T], TIS weight included) for
  anchor "pg", or l_t = -logp[t] (float32[B, T]) for "nll_pos", whose M_func keeps only
  rollouts with advantages[b] > 0 (float32[B]). `grpo_loss` adds alpha * anchor to the
  GRPO loss.

  Returns (anchor, |M_func|), float32[] each; an empty M_func gives 0 with a finite
  gradient.
  """
  fmask = functional_mask * mask
  if anchor == "pg":
    per_token = surrogate
  elif anchor == "nll_pos":
    fmask = fmask * (advantages[:, None] > 0).astype(jnp.float32)
    per_token = -logp
  else:
    raise ValueError(f"anchor {anchor!r} is not one of {ANCHORS}")
  n_func = jnp.sum(fmask)
  value = jnp.sum(jnp.where(fmask > 0, per_token * fmask, 0.0)) / jnp.maximum(n_func, 1.0)
  return value, n_func


def grpo_loss(logp, old_logp, advantages, mask, settings: LossSettings = LossSettings(), *,
              ref_logp=None, sampler_logp=None, functional_mask=None):
  """GRPO (settings.alpha = 0) or LA-GRPO loss and metrics:

      L = aggregate(surrogate) + beta * aggregate(kl) + alpha * anchor_loss.

  The surrogate per token is max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high)), and with
  dual-clip, for A < 0, min of that and -A c: verl's compute_policy_loss_vanilla (token
  level) or its "gspo" loss (sequence level, which has no dual-clip, as TRL has none).

  Args:
    logp: float32[B, T] log-probs of the taken tokens under the current params.
    old_logp: float32[B, T] the same under the params before this batch's inner updates.
    advantages: float32[B], one per completion. mask: float32[B, T], 1 on completion tokens.
    settings: the loss's `LossSettings`.
    ref_logp: float32[B, T], the frozen reference's log-probs (the KL term; a nonzero beta
      needs them).
    sampler_logp: float32[B, T], the sampler's log-probs (read only when tis_cap > 0).
    functional_mask: float32[B, T], 1 at functional-token positions (M_func; a nonzero
      alpha needs it).
  Returns:
    (loss float32[], metrics dict of float32[]: pg_loss, anchor_loss, functional_positions,
    ratio_mean, clip_fraction, clip_low_fraction, clip_high_fraction, dual_clip_fraction,
    and kl when ref_logp is given, tis_weight_mean when TIS is on).
  """
  s = settings
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
  ratio = jnp.exp(log_importance_ratio(logp, old_logp, mask, s.importance_level,
                                       clamp=s.log_ratio_clamp))
  clipped_ratio = jnp.clip(ratio, 1.0 - s.clip_low, 1.0 + s.clip_high)
  surrogate = jnp.maximum(-ratio * adv, -clipped_ratio * adv)
  dual = jnp.zeros(shape, bool)
  if s.clip_ratio_c and s.importance_level == "token":
    cap = -adv * s.clip_ratio_c
    dual = (adv < 0) & (surrogate > cap)
    surrogate = jnp.where(dual, cap, surrogate)
  metrics = {}
  if s.tis_cap > 0:
    if sampler_logp is None:
      raise ValueError(f"tis_cap {s.tis_cap} needs sampler_logp (the sampler's log-probs)")
    sampler_logp = jnp.asarray(sampler_logp, jnp.float32)
    _check_shape("sampler_logp", sampler_logp, shape)
    log_weight = jnp.where(valid, old_logp - sampler_logp, 0.0)
    weight = jax.lax.stop_gradient(jnp.minimum(jnp.exp(log_weight), s.tis_cap))
    surrogate = surrogate * weight
    metrics["tis_weight_mean"] = aggregate(weight, mask, "token-mean")
  agg = functools.partial(aggregate, mask=mask, mode=s.loss_agg, max_length=s.max_length)
  pg_loss = agg(surrogate)
  loss = pg_loss

  if ref_logp is not None:
    ref_logp = jnp.asarray(ref_logp, jnp.float32)
    _check_shape("ref_logp", ref_logp, shape)
    kl = kl_penalty(logp, jnp.where(valid, ref_logp, logp), s.kl_estimator)
    metrics["kl"] = aggregate(kl, mask, "token-mean")
    if not _is_zero(s.beta):
      loss = loss + s.beta * agg(kl)
  elif not _is_zero(s.beta):
    raise ValueError(f"beta {s.beta} needs ref_logp (the frozen reference's log-probs)")

  anchor = n_func = jnp.zeros((), jnp.float32)
  if functional_mask is not None:
    functional_mask = jnp.asarray(functional_mask, jnp.float32)
    _check_shape("functional_mask", functional_mask, shape)
    anchor, n_func = anchor_loss(surrogate, logp, advantages, mask, functional_mask, s.anchor)
    if not _is_zero(s.alpha):
      loss = loss + s.alpha * anchor
  elif not _is_zero(s.alpha):
    raise ValueError(f"alpha {s.alpha} needs functional_mask (the functional-token positions)")

  # Clipping is active where the clipped term wins the min, i.e. its gradient is cut.
  low = (ratio < 1.0 - s.clip_low) & (adv < 0)
  high = (ratio > 1.0 + s.clip_high) & (adv > 0)
  metrics.update(
      pg_loss=pg_loss, anchor_loss=anchor, functional_positions=n_func,
      ratio_mean=aggregate(ratio, mask, "token-mean"),
      clip_fraction=aggregate((low | high).astype(jnp.float32), mask, "token-mean"),
      clip_low_fraction=aggregate(low.astype(jnp.float32), mask, "token-mean"),
      clip_high_fraction=aggregate(high.astype(jnp.float32), mask, "token-mean"),
      dual_clip_fraction=aggregate(dual.astype(jnp.float32), mask, "token-mean"))
  return loss, metrics
