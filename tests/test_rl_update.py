"""The LA-GRPO update on the model: gradient dilution, alpha = 0, non-finite skipping."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from atlas_jax.config import base_config
from atlas_jax.model import ModelConfig, TextConfig, VisionConfig, init_params
from atlas_jax.rl import grpo
from atlas_jax.rl.update import rl_loss, rl_step
from atlas_jax.run import optimizer as optimizer_lib
from atlas_jax.run.state import TrainState

CONFIG = ModelConfig(
    vision=VisionConfig(depth=1, hidden_size=32, intermediate_size=48, num_heads=2,
                        out_hidden_size=64, window_size=56, fullatt_block_indexes=(0,)),
    text=TextConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, mrope_section=(2, 3, 3)),
    image_token_id=250)
FUNCTIONAL = np.array([240, 241, 242, 243, 244], np.int32)


def _rl(alpha, **kw):
  """rl_loss's settings from the base rl group (max_new_tokens 128 = the rollouts' length,
  temperature 1) with these changes."""
  rl = base_config().rl
  rl.update(dict(alpha=alpha, **kw))
  return dict(settings=grpo.LossSettings.from_rl(rl), temperature=rl.temperature)


def _rollouts(params):
  """8 rollouts of 16 prompt + 112 completion tokens; one functional token in each of 8
  completions of ~100 tokens (~1% of completion tokens)."""
  rng = np.random.default_rng(0)
  r, t, n = 8, 16, 112
  ids = rng.integers(0, 230, (r, t + n)).astype(np.int32)
  completion = np.zeros((r, t + n), np.int32)
  lengths = rng.integers(90, n + 1, r)
  for i in range(r):
    completion[i, t:t + lengths[i]] = 1
    ids[i, t + int(rng.integers(5, 80))] = FUNCTIONAL[i % 5]
  batch = dict(input_ids=ids, attention_mask=np.where(np.arange(t + n) < t, 1, completion),
               completion_mask=completion,
               advantages=np.array([1.0, -1.0, 0.5, -0.5, 1.2, -0.8, 0.3, -0.7], np.float32))
  from atlas_jax.run.logprobs import token_logps
  logp, _ = token_logps(CONFIG, params, batch, chunk=64)
  batch["old_logp"] = batch["sampler_logp"] = logp
  return batch


def test_gradient_dilution_on_functional_rows():
  params = init_params(CONFIG, jax.random.key(0))
  batch = _rollouts(params)
  share = (np.isin(batch["input_ids"], FUNCTIONAL) & (batch["completion_mask"] > 0)).sum() / \
      batch["completion_mask"].sum()
  norms = {}
  for alpha in (0.0, 0.1):
    loss = functools.partial(rl_loss, CONFIG, batch=batch, **_rl(alpha),
                             functional_ids=jnp.asarray(FUNCTIONAL), chunk=64)
    grads, _ = jax.jit(jax.grad(loss, has_aux=True))(params)
    head = grads["lm_head"]["kernel"][:, FUNCTIONAL]
    norms[alpha] = float(jnp.linalg.norm(head))
  ratio = norms[0.1] / norms[0.0]
  print(f"\n[la-grpo] functional tokens are {share:.2%} of completion tokens; LM-head "
        f"gradient norm on their columns: LA-GRPO(alpha=0.1) / GRPO = {ratio:.1f}x")
  assert share < 0.015
  assert ratio > 3.0


@pytest.mark.slow
def test_alpha_zero_update_equals_grpo_and_nan_is_skipped():
  params = init_params(CONFIG, jax.random.key(0))
  batch = _rollouts(params)
  optim = ml_collections.ConfigDict(dict(
      lr=1e-3, warmup_steps=0, total_steps=10, final_lr_fraction=1.0, weight_decay=0.0,
      b1=0.9, b2=0.95, eps=1e-8, clip_norm=1.0, grad_accum=1))
  tx = optimizer_lib.make_optimizer(optim)
  state = TrainState.create(params, tx, 0)

  def run(rl, b):
    step = jax.jit(functools.partial(rl_step, config=CONFIG, optimizer=tx, **rl,
                                     functional_ids=jnp.asarray(FUNCTIONAL), chunk=64))
    return step(state, b)

  s0, m0 = run(_rl(0.0), batch)
  s_none, _ = run(_rl(0.0), batch)  # deterministic
  assert float(m0["functional_positions"]) == 8 and float(m0["skipped_step"]) == 0
  for x, y in zip(jax.tree.leaves(s0.params), jax.tree.leaves(s_none.params)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  s1, m1 = run(_rl(0.1), batch)
  # The anchor's value is ~0 here (ratio 1, advantages summing to 0 over the functional
  # positions), but its gradient is not: the alpha = 0.1 update must differ.
  assert float(m1["grad_norm"]) > 1.2 * float(m0["grad_norm"])
  assert any(not np.array_equal(np.asarray(x), np.asarray(y))
             for x, y in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s0.params)))
  bad = dict(batch, advantages=np.full(8, np.nan, np.float32))
  s2, m2 = run(_rl(0.1), bad)
  assert float(m2["skipped_step"]) == 1 and int(s2.skipped) == 1
  for x, y in zip(jax.tree.leaves(s2.params), jax.tree.leaves(params)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _row_norms(grads, batch):
  """Per-vocab-row gradient norms (embedding row and LM-head column), by hand."""
  g_embed = np.asarray(grads["embed"]["embedding"])
  g_head = np.asarray(grads["lm_head"]["kernel"])
  row = np.sqrt((g_embed ** 2).sum(1) + (g_head ** 2).sum(0))
  pred = np.concatenate([batch["completion_mask"][:, 1:],
                         np.zeros_like(batch["completion_mask"][:, :1])], 1) > 0
  targets = np.concatenate([batch["input_ids"][:, 1:], batch["input_ids"][:, :1]], 1)
  present = np.unique(targets[pred])
  func = np.intersect1d(present, FUNCTIONAL)
  other = np.setdiff1d(present, FUNCTIONAL)
  return row[func].mean(), row[other].mean()


def test_dilution_diagnostic_is_logged_under_grpo_and_la_grpo():
  """rl_step reports the functional rows' gradient norm against the other tokens' rows,
  from its own gradient; the anchor raises the ratio."""
  params = init_params(CONFIG, jax.random.key(0))
  batch = _rollouts(params)
  optim = ml_collections.ConfigDict(dict(
      lr=1e-3, warmup_steps=0, total_steps=10, final_lr_fraction=1.0, weight_decay=0.0,
      b1=0.9, b2=0.95, eps=1e-8, clip_norm=1.0, grad_accum=1))
  tx = optimizer_lib.make_optimizer(optim)
  ratios = {}
  for alpha in (0.0, 0.1):
    rl = _rl(alpha)
    loss = functools.partial(rl_loss, CONFIG, batch=batch, **rl,
                             functional_ids=jnp.asarray(FUNCTIONAL), chunk=64)
    grads, _ = jax.jit(jax.grad(loss, has_aux=True))(params)
    want_func, want_other = _row_norms(grads, batch)
    step = jax.jit(functools.partial(rl_step, config=CONFIG, optimizer=tx, **rl,
                                     functional_ids=jnp.asarray(FUNCTIONAL), chunk=64))
    _, m = step(TrainState.create(params, tx, 0), batch)
    assert float(m["functional_row_grad_norm"]) == pytest.approx(want_func, rel=1e-4)
    assert float(m["other_row_grad_norm_mean"]) == pytest.approx(want_other, rel=1e-4)
    assert float(m["dilution_ratio"]) == pytest.approx(want_func / want_other, rel=1e-4)
    ratios[alpha] = float(m["dilution_ratio"])
  print(f"\n[dilution] functional / other row gradient norm: GRPO {ratios[0.0]:.2f}, "
        f"LA-GRPO(alpha=0.1) {ratios[0.1]:.2f}")
  assert ratios[0.1] > 2 * ratios[0.0]


def test_variant_fields_reach_the_loss():
  """GSPO, dual-clip, the clamp and TRL's dr_grpo through rl_loss; the base rl group means
  token-level ratios, c = 3 and the clamp at 20."""
  params = init_params(CONFIG, jax.random.key(0))
  batch = dict(_rollouts(params))
  shift = np.where(np.arange(batch["old_logp"].shape[1]) % 2, 0.3, -0.2).astype(np.float32)
  batch["old_logp"] = batch["old_logp"] + shift[None, :]  # ratios e^0.2, e^-0.3: some clipped
  run = lambda rl: jax.jit(functools.partial(
      rl_loss, CONFIG, **rl, functional_ids=jnp.asarray(FUNCTIONAL), chunk=64))(
          params, batch=batch)
  old_style = run(_rl(0.1))
  explicit = run(_rl(0.1, clip_ratio_c=3.0, log_ratio_clamp=20.0, importance_level="token"))
  assert float(old_style[0]) == float(explicit[0])
  gspo = run(_rl(0.1, importance_level="sequence"))
  assert np.isfinite(float(gspo[0])) and abs(float(gspo[0]) - float(old_style[0])) > 1e-6
  assert float(gspo[1]["functional_positions"]) == 8
  dr = run(_rl(0.0, loss_agg="dr_grpo", max_new_tokens=112))
  norm = run(_rl(0.0, loss_agg="seq-mean-token-sum-norm", max_new_tokens=112))
  assert float(norm[0]) == pytest.approx(8 * float(dr[0]), rel=1e-5)  # x B (8 rollouts)


def test_the_completion_window_matches_every_position():
  """completion_length (the rollout layout) runs the LM head on the completion's positions
  only: the same log-probs there, 0 before them, and the same loss and gradient."""
  from atlas_jax.run.logprobs import token_logps
  params = init_params(CONFIG, jax.random.key(0))
  batch = _rollouts(params)
  n = 112
  window = functools.partial(token_logps, CONFIG, chunk=16, completion_length=n)
  full, full_ent = jax.jit(functools.partial(token_logps, CONFIG, chunk=64))(params, batch)
  logp, ent = jax.jit(window)(params, batch)
  predicts = np.zeros(full.shape, bool)
  predicts[:, -n - 1:-1] = True
  np.testing.assert_allclose(np.asarray(logp)[predicts], np.asarray(full)[predicts], atol=1e-5)
  np.testing.assert_allclose(np.asarray(ent)[predicts], np.asarray(full_ent)[predicts],
                             atol=1e-5)
  assert not np.asarray(logp)[~predicts].any() and not np.asarray(ent)[~predicts].any()
  grads = {}
  for length in (None, n):
    loss = functools.partial(rl_loss, CONFIG, batch=batch, **_rl(0.1),
                             functional_ids=jnp.asarray(FUNCTIONAL), chunk=16,
                             completion_length=length)
    grads[length] = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  (loss_full, _), g_full = grads[None]
  (loss_window, _), g_window = grads[n]
  assert float(loss_window) == pytest.approx(float(loss_full), rel=1e-5)
  for a, b in zip(jax.tree.leaves(g_window), jax.tree.leaves(g_full)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-4)
  with pytest.raises(ValueError, match="leaves no prompt"):
    token_logps(CONFIG, params, batch, chunk=64, completion_length=128)


# Runs in a subprocess with 4 fake CPU devices: the update and the old-logp pass with
# rl.sequence_parallel against without, on a fsdp=2 x tensor=2 mesh.
SEQUENCE_PARALLEL_SCRIPT = """
import os
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + \\
    " --xla_force_host_platform_device_count=4"
import json
import jax, jax.numpy as jnp, numpy as np
from atlas_jax import config as config_lib, sharding
from atlas_jax.model import param_shardings
from atlas_jax.rl import rollout
from atlas_jax.rl.update import old_logps_fn, rl_update_fn
from atlas_jax.run import optimizer as optimizer_lib
from atlas_jax.run.state import TrainState
from tests import test_shared_prefix as T

mesh = sharding.make_mesh(dict(data=1, fsdp=2, tensor=2))
prompts, comps, adv = T._groups(4, seed=6, b=4)
flat = rollout.assemble(prompts, comps, jnp.asarray(adv), group_size=4)
grouped = rollout.assemble_grouped(prompts, comps, jnp.asarray(adv))
flat, grouped = T._with_logps(jax.tree.map(np.asarray, flat), jax.tree.map(np.asarray, grouped))
LENGTH_SHARDED = '[{"data", "fsdp"}, {"tensor"}, {}]'  # a [B, T, D] constraint, Shardy's text
report = {}
for form, batch in (("unshared", flat), ("shared", grouped)):
  batch = {k: jax.device_put(v, sharding.batch_sharding(mesh, v.ndim)) for k, v in batch.items()}
  out = {}
  for sp in (False, True):
    c = config_lib.base_config()
    c.train.logprob_chunk, c.rl.max_new_tokens = T.CHUNK, T.N
    c.rl.shared_prefix, c.rl.sequence_parallel, c.rl.beta = form == "shared", sp, 0.05
    c.optim.warmup_steps = 0
    tx = optimizer_lib.make_optimizer(c.optim)
    state = TrainState.create(jax.tree.map(np.array, T._params()), tx, 0)  # donated
    state_sh = sharding.state_shardings(mesh, state, param_shardings(mesh, T.CONFIG))
    state = jax.device_put(state, state_sh)
    with sharding.with_rules(mesh, sharding.RULES):  # the loop's; the steps bring their own
      logps = old_logps_fn(c, T.CONFIG)
      update = rl_update_fn(c, T.CONFIG, mesh, tx, state_sh, jnp.asarray(T.FUNCTIONAL))
      text = update.lower(state, batch).as_text() + logps.lower(state.params, batch).as_text()
      logp, _ = logps(state.params, batch)
      state, metrics = update(state, batch)
    out[sp] = (np.asarray(logp), {k: float(v) for k, v in metrics.items()},
               jax.tree.map(np.asarray, state.params), text.count(LENGTH_SHARDED))
  (l0, m0, p0, n0), (l1, m1, p1, n1) = out[False], out[True]
  report[form] = dict(
      logp=float(np.abs(l0 - l1).max()),
      metrics=max(abs(m0[k] - m1[k]) / max(1.0, abs(m0[k])) for k in m0),
      params=max(float(np.abs(a - b).max()) for a, b in
                 zip(jax.tree.leaves(p0), jax.tree.leaves(p1))),
      length_sharded=[n0, n1], skipped=m1["skipped_step"])
print("REPORT " + json.dumps(report))
"""


@pytest.mark.slow
def test_sequence_parallel_steps_equal_the_default_rules():
  """rl.sequence_parallel traces the old-logp pass and the update under
  sharding.SEQUENCE_PARALLEL_RULES (the residual stream [B, T, D] over fsdp x tensor on a
  fsdp=2 x tensor=2 mesh, which the default rules never ask for), on unshared and grouped
  batches (the reference KL on): the same log-probs, metrics and updated params."""
  import json
  import os
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, PYTHONPATH=root, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  out = subprocess.run([sys.executable, "-c", SEQUENCE_PARALLEL_SCRIPT], cwd=root, env=env,
                       capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  report = json.loads(out.stdout.split("REPORT ", 1)[1])
  print(f"\n[sequence parallel] {report}")
  for form, r in report.items():
    assert r["skipped"] == 0, form
    n_default, n_sequence_parallel = r["length_sharded"]
    assert n_sequence_parallel > n_default, (form, r)
    for key in ("logp", "metrics", "params"):
      assert r[key] < 1e-5, (form, key, r[key])
