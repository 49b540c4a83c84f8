"""GRPO / LA-GRPO loss functions against values computed by hand in numpy."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from atlas_jax.rl import grpo


def test_group_advantages_sample_std_by_default_population_by_name():
  """Sample std (ddof 1) as verl's compute_grpo_outcome_advantage, TRL, OpenRLHF, EasyR1."""
  r = np.array([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0, 0.1, 0.1, 0.1, 0.1], np.float32)
  got = np.asarray(grpo.group_advantages(r, 4))
  # group 0: mean 0.5, sample std sqrt(4 * 0.25 / 3) = sqrt(1/3)
  sample = np.sqrt(1 / 3)
  np.testing.assert_allclose(got[:4], np.array([1, -1, -1, 1]) * 0.5 / (sample + 1e-6),
                             rtol=1e-6)
  population = np.asarray(grpo.group_advantages(r, 4, std="population"))
  np.testing.assert_allclose(population[:4], np.array([1, -1, -1, 1]) * 0.5 / (0.5 + 1e-6),
                             rtol=1e-6)
  # the two differ by sqrt(G / (G - 1))
  np.testing.assert_allclose(population[:4] / got[:4], np.sqrt(4 / 3), rtol=1e-5)
  # all-equal groups give exactly 0, also 0.1 whose float mean is off by an ulp
  np.testing.assert_array_equal(got[4:], 0.0)
  np.testing.assert_array_equal(population[4:], 0.0)
  no_std = np.asarray(grpo.group_advantages(r, 4, scale_by_std=False))  # Dr. GRPO
  np.testing.assert_allclose(no_std[:4], [0.5, -0.5, -0.5, 0.5])
  np.testing.assert_array_equal(no_std[4:], 0.0)
  # 0.1 in a group of 3: sum/3 rounds away from 0.1 and the std would blow that up.
  np.testing.assert_array_equal(grpo.group_advantages(np.full(3, 0.1, np.float32), 3), 0.0)
  # G = 3, rewards 0, 1, 2: mean 1, sample std 1 -> -1, 0, 1
  np.testing.assert_allclose(grpo.group_advantages(np.array([0.0, 1.0, 2.0]), 3),
                             np.array([-1.0, 0.0, 1.0]) / (1 + 1e-6), rtol=1e-6)
  with pytest.raises(ValueError, match="do not split into groups of 5"):
    grpo.group_advantages(r, 5)
  with pytest.raises(ValueError, match="advantage std 'biased'"):
    grpo.group_advantages(r, 4, std="biased")


def test_kl_estimators():
  """k1 and k3 as verl's kl_penalty "k1" / "low_var_kl" (k3 also TRL's, unclamped)."""
  logp, ref = np.array([[-1.0, -2.0, -0.5]]), np.array([[-1.5, -1.0, -0.5]])
  np.testing.assert_allclose(grpo.kl_penalty(logp, ref, "k1"), [[0.5, -1.0, 0.0]])
  k3 = np.asarray(grpo.kl_penalty(logp, ref, "k3"))
  # d = ref - logp = -0.5, 1, 0
  np.testing.assert_allclose(k3, [[np.exp(-0.5) + 0.5 - 1, np.e - 2, 0.0]], rtol=1e-6)
  assert k3.dtype == np.float32
  # verl's clamps: d = 3 gives e^3 - 4 = 16.1 -> 10; d = -30 -> d = -20: e^-20 + 19
  far = np.asarray(grpo.kl_penalty(np.array([[0.0, 0.0]]), np.array([[3.0, -30.0]]), "k3"))
  np.testing.assert_allclose(far, [[10.0, 10.0]])
  near = np.asarray(grpo.kl_penalty(np.array([[0.0]]), np.array([[2.0]]), "k3"))
  np.testing.assert_allclose(near, [[np.exp(2.0) - 3]], rtol=1e-6)  # under the cap
  with pytest.raises(ValueError, match="kl_estimator 'k2'"):
    grpo.kl_penalty(logp, ref, "k2")


def test_aggregations_including_an_empty_sequence():
  """Each mode against verl's agg_loss (and TRL's dr_grpo) computed by hand."""
  x = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, np.nan], [7.0, 8.0, np.inf]], np.float32)
  m = np.array([[1, 1, 0], [1, 0, 0], [0, 0, 0]], np.float32)  # row 2 fully masked
  # token sums 3, 4, 0 over 3 tokens; rows with tokens: 2; B = 3, T = 3
  agg = lambda mode, **kw: float(grpo.aggregate(x, m, mode, **kw))
  assert agg("token-mean") == pytest.approx((1 + 2 + 4) / 3)
  assert agg("seq-mean-token-mean") == pytest.approx((1.5 + 4) / 2)
  assert agg("seq-mean-token-sum") == pytest.approx((3 + 4) / 2)  # verl: empty rows out
  assert agg("seq-mean-token-sum-norm") == pytest.approx((3 + 4) / 3)  # verl: sum / T
  assert agg("seq-mean-token-sum-norm", max_length=10) == pytest.approx(0.7)
  assert agg("dr_grpo") == pytest.approx((3 + 4) / (3 * 3))  # TRL: sum / (B * T)
  assert agg("dr_grpo", max_length=10) == pytest.approx((3 + 4) / 30)
  # verl's name and TRL's differ by exactly B
  assert agg("seq-mean-token-sum-norm") == pytest.approx(3 * agg("dr_grpo"))
  for mode in grpo.AGGREGATIONS:
    assert float(grpo.aggregate(x, np.zeros_like(m), mode)) == 0.0
  with pytest.raises(ValueError, match="loss aggregation 'sum'"):
    grpo.aggregate(x, m, "sum")


def _surrogate(ratio, adv, lo=0.2, hi=0.28, c=3.0):
  """verl's compute_policy_loss_vanilla per token: clipped, then dual-clipped for A < 0."""
  loss = -np.minimum(ratio * adv, np.clip(ratio, 1 - lo, 1 + hi) * adv)
  return np.where(adv < 0, np.minimum(loss, -adv * c), loss) if c else loss


def test_clipping_on_both_sides_and_both_signs():
  ratio = np.array([[0.5, 1.0, 1.5], [0.5, 1.0, 1.5]], np.float32)
  old = np.zeros((2, 3), np.float32)
  logp = np.log(ratio)
  adv = np.array([2.0, -1.0], np.float32)
  mask = np.ones((2, 3), np.float32)
  f = lambda lp: grpo.grpo_loss(lp, old, adv, mask)
  (loss, m), grad = jax.value_and_grad(f, has_aux=True)(jnp.asarray(logp))
  # A = 2: -min(0.5*2, 0.8*2) = -1, -2, -min(3, 1.28*2) = -2.56 (clipped high)
  # A = -1: -min(-0.5, -0.8) = 0.8 (clipped low), 1, -min(-1.5, -1.28) = 1.5
  want = np.array([[-1.0, -2.0, -2.56], [0.8, 1.0, 1.5]])
  assert float(loss) == pytest.approx(want.mean(), rel=1e-6)
  # d/dlogp of -ratio*A/6 where unclipped; clipped positions get no gradient.
  want_grad = np.where([[0, 0, 1], [1, 0, 0]], 0.0, -ratio * adv[:, None] / 6)
  np.testing.assert_allclose(np.asarray(grad), want_grad, rtol=1e-6, atol=1e-8)
  assert float(m["clip_high_fraction"]) == pytest.approx(1 / 6)
  assert float(m["clip_low_fraction"]) == pytest.approx(1 / 6)
  assert float(m["clip_fraction"]) == pytest.approx(2 / 6)
  assert float(m["ratio_mean"]) == pytest.approx(1.0)
  assert float(m["pg_loss"]) == pytest.approx(want.mean(), rel=1e-6)


def test_kl_term_aggregation_and_beta_zero_needs_no_reference():
  logp = np.array([[-1.0, -2.0, -0.3], [-0.5, -0.7, -0.9]], np.float32)
  old = logp + np.float32(0.1)
  ref = np.array([[-1.2, -1.5, 0.0], [-0.4, -0.7, -3.0]], np.float32)
  adv = np.array([0.5, -0.25], np.float32)
  mask = np.array([[1, 1, 0], [1, 1, 1]], np.float32)
  surr = _surrogate(np.exp(logp - old), adv[:, None])
  d = ref - logp
  k3 = np.exp(d) - d - 1
  seq_mean = lambda v: ((v[0, :2].sum() / 2) + (v[1].sum() / 3)) / 2
  loss, m = grpo.grpo_loss(logp, old, adv, mask,
                           grpo.LossSettings(beta=0.1, loss_agg="seq-mean-token-mean"),
                           ref_logp=ref)
  assert float(loss) == pytest.approx(seq_mean(surr) + 0.1 * seq_mean(k3), rel=1e-5)
  assert float(m["kl"]) == pytest.approx((k3 * mask).sum() / 5, rel=1e-5)
  # beta = 0: no KL in the loss, but the metric is still reported when ref is given.
  base, m0 = grpo.grpo_loss(logp, old, adv, mask, grpo.LossSettings(kl_estimator="k1"),
                            ref_logp=ref)
  assert float(base) == pytest.approx((surr * mask).sum() / 5, rel=1e-5)
  assert float(m0["kl"]) == pytest.approx(((logp - ref) * mask).sum() / 5, rel=1e-5)
  _, no_ref = grpo.grpo_loss(logp, old, adv, mask)
  assert "kl" not in no_ref
  with pytest.raises(ValueError, match="beta 0.1 needs ref_logp"):
    grpo.grpo_loss(logp, old, adv, mask, grpo.LossSettings(beta=0.1))


def test_truncated_importance_sampling_weights_are_capped():
  logp = old = np.zeros((1, 3), np.float32)
  sampler = np.log(np.array([[0.25, 2.0, 1.0]], np.float32))  # exp(0 - s) = 4, 0.5, 1
  adv, mask = np.array([1.0], np.float32), np.ones((1, 3), np.float32)
  f = lambda lp, s: grpo.grpo_loss(lp, old, adv, mask, grpo.LossSettings(tis_cap=2.0),
                                   sampler_logp=s)
  (loss, m), (g_logp, g_sampler) = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(
      jnp.asarray(logp), jnp.asarray(sampler))
  w = np.array([2.0, 0.5, 1.0])  # 4 capped at 2
  assert float(loss) == pytest.approx(-w.sum() / 3)
  assert float(m["tis_weight_mean"]) == pytest.approx(w.mean())
  np.testing.assert_allclose(np.asarray(g_logp), [-w / 3], rtol=1e-6)  # ratio 1, A 1
  np.testing.assert_array_equal(np.asarray(g_sampler), 0.0)  # weight is stop-gradient
  assert "tis_weight_mean" not in grpo.grpo_loss(logp, old, adv, mask)[1]
  with pytest.raises(ValueError, match="tis_cap 2.0 needs sampler_logp"):
    grpo.grpo_loss(logp, old, adv, mask, grpo.LossSettings(tis_cap=2.0))


def _case():
  """B=4, T=200, row 3 half padded (750 valid tokens), 2 functional positions."""
  rng = np.random.default_rng(0)
  logp = rng.normal(-1.0, 0.3, (4, 200)).astype(np.float32)
  old = logp + rng.normal(0, 0.05, (4, 200)).astype(np.float32)
  adv = np.array([1.0, -0.5, 0.8, -1.3], np.float32)
  mask = np.ones((4, 200), np.float32)
  mask[3, 150:] = 0
  fmask = np.zeros((4, 200), np.float32)
  fmask[0, 10] = fmask[1, 50] = 1
  return logp, old, adv, mask, fmask


def test_alpha_zero_is_exactly_grpo():
  logp, old, adv, mask, fmask = _case()
  f = lambda lp, *settings, **kw: grpo.grpo_loss(lp, old, adv, mask, *settings, **kw)[0]
  l0, g0 = jax.value_and_grad(f)(jnp.asarray(logp))
  for anchor in grpo.ANCHORS:
    settings = grpo.LossSettings(alpha=0.0, anchor=anchor)
    l1, g1 = jax.value_and_grad(
        lambda lp: f(lp, settings, functional_mask=fmask))(jnp.asarray(logp))
    assert float(l0) == float(l1)
    np.testing.assert_array_equal(np.asarray(g0), np.asarray(g1))


def test_pg_anchor_is_the_mean_surrogate_over_functional_positions():
  logp, old, adv, mask, fmask = _case()
  fmask[3, 180] = 1  # padding: not a completion token, so not in M_func
  loss, m = grpo.grpo_loss(logp, old, adv, mask, grpo.LossSettings(alpha=0.5),
                           functional_mask=fmask)
  surr = _surrogate(np.exp(logp - old), adv[:, None])
  want_anchor = (surr[0, 10] + surr[1, 50]) / 2
  assert float(m["anchor_loss"]) == pytest.approx(want_anchor, rel=1e-5)
  assert float(m["functional_positions"]) == 2
  want_grpo = (surr * mask).sum() / 750
  assert float(m["pg_loss"]) == pytest.approx(want_grpo, rel=1e-5)
  assert float(loss) == pytest.approx(want_grpo + 0.5 * want_anchor, rel=1e-5)
  with pytest.raises(ValueError, match="alpha 0.5 needs functional_mask"):
    grpo.grpo_loss(logp, old, adv, mask, grpo.LossSettings(alpha=0.5))


@pytest.mark.parametrize("anchor", grpo.ANCHORS)
def test_empty_anchor_is_zero_with_finite_gradient(anchor):
  logp, old, adv, mask, fmask = _case()
  base = float(grpo.grpo_loss(logp, old, adv, mask)[0])
  if anchor == "pg":
    fmask = np.zeros_like(fmask)
  else:  # functional tokens only in negative-advantage rollouts: M_func is empty
    fmask = np.zeros_like(fmask)
    fmask[1, 5] = fmask[3, 7] = 1
  f = lambda lp: grpo.grpo_loss(lp, old, adv, mask, grpo.LossSettings(alpha=1.0, anchor=anchor),
                                functional_mask=fmask)
  (val, m), grad = jax.value_and_grad(f, has_aux=True)(jnp.asarray(logp))
  assert float(m["anchor_loss"]) == 0.0 and float(m["functional_positions"]) == 0.0
  assert float(val) == pytest.approx(base, rel=1e-6)
  assert np.isfinite(np.asarray(grad)).all()


def test_nll_pos_anchor_uses_positive_advantage_rollouts_only():
  logp, old, adv, mask, fmask = _case()  # row 0 has A > 0, row 1 has A < 0
  fmask[2, 20] = 1  # A = 0.8 > 0
  f = lambda lp, a: grpo.grpo_loss(lp, old, adv, mask, grpo.LossSettings(alpha=a, anchor="nll_pos"),
                                   functional_mask=fmask)
  (_, m), g1 = jax.value_and_grad(f, has_aux=True)(jnp.asarray(logp), 2.0)
  g0 = jax.grad(lambda lp: f(lp, 0.0)[0])(jnp.asarray(logp))
  assert float(m["functional_positions"]) == 2
  assert float(m["anchor_loss"]) == pytest.approx(-(logp[0, 10] + logp[2, 20]) / 2, rel=1e-6)
  extra = np.asarray(g1) - np.asarray(g0)  # d(2 * -(lp_a + lp_b) / 2) = -1 at each
  want = np.zeros_like(extra)
  want[0, 10] = want[2, 20] = -1.0
  np.testing.assert_allclose(extra, want, atol=1e-6)  # row 1's token gets nothing


def test_gradient_dilution_on_arrays():
  """2 functional tokens among 750: token-mean gives each 1/750 of the step, the anchor
  adds 1/2, so the gradient at those positions grows by 1 + 750/2 = 376x."""
  logp, old, adv, mask, fmask = _case()
  grad = lambda a: np.asarray(jax.grad(lambda lp: grpo.grpo_loss(
      lp, old, adv, mask, grpo.LossSettings(alpha=a), functional_mask=fmask)[0])(
          jnp.asarray(logp)))
  g0, g1 = grad(0.0), grad(1.0)
  at = fmask > 0
  ratio = g1[at] / g0[at]
  print(f"\n[grpo] functional-position gradient, LA-GRPO(alpha=1) / GRPO: {ratio}")
  np.testing.assert_allclose(ratio, 1 + mask.sum() / 2, rtol=1e-4)
  np.testing.assert_array_equal(g1[~at], g0[~at])  # the anchor touches only M_func


def test_garbage_at_masked_positions_does_not_leak():
  logp, old, adv, mask, fmask = _case()
  ref = logp - np.float32(0.2)
  dirty_old, dirty_ref = old.copy(), ref.copy()
  dirty_old[3, 150:] = 500.0  # exp(logp - old) underflows, exp(old - sampler) overflows
  dirty_ref[3, 150:] = 500.0
  def f(lp, o, r):
    return grpo.grpo_loss(lp, o, adv, mask, grpo.LossSettings(beta=0.1, tis_cap=2.0, alpha=1.0),
                          ref_logp=r, sampler_logp=logp, functional_mask=fmask)[0]
  clean, g_clean = jax.value_and_grad(f)(jnp.asarray(logp), old, ref)
  dirty, g_dirty = jax.value_and_grad(f)(jnp.asarray(logp), dirty_old, dirty_ref)
  assert np.isfinite(float(dirty)) and float(dirty) == pytest.approx(float(clean), rel=1e-6)
  np.testing.assert_allclose(np.asarray(g_dirty), np.asarray(g_clean), rtol=1e-6)


def test_jit_with_a_traced_alpha_matches_eager():
  logp, old, adv, mask, fmask = _case()
  settings = lambda a: grpo.LossSettings(alpha=a, loss_agg="seq-mean-token-sum-norm")
  eager, m_eager = grpo.grpo_loss(logp, old, adv, mask, settings(0.5), functional_mask=fmask)
  jitted = jax.jit(lambda lp, a: grpo.grpo_loss(lp, old, adv, mask, settings(a),
                                                functional_mask=fmask))
  loss, m = jitted(logp, jnp.float32(0.5))
  assert float(loss) == pytest.approx(float(eager), rel=1e-6)
  assert set(m) == set(m_eager) and all(v.dtype == jnp.float32 for v in m.values())


def test_bad_arguments_are_named():
  logp, old, adv, mask, fmask = _case()
  call = functools.partial(grpo.grpo_loss, logp, old, adv, mask)
  with pytest.raises(ValueError, match="anchor 'kl'"):
    call(grpo.LossSettings(anchor="kl"))
  with pytest.raises(ValueError, match="kl_estimator 'k2'"):
    call(grpo.LossSettings(kl_estimator="k2"))  # rejected even without a reference
  with pytest.raises(ValueError, match="loss aggregation 'mean'"):
    call(grpo.LossSettings(loss_agg="mean"))
  with pytest.raises(ValueError, match=r"advantages has shape \(3,\), expected \(4,\)"):
    grpo.grpo_loss(logp, old, adv[:3], mask)
  with pytest.raises(ValueError, match="functional_mask has shape"):
    call(grpo.LossSettings(alpha=1.0), functional_mask=fmask[:, :10])


def test_dual_clip_caps_negative_advantage_losses():
  """verl's dual-clip (clip_ratio_c = 3): for A < 0 the token loss is at most -A * c, and
  there its gradient is 0; clip_ratio_c = 0 is the plain clipped surrogate."""
  ratio = np.array([[5.0, 2.0, 0.5], [5.0, 2.0, 0.5]], np.float32)
  logp, old = np.log(ratio), np.zeros((2, 3), np.float32)
  adv, mask = np.array([-1.0, 1.0], np.float32), np.ones((2, 3), np.float32)
  f = lambda lp, c: grpo.grpo_loss(lp, old, adv, mask, grpo.LossSettings(clip_ratio_c=c))
  (loss, m), grad = jax.value_and_grad(f, has_aux=True)(jnp.asarray(logp), 3.0)
  # A = -1: max(r, clip(r)) = 5 -> capped at 3, 2, 0.8 (clipped low);
  # A = +1: -min(r, clip(r)) = -1.28, -1.28, -0.5
  want = np.array([[3.0, 2.0, 0.8], [-1.28, -1.28, -0.5]])
  assert float(loss) == pytest.approx(want.mean(), rel=1e-6)
  np.testing.assert_allclose(want, _surrogate(ratio, adv[:, None]), rtol=1e-6)
  assert float(m["dual_clip_fraction"]) == pytest.approx(1 / 6)
  # only [0, 1] (A = -1, r = 2 unclipped) and [1, 2] (A = 1, r = 0.5) carry gradient
  want_grad = np.zeros((2, 3))
  want_grad[0, 1], want_grad[1, 2] = 2.0 / 6, -0.5 / 6
  np.testing.assert_allclose(np.asarray(grad), want_grad, rtol=1e-6, atol=1e-8)
  off, m_off = f(jnp.asarray(logp), 0.0)
  assert float(off) == pytest.approx((want.sum() + 2.0) / 6, rel=1e-6)  # 5 instead of 3
  assert float(m_off["dual_clip_fraction"]) == 0.0
  with pytest.raises(ValueError, match="clip_ratio_c 1.0 must be > 1"):
    f(logp, 1.0)


def test_log_ratio_is_clamped_before_exp():
  """verl clamps log(pi / pi_old) to [-20, 20]: a token 100 nats more likely costs
  e^20 * |A| instead of inf, and its clipped gradient stays 0 instead of nan."""
  logp = np.array([[100.0, 0.0]], np.float32)
  old, mask = np.zeros((1, 2), np.float32), np.ones((1, 2), np.float32)
  neg = lambda clamp: grpo.grpo_loss(logp, old, np.array([-1.0], np.float32), mask,
                                     grpo.LossSettings(clip_ratio_c=0.0,
                                                       log_ratio_clamp=clamp))[0]
  assert float(neg(20.0)) == pytest.approx((np.exp(20.0) + 1.0) / 2, rel=1e-5)
  assert float(neg(0.0)) == np.inf  # without the clamp
  pos = lambda lp, clamp: grpo.grpo_loss(lp, old, np.array([1.0], np.float32), mask,
                                         grpo.LossSettings(log_ratio_clamp=clamp))[0]
  grad = np.asarray(jax.grad(pos)(jnp.asarray(logp), 20.0))
  np.testing.assert_allclose(grad, [[0.0, -0.5]])  # clipped high: no gradient
  assert np.isnan(np.asarray(jax.grad(pos)(jnp.asarray(logp), 0.0))[0, 0])


def _gspo_case():
  """Row 0: token log-ratios 0.1, -0.05, 0.25 (mean 0.1); row 1: 0.3, 0.5, pad (mean
  0.4, s = e^0.4 = 1.49 > 1.28: clipped)."""
  old = np.array([[-1.0, -2.0, -0.5], [-0.7, -1.1, -0.2]], np.float32)
  logp = old + np.array([[0.1, -0.05, 0.25], [0.3, 0.5, 7.0]], np.float32)
  mask = np.array([[1, 1, 1], [1, 1, 0]], np.float32)
  return logp, old, np.array([1.0, 2.0], np.float32), mask


def test_gspo_sequence_ratio_value_and_gradient():
  """GSPO as verl's "gspo" loss: every token of row i has the ratio s_i = exp(mean log-
  ratio), clipped on s_i, and its own gradient -A_i s_i d logp_t (no dual-clip)."""
  logp, old, adv, mask = _gspo_case()
  s0 = np.exp(0.1)
  f = lambda lp, level, agg="token-mean": grpo.grpo_loss(
      lp, old, adv, mask, grpo.LossSettings(importance_level=level, loss_agg=agg))
  (loss, m), grad = jax.value_and_grad(f, has_aux=True)(jnp.asarray(logp), "sequence")
  want = (3 * -1.0 * s0 + 2 * -2.0 * 1.28) / 5
  assert float(loss) == pytest.approx(want, rel=1e-5)
  assert float(m["ratio_mean"]) == pytest.approx((3 * s0 + 2 * np.exp(0.4)) / 5, rel=1e-5)
  assert float(m["clip_high_fraction"]) == pytest.approx(2 / 5)
  want_grad = np.array([[-s0 / 5] * 3, [0.0, 0.0, 0.0]])  # row 1 clipped
  np.testing.assert_allclose(np.asarray(grad), want_grad, rtol=1e-5, atol=1e-7)
  # verl's recommended seq-mean-token-mean: (-s0 + -2.56) / 2
  seq = float(f(logp, "sequence", "seq-mean-token-mean")[0])
  assert seq == pytest.approx((-s0 - 2.56) / 2, rel=1e-5)
  # token level differs: row 0's tokens have their own ratios (e^0.25 > 1.28 is clipped)
  token = float(f(logp, "token")[0])
  want_token = (-(np.exp(0.1) + np.exp(-0.05) + 1.28) - 2 * 2 * 1.28) / 5
  assert token == pytest.approx(want_token, rel=1e-5) and abs(token - want) > 1e-3

  def trl(lp):  # TRL's importance_sampling_level="sequence": the ratio is exp(mean), whole
    diff = jnp.where(mask > 0, lp - old, 0.0)
    r = jnp.exp(jnp.sum(diff, 1, keepdims=True) / jnp.sum(mask, 1, keepdims=True))
    r = jnp.broadcast_to(r, lp.shape)
    per = jnp.maximum(-r * adv[:, None], -jnp.clip(r, 0.8, 1.28) * adv[:, None])
    return jnp.sum(per * mask) / jnp.sum(mask)
  np.testing.assert_allclose(np.asarray(jax.grad(trl)(jnp.asarray(logp))), np.asarray(grad),
                             rtol=1e-5, atol=1e-7)
  # no dual-clip at the sequence level: A < 0 with s = e^2 > 3 is not capped at -A * 3
  big = old + np.float32(2.0)
  neg = grpo.grpo_loss(big, old, -adv, mask, grpo.LossSettings(importance_level="sequence"))
  assert float(neg[0]) == pytest.approx((3 * np.exp(2.0) + 2 * 2 * np.exp(2.0)) / 5, rel=1e-5)
  assert float(neg[1]["dual_clip_fraction"]) == 0.0
  with pytest.raises(ValueError, match="importance_level 'group'"):
    f(logp, "group")


def test_anchor_with_gspo_and_dual_clip():
  """LA-GRPO's pg anchor is the mean surrogate at M_func whatever the surrogate is."""
  logp, old, adv, mask = _gspo_case()
  fmask = np.zeros_like(mask)
  fmask[0, 1] = fmask[1, 0] = 1
  f = lambda lp, a: grpo.grpo_loss(lp, old, adv, mask,
                                   grpo.LossSettings(importance_level="sequence", alpha=a),
                                   functional_mask=fmask)
  (loss, m), g1 = jax.value_and_grad(f, has_aux=True)(jnp.asarray(logp), 1.0)
  s0 = np.exp(0.1)
  assert float(m["anchor_loss"]) == pytest.approx((-s0 - 2.56) / 2, rel=1e-5)
  assert float(loss) == pytest.approx(float(m["pg_loss"]) + float(m["anchor_loss"]), rel=1e-6)
  extra = np.asarray(g1) - np.asarray(jax.grad(lambda lp: f(lp, 0.0)[0])(jnp.asarray(logp)))
  want = np.zeros_like(extra)
  want[0, 1] = -s0 / 2  # row 1 is clipped: its functional token gets nothing
  np.testing.assert_allclose(extra, want, rtol=1e-5, atol=1e-7)
  # dual-clip: the capped token's anchor term is -A * c = 3
  ratio = np.array([[5.0, 0.5]], np.float32)
  loss_d, m_d = grpo.grpo_loss(np.log(ratio), np.zeros((1, 2), np.float32),
                               np.array([-1.0], np.float32), np.ones((1, 2), np.float32),
                               grpo.LossSettings(alpha=0.5),
                               functional_mask=np.ones((1, 2), np.float32))
  assert float(m_d["anchor_loss"]) == pytest.approx((3.0 + 0.8) / 2, rel=1e-6)
  # nll_pos is -log pi at positive-advantage functional positions at either level
  _, m_nll = grpo.grpo_loss(logp, old, adv, mask,
                            grpo.LossSettings(importance_level="sequence", alpha=1.0,
                                              anchor="nll_pos"),
                            functional_mask=fmask)
  assert float(m_nll["anchor_loss"]) == pytest.approx(-(logp[0, 1] + logp[1, 0]) / 2,
                                                      rel=1e-6)


def test_dr_grpo_and_verl_norm_in_the_loss_use_max_length():
  logp, old, adv, mask = _gspo_case()
  surr = _surrogate(np.exp(logp - old), adv[:, None]) * mask
  for mode, want in (("dr_grpo", surr.sum() / (2 * 8)),
                     ("seq-mean-token-sum-norm", surr.sum() / 8),
                     ("seq-mean-token-sum", surr.sum() / 2)):
    loss = grpo.grpo_loss(logp, old, adv, mask, grpo.LossSettings(loss_agg=mode, max_length=8))[0]
    assert float(loss) == pytest.approx(want, rel=1e-5), mode


def test_settings_come_from_an_rl_group_and_are_hashable():
  """`LossSettings.from_rl` reads the rl fields of the same names (max_length:
  rl.max_new_tokens); equal groups give equal, equally hashed settings (a static jit
  argument, a step-cache key)."""
  import dataclasses
  from atlas_jax.config import base_config
  rl = base_config().rl
  settings = grpo.LossSettings.from_rl(rl)
  assert settings == grpo.LossSettings.from_rl(base_config().rl)
  assert hash(settings) == hash(grpo.LossSettings.from_rl(base_config().rl))
  for field in dataclasses.fields(settings):
    name = "max_new_tokens" if field.name == "max_length" else field.name
    assert getattr(settings, field.name) == rl[name], field.name
  rl.alpha = 0.5
  assert grpo.LossSettings.from_rl(rl) != settings
