"""GRPO / LA-GRPO loss functions against hand-computed values."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from atlas_jax.rl import grpo


def test_group_advantages():
  r = np.array([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0], np.float32)
  got = np.asarray(grpo.group_advantages(r, 4))
  g = r[:4]
  np.testing.assert_allclose(got[:4], (g - g.mean()) / (g.std() + 1e-6), rtol=1e-5)
  np.testing.assert_array_equal(got[4:], 0.0)  # all-equal group
  no_std = np.asarray(grpo.group_advantages(r, 4, scale_by_std=False))
  np.testing.assert_allclose(no_std[:4], g - g.mean())
  with pytest.raises(ValueError, match="do not split into groups of 3"):
    grpo.group_advantages(r, 3)


def test_kl_estimators():
  logp, ref = np.array([[-1.0, -2.0]]), np.array([[-1.5, -1.0]])
  np.testing.assert_allclose(grpo.kl_penalty(logp, ref, "k1"), logp - ref)
  d = ref - logp
  np.testing.assert_allclose(grpo.kl_penalty(logp, ref, "k3"), np.exp(d) - d - 1, rtol=1e-6)
  with pytest.raises(ValueError, match="kl_estimator 'k2'"):
    grpo.kl_penalty(logp, ref, "k2")


def test_aggregations_including_an_empty_sequence():
  x = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]], np.float32)
  m = np.array([[1, 1, 0], [1, 0, 0], [0, 0, 0]], np.float32)
  assert float(grpo.aggregate(x, m, "token-mean")) == pytest.approx((1 + 2 + 4) / 3)
  assert float(grpo.aggregate(x, m, "seq-mean-token-mean")) == pytest.approx((1.5 + 4) / 2)
  assert float(grpo.aggregate(x, m, "seq-mean-token-sum-norm")) == pytest.approx(
      (3 / 3 + 4 / 3 + 0) / 3)
  assert float(grpo.aggregate(x, m, "seq-mean-token-sum-norm", max_length=10)) == (
      pytest.approx((0.3 + 0.4 + 0) / 3))
  with pytest.raises(ValueError, match="loss aggregation 'sum'"):
    grpo.aggregate(x, m, "sum")


def _surrogate(ratio, adv, lo=0.2, hi=0.28):
  return -np.minimum(ratio * adv, np.clip(ratio, 1 - lo, 1 + hi) * adv)


def test_clipped_surrogate_both_sides():
  old = np.zeros((2, 3), np.float32)
  logp = np.log(np.array([[0.5, 1.0, 1.5], [0.5, 1.0, 1.5]], np.float32))
  adv = np.array([1.0, -1.0], np.float32)
  mask = np.ones((2, 3), np.float32)
  loss, m = grpo.grpo_loss(logp, old, adv, mask)
  ratio = np.exp(logp)
  want = _surrogate(ratio, adv[:, None]).mean()
  assert float(loss) == pytest.approx(want, rel=1e-6)
  # ratio 1.5 > 1.28 with A > 0 is clipped high; ratio 0.5 < 0.8 with A < 0 clipped low.
  assert float(m["clip_high_fraction"]) == pytest.approx(1 / 6)
  assert float(m["clip_low_fraction"]) == pytest.approx(1 / 6)
  assert float(m["clip_fraction"]) == pytest.approx(2 / 6)


def test_kl_term_and_beta_zero_needs_no_reference():
  logp = np.full((1, 2), -1.0, np.float32)
  ref = np.full((1, 2), -1.2, np.float32)
  adv, mask = np.array([0.5], np.float32), np.ones((1, 2), np.float32)
  base, _ = grpo.grpo_loss(logp, logp, adv, mask)
  with_kl, m = grpo.grpo_loss(logp, logp, adv, mask, beta=0.1, ref_logp=ref, kl_estimator="k1")
  assert float(with_kl - base) == pytest.approx(0.1 * 0.2, rel=1e-5)
  assert float(m["kl"]) == pytest.approx(0.2, rel=1e-5)
  with pytest.raises(ValueError, match="beta > 0 needs ref_logp"):
    grpo.grpo_loss(logp, logp, adv, mask, beta=0.1)


def test_truncated_importance_sampling_weights_are_capped():
  logp = old = np.zeros((1, 2), np.float32)
  sampler = np.log(np.array([[0.25, 2.0]], np.float32))  # weights exp(0 - s) = 4, 0.5
  adv, mask = np.array([1.0], np.float32), np.ones((1, 2), np.float32)
  loss, m = grpo.grpo_loss(logp, old, adv, mask, sampler_logp=sampler, tis_cap=2.0)
  assert float(loss) == pytest.approx(-(2.0 + 0.5) / 2)
  assert float(m["tis_weight_mean"]) == pytest.approx(1.25)


def _case():
  rng = np.random.default_rng(0)
  logp = rng.normal(-1.0, 0.3, (4, 200)).astype(np.float32)
  old = logp + rng.normal(0, 0.05, (4, 200)).astype(np.float32)
  adv = np.array([1.0, -0.5, 0.8, -1.3], np.float32)
  mask = np.ones((4, 200), np.float32)
  mask[3, 150:] = 0
  fmask = np.zeros((4, 200), np.float32)
  fmask[0, 10] = fmask[1, 50] = 1  # 2 of ~750 tokens
  return logp, old, adv, mask, fmask


def test_alpha_zero_is_exactly_grpo():
  logp, old, adv, mask, fmask = _case()
  f = lambda lp, **kw: grpo.grpo_loss(lp, old, adv, mask, **kw)[0]
  l0, g0 = jax.value_and_grad(f)(jnp.asarray(logp))
  l1, g1 = jax.value_and_grad(lambda lp: f(lp, functional_mask=fmask, alpha=0.0))(
      jnp.asarray(logp))
  assert float(l0) == float(l1)
  np.testing.assert_array_equal(np.asarray(g0), np.asarray(g1))


def test_pg_anchor_value_and_empty_anchor():
  logp, old, adv, mask, fmask = _case()
  loss, m = grpo.grpo_loss(logp, old, adv, mask, functional_mask=fmask, alpha=0.5)
  surr = _surrogate(np.exp(logp - old), adv[:, None])
  want_anchor = (surr[0, 10] + surr[1, 50]) / 2
  assert float(m["anchor_loss"]) == pytest.approx(want_anchor, rel=1e-5)
  assert float(m["functional_positions"]) == 2
  base, _ = grpo.grpo_loss(logp, old, adv, mask)
  assert float(loss) == pytest.approx(float(base) + 0.5 * want_anchor, rel=1e-5)
  empty = lambda lp: grpo.grpo_loss(lp, old, adv, mask, functional_mask=np.zeros_like(fmask),
                                    alpha=1.0)[0]
  val, grad = jax.value_and_grad(empty)(jnp.asarray(logp))
  assert float(val) == pytest.approx(float(base)) and np.isfinite(np.asarray(grad)).all()


def test_nll_pos_anchor_uses_positive_advantage_rollouts_only():
  logp, old, adv, mask, fmask = _case()  # row 0 has A > 0, row 1 has A < 0
  _, m = grpo.grpo_loss(logp, old, adv, mask, functional_mask=fmask, alpha=1.0,
                        anchor="nll_pos")
  assert float(m["functional_positions"]) == 1
  assert float(m["anchor_loss"]) == pytest.approx(-logp[0, 10], rel=1e-6)
  with pytest.raises(ValueError, match="anchor 'kl'"):
    grpo.grpo_loss(logp, old, adv, mask, anchor="kl")


def test_gradient_dilution_on_arrays():
  """With ~0.3% functional tokens, the anchor multiplies their gradient many times."""
  logp, old, adv, mask, fmask = _case()
  grad = lambda a: np.asarray(jax.grad(lambda lp: grpo.grpo_loss(
      lp, old, adv, mask, functional_mask=fmask, alpha=a)[0])(jnp.asarray(logp)))
  g0, g1 = grad(0.0), grad(1.0)
  at = fmask > 0
  ratio = np.abs(g1[at]).sum() / np.abs(g0[at]).sum()
  print(f"\n[grpo] functional-position gradient, LA-GRPO(alpha=1) / GRPO = {ratio:.0f}x")
  assert ratio > 50
  np.testing.assert_array_equal(g1[~at], g0[~at])  # the anchor touches only M_func
