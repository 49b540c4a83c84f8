"""Shared-prefix RL passes (rl.shared_prefix, `run.shared_prefix`) against the unshared rows:
log-probs, loss, metrics and gradients equal within float32 rounding on ragged prompts and
completions, images of different grids (one prompt with two images) and G in {1, 4, 8};
tests that fail if the prompt's gradient came from one completion only, if the
completions' positions restarted, or if a completion saw another's tokens."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from atlas_jax.model import init_params
from atlas_jax.model import rope
from atlas_jax.rl import grpo, rollout
from atlas_jax.rl import update as update_lib
from atlas_jax.run import logprobs, shared_prefix

from tests.test_rl_update import CONFIG, FUNCTIONAL  # the same tiny model and token ids

IMG, START, END = 250, 251, 252
N, CHUNK, TOL = 16, 8, 1e-5
GRIDS = ((1, 4, 6), (1, 2, 2), (1, 6, 4), (1, 4, 4))  # [t, h, w] patches; merged: h*w/4


def _groups(g: int, seed: int = 0, b: int = 3):
  """B prompts (ragged, left-padded; prompt 0 has two images, the others one, each grid
  different) and G ragged completions each (some stopping early, one using every slot).
  Returns (prompts, rollout dict as the sampler gives it, advantages float32[R])."""
  rng = np.random.default_rng(seed)
  patch_dim = CONFIG.vision.patch_dim
  rows, grids, pixels = [], [], []
  for i in range(b):
    images = [GRIDS[0], GRIDS[1]] if i == 0 else [GRIDS[1 + i % 3]]
    ids = rng.integers(0, 230, int(rng.integers(2, 6))).tolist()
    for grid in images:
      ids += [START] + [IMG] * (grid[1] * grid[2] // 4) + [END]
      ids += rng.integers(0, 230, int(rng.integers(1, 5))).tolist()
    rows.append(ids)
    grids.append(images + [(0, 0, 0)] * (2 - len(images)))
    patches = sum(int(np.prod(x)) for x in images)
    pixels.append(rng.normal(size=(patches, patch_dim)).astype(np.float32))
  t = max(map(len, rows)) + 2
  p = max(len(x) for x in pixels) + 4  # padded patch rows past the grids
  ids = np.zeros((b, t), np.int32)
  mask = np.zeros((b, t), np.int32)
  px = np.zeros((b, p, patch_dim), np.float32)
  for i, row in enumerate(rows):
    ids[i, t - len(row):], mask[i, t - len(row):] = row, 1
    px[i, :len(pixels[i])] = pixels[i]
  prompts = dict(input_ids=ids, attention_mask=mask, pixel_values=px,
                 image_grid_thw=np.asarray(grids, np.int32))
  r = b * g
  tokens = rng.integers(0, 230, (r, N)).astype(np.int32)
  lengths = rng.integers(3, N + 1, r)
  lengths[0] = N
  for i in range(r):
    tokens[i, int(rng.integers(0, lengths[i]))] = FUNCTIONAL[i % 5]
  comp_mask = (np.arange(N)[None] < lengths[:, None]).astype(np.int32)
  tokens = np.where(comp_mask > 0, tokens, 0)
  logps = (-rng.uniform(0.5, 3.0, (r, N)) * comp_mask).astype(np.float32)
  advantages = rng.normal(size=r).astype(np.float32)
  return prompts, dict(tokens=tokens, mask=comp_mask, logps=logps), advantages


def _both(g: int, seed: int = 0):
  """The same rollouts as the unshared batch (rollout.assemble) and the grouped one."""
  prompts, comps, adv = _groups(g, seed)
  flat = jax.tree.map(np.asarray, rollout.assemble(prompts, comps, jnp.asarray(adv),
                                                  group_size=g))
  grouped = jax.tree.map(np.asarray, rollout.assemble_grouped(prompts, comps,
                                                              jnp.asarray(adv)))
  return flat, grouped


def _window(flat):
  """An unshared [R, L] prediction-layout array's completion entries, as [R, N]."""
  t = flat["input_ids"].shape[1] - N
  return lambda x: np.asarray(x)[:, t - 1:t - 1 + N]


@functools.lru_cache(maxsize=1)
def _params():
  return init_params(CONFIG, jax.random.key(0))


def _logps(batch):
  if shared_prefix.is_grouped(batch):
    fn = functools.partial(shared_prefix.token_logps, CONFIG, chunk=CHUNK)
  else:
    fn = functools.partial(logprobs.token_logps, CONFIG, chunk=CHUNK, completion_length=N)
  return jax.jit(fn)(_params(), batch)


@pytest.mark.parametrize("g", [1, 4, 8])
def test_logps_equal_the_unshared_rows(g):
  flat, grouped = _both(g)
  (want, want_ent), (got, got_ent) = _logps(flat), _logps(grouped)
  cut = _window(flat)
  assert got.shape == (3 * g, N)
  np.testing.assert_allclose(np.asarray(got), cut(want), atol=TOL, rtol=0)
  np.testing.assert_allclose(np.asarray(got_ent), cut(want_ent), atol=TOL, rtol=0)


def _with_logps(flat, grouped, seed=1):
  """Both batches with old_logp and ref_logp: the trainer's log-probs moved by noise (so
  ratios leave 1 and some clip), the same values in both layouts."""
  rng = np.random.default_rng(seed)
  logp, _ = _logps(grouped)
  r = logp.shape[0]
  t = flat["input_ids"].shape[1] - N
  place = lambda x: np.pad(x, ((0, 0), (t - 1, 1)))
  out = []
  for noise in (0.25, 0.4):
    out.append((np.asarray(logp) + rng.normal(scale=noise, size=(r, N))).astype(np.float32))
  flat = dict(flat, old_logp=place(out[0]), ref_logp=place(out[1]))
  grouped = dict(grouped, old_logp=out[0], ref_logp=out[1])
  return flat, grouped


def _loss_and_grads(batch, settings):
  fn = functools.partial(update_lib.rl_loss, CONFIG, settings=settings, temperature=1.0,
                         functional_ids=jnp.asarray(FUNCTIONAL), chunk=CHUNK,
                         completion_length=N)
  return jax.jit(jax.value_and_grad(lambda p, b: fn(p, b), has_aux=True))(_params(), batch)


def _assert_same(got, want):
  (loss_g, metrics_g), grads_g = got
  (loss_w, metrics_w), grads_w = want
  np.testing.assert_allclose(float(loss_g), float(loss_w), atol=TOL, rtol=TOL)
  assert metrics_g.keys() == metrics_w.keys()
  for k in metrics_w:
    np.testing.assert_allclose(float(metrics_g[k]), float(metrics_w[k]), atol=TOL, rtol=TOL,
                               err_msg=k)
  worst = max(float(jnp.max(jnp.abs(a - b))) for a, b in
              zip(jax.tree.leaves(grads_g), jax.tree.leaves(grads_w)))
  assert worst < TOL, worst
  return worst


BASE = grpo.LossSettings(alpha=0.1, max_length=N)
MODES = {  # every aggregation, both importance levels and anchors, TIS, KL, the clips
    "token": BASE,
    "sequence-kl-tis-nll": dataclasses.replace(
        BASE, importance_level="sequence", loss_agg="seq-mean-token-mean", beta=0.05,
        tis_cap=2.0, anchor="nll_pos", alpha=0.2),
    "sum-norm-k1-noclip": dataclasses.replace(
        BASE, loss_agg="seq-mean-token-sum-norm", max_length=None, clip_ratio_c=0.0,
        log_ratio_clamp=0.0, beta=0.1, kl_estimator="k1"),
    "dr-grpo": dataclasses.replace(BASE, loss_agg="dr_grpo", max_length=None, alpha=0.0),
    "seq-sum-tis": dataclasses.replace(BASE, loss_agg="seq-mean-token-sum", tis_cap=1.5),
}


@pytest.mark.parametrize("mode", list(MODES))
def test_loss_metrics_and_gradients_equal_the_unshared_rows(mode):
  flat, grouped = _with_logps(*_both(4))
  settings = MODES[mode]
  if not settings.beta:
    flat.pop("ref_logp"), grouped.pop("ref_logp")
  worst = _assert_same(_loss_and_grads(grouped, settings), _loss_and_grads(flat, settings))
  print(f"\n[shared-prefix] {mode}: largest gradient difference {worst:.1e}")


@pytest.mark.parametrize("g", [1, 8])
def test_gradients_equal_for_other_group_sizes(g):
  flat, grouped = _with_logps(*_both(g, seed=g))
  _assert_same(_loss_and_grads(grouped, BASE), _loss_and_grads(flat, BASE))


def _vision_grads(batch, advantages=None):
  if advantages is not None:
    batch = dict(batch, advantages=advantages)
  (_, _), grads = _loss_and_grads(batch, dataclasses.replace(BASE, alpha=0.0))
  return jax.tree.map(np.asarray, grads["visual"])


def test_the_prompt_gradient_is_the_sum_over_its_completions():
  """The vision tower sees only the prompts: its gradient equals the unshared one (G
  copies of each image) and is the sum of each completion's own part (the loss is linear
  in the advantages at fixed old log-probs and mask), which G x one completion's part is
  not."""
  g = 4
  flat, grouped = _with_logps(*_both(g))
  full = _vision_grads(grouped)
  unshared = _vision_grads(flat)
  adv = grouped["advantages"]
  parts = []
  for k in range(g):
    only = np.where(np.arange(adv.size) % g == k, adv, 0.0).astype(np.float32)
    parts.append(_vision_grads(grouped, only))
  summed = jax.tree.map(lambda *x: sum(x), *parts)
  one_only = jax.tree.map(lambda x: g * x, parts[0])
  scale = max(float(np.abs(x).max()) for x in jax.tree.leaves(full))
  for a, b, c, d in zip(*map(jax.tree.leaves, (full, unshared, summed, one_only))):
    np.testing.assert_allclose(a, b, atol=TOL * max(scale, 1), rtol=0)
    np.testing.assert_allclose(a, c, atol=TOL * max(scale, 1), rtol=0)
  gap = max(float(np.abs(a - d).max()) for a, d in zip(jax.tree.leaves(full),
                                                        jax.tree.leaves(one_only)))
  assert gap > 100 * TOL * max(scale, 1), gap


def test_completion_positions_continue_the_prompt():
  """The completions' M-RoPE ids are the unshared rows' (get_rope_index on [prompt;
  completion]), padding included; restarted positions would change the log-probs far
  beyond the tolerance."""
  flat, grouped = _both(4)
  t = grouped["prompt_ids"].shape[1]
  want, _ = rope.get_rope_index(flat["input_ids"], flat["attention_mask"],
                                flat["image_grid_thw"].reshape(-1, 3),
                                image_token_id=IMG, spatial_merge_size=2)
  prompt_pos, completion_pos = shared_prefix.positions(CONFIG, grouped)
  np.testing.assert_array_equal(np.asarray(completion_pos), want[:, :, t:])
  np.testing.assert_array_equal(np.asarray(prompt_pos), want[:, ::4, :t])
  # the images' rope_deltas: not the count of prompt tokens (nor T)
  assert int(np.asarray(completion_pos)[0, 0, 0]) < int(grouped["prompt_mask"][0].sum()) < t

  logp, _ = _logps(grouped)
  original = shared_prefix.positions
  for restart in (0, t):  # from 0, or from the prompt's padded length
    def restarted(config, batch, restart=restart):
      pp, _ = original(config, batch)
      mask = batch["completion_mask"]
      return pp, jnp.where(mask > 0, restart + jnp.cumsum(mask, 1) - mask, 0)[None].repeat(3, 0)
    with pytest.MonkeyPatch.context() as m:
      m.setattr(shared_prefix, "positions", restarted)
      moved, _ = jax.jit(functools.partial(shared_prefix.token_logps, CONFIG, chunk=CHUNK))(
          _params(), grouped)
    assert float(jnp.max(jnp.abs(moved - logp))) > 100 * TOL


def test_a_completion_sees_its_prompt_and_its_own_past_only():
  """Changing one completion's token changes that completion's later log-probs only;
  changing a prompt token changes its own group's completions only."""
  g = 4
  _, grouped = _both(g)
  base, _ = _logps(grouped)
  edited = dict(grouped, completion_ids=grouped["completion_ids"].copy())
  edited["completion_ids"][0, 5] = (edited["completion_ids"][0, 5] + 7) % 230  # row 0: N real
  got, _ = _logps(edited)
  diff = np.abs(np.asarray(got) - np.asarray(base))
  assert diff[1:].max() == 0.0  # rows are independent: not a bit moves in the others
  assert diff[0, :5].max() == 0.0  # causal: its own earlier tokens neither
  assert diff[0, 6:].min() > 0 and diff[0, 6:].max() > 1e-3  # its later ones, through it
  prompt = dict(grouped, prompt_ids=grouped["prompt_ids"].copy())
  prompt["prompt_ids"][2, -1] = (prompt["prompt_ids"][2, -1] + 7) % 230
  got, _ = _logps(prompt)
  diff = np.abs(np.asarray(got) - np.asarray(base)).max(axis=1)
  assert diff[:2 * g].max() == 0.0 and diff[2 * g:].min() > 1e-3


def test_rl_step_equals_the_unshared_step():
  """The jitted update: the same params after the step, the same metrics (grad_norm and
  the dilution diagnostic included)."""
  import ml_collections
  from atlas_jax.run import optimizer as optimizer_lib
  from atlas_jax.run.state import TrainState
  optim = ml_collections.ConfigDict(dict(
      lr=1e-3, warmup_steps=0, total_steps=10, final_lr_fraction=1.0, weight_decay=0.0,
      b1=0.9, b2=0.95, eps=1e-8, clip_norm=1.0, grad_accum=1))
  tx = optimizer_lib.make_optimizer(optim)
  flat, grouped = _with_logps(*_both(4))
  step = jax.jit(functools.partial(
      update_lib.rl_step, config=CONFIG, optimizer=tx, settings=BASE, temperature=1.0,
      functional_ids=jnp.asarray(FUNCTIONAL), chunk=CHUNK, completion_length=N))
  (s_got, m_got), (s_want, m_want) = (step(TrainState.create(_params(), tx, 0), b)
                                      for b in (grouped, flat))
  assert m_got.keys() == m_want.keys() and float(m_got["skipped_step"]) == 0
  for k in m_want:
    np.testing.assert_allclose(float(m_got[k]), float(m_want[k]), atol=TOL, rtol=TOL,
                               err_msg=k)
  for a, b in zip(jax.tree.leaves(s_got.params), jax.tree.leaves(s_want.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=TOL, rtol=0)


def test_micro_batches_hold_whole_groups():
  """grad accumulation splits a grouped batch by prompt (prompt b -> micro-batch b %
  count, its G completions with it), each micro-batch's log-probs equal to the unshared
  rows of the same groups; prompts that do not split are refused by name."""
  from atlas_jax import sharding
  g, b = 4, 4
  prompts, comps, adv = _groups(g, seed=3, b=b)
  grouped = rollout.assemble_grouped(prompts, comps, jnp.asarray(adv))
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  micro = update_lib.micro_batches(grouped, 2, mesh)
  assert len(micro) == 2
  for i, mb in enumerate(micro):
    keep = np.arange(i, b, 2)
    rows = (keep[:, None] * g + np.arange(g)).reshape(-1)
    np.testing.assert_array_equal(np.asarray(mb["prompt_ids"]), prompts["input_ids"][keep])
    np.testing.assert_array_equal(np.asarray(mb["pixel_values"]),
                                  prompts["pixel_values"][keep])
    np.testing.assert_array_equal(np.asarray(mb["completion_ids"]), comps["tokens"][rows])
    np.testing.assert_array_equal(np.asarray(mb["advantages"]), adv[rows])
    sub = lambda d, idx: {k: v[idx] for k, v in d.items()}
    flat = rollout.assemble(sub(prompts, keep), sub(comps, rows), jnp.asarray(adv[rows]),
                            group_size=g)
    (got, _), (want, _) = _logps(mb), _logps(flat)
    np.testing.assert_allclose(np.asarray(got), _window(flat)(want), atol=TOL, rtol=0)
  with pytest.raises(ValueError, match="4 groups .* optim.grad_accum = 3"):
    update_lib.micro_batches(grouped, 3, mesh)


def _logps_fn(shared: bool, **changes):
  """old_logps_fn of a base config with the tiny model's chunk and completion length."""
  from atlas_jax import config as config_lib
  c = config_lib.base_config()
  c.train.logprob_chunk, c.rl.max_new_tokens, c.rl.shared_prefix = CHUNK, N, shared
  c.rl.update(changes)
  return update_lib.old_logps_fn(c, CONFIG)


@pytest.mark.parametrize("shared", [False, True])
def test_log_prob_pass_in_micro_batches_equals_the_whole_batch(shared):
  """update.batch_logps: the old-logp pass over 4 prompts x 4 completions in 2 and 4
  micro-batches (whole groups when grouped), put back in the batch's row order, equals the
  pass over the whole batch (and, grouped, the unshared rows), whatever
  rl.shared_prefix_parts the update takes."""
  from atlas_jax import sharding
  g, b = 4, 4
  prompts, comps, adv = _groups(g, seed=4, b=b)
  batch = (rollout.assemble_grouped(prompts, comps, jnp.asarray(adv)) if shared else
           rollout.assemble(prompts, comps, jnp.asarray(adv), group_size=g))
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  fn = _logps_fn(shared, shared_prefix_parts=2)
  want, _ = fn(_params(), batch)
  for count in (2, 4):
    got = update_lib.batch_logps(fn, _params(), batch, count, mesh)
    assert got.shape == want.shape
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=TOL, rtol=0)
  if shared:  # ... and the unshared rows'
    flat = rollout.assemble(prompts, comps, jnp.asarray(adv), group_size=g)
    np.testing.assert_allclose(np.asarray(want), _window(flat)(_logps(flat)[0]), atol=TOL,
                               rtol=0)


def test_groups_split_after_assembly_equal_the_assembled_parts():
  """rollout.split_groups (the loop: the log-prob passes on whole groups, then the update's
  parts) gives assemble_grouped(parts=2)'s batch, old_logp (a per-completion array)
  untouched."""
  prompts, comps, adv = _groups(4)
  whole = rollout.assemble_grouped(prompts, comps, jnp.asarray(adv))
  old = jnp.asarray(comps["logps"]) - 0.5
  split = rollout.split_groups(dict(whole, old_logp=old), 2)
  want = rollout.assemble_grouped(prompts, comps, jnp.asarray(adv), parts=2)
  assert set(split) == set(want) | {"old_logp"}
  for k in want:
    np.testing.assert_array_equal(np.asarray(split[k]), np.asarray(want[k]), err_msg=k)
  np.testing.assert_array_equal(np.asarray(split["old_logp"]), np.asarray(old))
  assert rollout.split_groups(whole, 1) is whole


def test_config_switch_defaults_off_and_is_checked():
  from atlas_jax import config as config_lib
  c = config_lib.base_config()
  assert c.rl.shared_prefix is False
  c.rl.shared_prefix = True
  c.rl.prompts_per_step, c.optim.grad_accum, c.train.steps = 4, 3, 3
  with pytest.raises(ValueError, match="optim.grad_accum"):
    config_lib._validate_rl(c)
  c.optim.grad_accum, c.train.steps = 2, 2
  config_lib._validate_rl(c)
  # The log-prob passes: their own micro-batches of whole groups, by default the update's
  # completions per micro-batch.
  assert c.rl.logprob_micro_batches == 0 and config_lib.logprob_micro_batches(c) == 2
  c.rl.shared_prefix_parts, c.optim.grad_accum, c.train.steps = 2, 8, 8
  assert config_lib.logprob_micro_batches(c) == 4
  config_lib._validate_rl(c)
  c.rl.shared_prefix = False  # parts only count under shared_prefix
  assert config_lib.logprob_micro_batches(c) == 8
  c.rl.shared_prefix = True
  c.rl.logprob_micro_batches = 3
  with pytest.raises(ValueError, match="rl.logprob_micro_batches.*rl.prompts_per_step"):
    config_lib._validate_rl(c)
  c.rl.logprob_micro_batches = 1
  config_lib._validate_rl(c)
  c.rl.logprob_micro_batches = -1
  with pytest.raises(ValueError, match="rl.logprob_micro_batches"):
    config_lib._validate_rl(c)


def _loop_config(tmp, **changes):
  """test_rl_loop's tiny run, with 4 completions of 16 tokens per prompt."""
  from tests import test_rl_loop
  return test_rl_loop._config(tmp, **{"train.logprob_chunk": 16, "rl.max_new_tokens": 16,
                                      "rl.group_size": 4, **changes})


def test_rl_loop_step_equals_the_unshared_step(tmp_path):
  """train_rl with rl.shared_prefix: one step (same rollouts) ends at the unshared run's
  params and metrics (loss, grad_norm, the drift metric, ...). And with the update's
  groups in 2 parts over 2 micro-batches while the old-logp pass reads each prompt once in
  one micro-batch: the same rollouts, the same drift, and every update's ratio to the old
  policy 1 (no update between the pass and the micro-batches: a row's old log-probs
  placed on another row would move it)."""
  from atlas_jax.rl.loop import train_rl
  out = {}
  for name, changes in (("unshared", {}), ("shared", {"rl.shared_prefix": True}),
                        ("parts", {"rl.shared_prefix": True, "rl.shared_prefix_parts": 2,
                                   "optim.grad_accum": 2, "train.steps": 2,
                                   "checkpoint.every": 2, "rl.logprob_micro_batches": 1})):
    c = _loop_config(str(tmp_path), **{"train.steps": 1, "checkpoint.every": 1, **changes})
    state, last, _ = train_rl(c, str(tmp_path / f"run_{name}"))
    out[name] = (jax.tree.map(np.asarray, state.params), last)
  (p_want, m_want), (p_got, m_got) = out["unshared"], out["shared"]
  m_parts = out["parts"][1]
  assert m_parts["reward"] == m_want["reward"]
  np.testing.assert_allclose(m_parts["logp_drift"], m_want["logp_drift"], atol=TOL, rtol=1e-4)
  np.testing.assert_allclose(m_parts["ratio_mean"], 1.0, atol=TOL, rtol=0)
  c = _loop_config(str(tmp_path), **{"train.steps": 1, "checkpoint.every": 1})
  assert m_got["reward"] == m_want["reward"]  # the same rollouts
  for k in ("loss", "pg_loss", "anchor_loss", "grad_norm", "logp_drift", "entropy",
            "ratio_mean", "dilution_ratio"):
    np.testing.assert_allclose(m_got[k], m_want[k], atol=TOL, rtol=1e-4, err_msg=k)
  # Adam's first step moves each entry by about lr * g / |g|: an entry whose gradient is
  # near float32 rounding moves by a visibly different fraction of lr (the gradients agree
  # within 1e-5: the tests above), so the params are compared as a whole, against the
  # step's size: the difference's norm under 0.1% of lr * sqrt(entries).
  diff = np.sqrt(sum(float(np.sum((a - b) ** 2)) for a, b in
                     zip(jax.tree.leaves(p_got), jax.tree.leaves(p_want))))
  size = sum(a.size for a in jax.tree.leaves(p_want))
  assert diff < 1e-3 * c.optim.lr * np.sqrt(size), diff


@pytest.mark.slow
def test_rl_loop_shared_with_accumulation_kl_and_dynamic_sampling(tmp_path):
  """The switch with grad accumulation (whole groups per micro-batch, each group of 4
  split in 2 parts), the KL reference pass and DAPO's dynamic sampling: two steps, finite
  metrics."""
  from atlas_jax.rl.loop import train_rl
  c = _loop_config(str(tmp_path), **{
      "rl.shared_prefix": True,
      "optim.grad_accum": 4, "rl.shared_prefix_parts": 2, "train.steps": 8,
      "checkpoint.every": 8, "optim.warmup_steps": 0, "rl.beta": 0.05,
      "rl.dynamic_sampling": True,
      "rl.importance_level": "sequence", "rl.tis_cap": 2.0})
  state, last, _ = train_rl(c, str(tmp_path / "run"))
  assert int(state.step) == 8
  for k in ("loss", "grad_norm", "kl", "logp_drift", "tis_weight_mean"):
    assert np.isfinite(last[k]), k
  assert last["kl"] > 0  # the second update's policy has left the reference


@pytest.mark.slow
def test_sharded_over_a_mesh_equals_one_device():
  """The grouped update with prompts and completions sharded over the batch axes (and
  the params over tensor / fsdp), micro-batches included: equal to the unshared
  single-device loss, metrics and gradients (tests/shared_prefix_mesh_check.py, 4 fake
  CPU devices)."""
  import json
  import os
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, PYTHONPATH=root)
  env.pop("XLA_FLAGS", None)
  out = subprocess.run([sys.executable, "-m", "tests.shared_prefix_mesh_check"], cwd=root,
                       env=env, capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  report = json.loads(out.stdout.strip().splitlines()[-1])
  print(f"\n[shared-prefix mesh] {report}")
  for name, r in report.items():
    for key in ("loss", "metrics", "grads", "micro_logps"):
      assert r[key] < TOL, (name, key, r[key])


@pytest.mark.parametrize("impl", ["splash", "cudnn"])
def test_kernel_forms_equal_the_einsums(impl, monkeypatch):
  """attention.shared_prefix_kernel (the prompt's K/V repeated per completion, one kernel
  call per row) against attention.shared_prefix (the einsums), values and gradients, on
  left-padded prompts and ragged completions. splash runs in Pallas interpret mode here;
  cudnn's layout and dense mask go through jax.nn.dot_product_attention's XLA
  implementation (the same call; cuDNN itself needs a GPU)."""
  from atlas_jax.model import attention as attention_lib
  from atlas_jax.model import vlm
  if impl == "cudnn":
    monkeypatch.setattr(attention_lib, "_cudnn", functools.partial(
        attention_lib._cudnn, implementation="xla"))
  rng = np.random.default_rng(0)
  b, c, p, t, kv, g, h = 2, 3, 20, 12, 2, 2, 16
  r = b * c
  normal = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
  q, k, v = normal(r, t, kv * g, h), normal(r, t, kv, h), normal(r, t, kv, h)
  pk, pv = normal(b, p, kv, h), normal(b, p, kv, h)
  prefix_keys = jnp.asarray(np.arange(p)[None] >= np.array([[0], [7]]))  # left padding
  lengths = rng.integers(2, t + 1, r)
  own = jnp.asarray((np.arange(t)[None] < lengths[:, None]).astype(np.int32))
  mask = vlm.text_mask(own)
  real = np.asarray(own, np.float32)[:, :, None, None]
  weights = normal(r, t, kv * g, h)

  def loss(fn, *xs):
    return jnp.sum(fn(*xs) * weights * real)

  einsum = lambda *xs: attention_lib.shared_prefix(*xs, prefix_keys, mask.dense)
  kernel = lambda *xs: attention_lib.shared_prefix_kernel(*xs, prefix_keys, mask, impl)
  args = (q, pk, pv, k, v)
  want = np.asarray(einsum(*args)) * real
  got = np.asarray(kernel(*args)) * real
  np.testing.assert_allclose(got, want, atol=TOL, rtol=0)
  g_want = jax.grad(functools.partial(loss, einsum), argnums=range(5))(*args)
  g_got = jax.grad(functools.partial(loss, kernel), argnums=range(5))(*args)
  for a, w in zip(g_got, g_want):
    np.testing.assert_allclose(np.asarray(a), np.asarray(w), atol=TOL, rtol=0)


@pytest.mark.slow
def test_splash_model_logps_equal_the_unshared_einsums():
  """The whole grouped pass with model.attention_impl "splash" (prompts, completions and
  the vision tower on the kernels, Pallas interpret mode here) against the unshared rows
  on the einsums, at every real completion token."""
  flat, grouped = _both(4)
  splash = CONFIG.replace(attention_impl="splash")
  got, _ = jax.jit(functools.partial(shared_prefix.token_logps, splash, chunk=CHUNK))(
      _params(), grouped)
  want, _ = _logps(flat)
  real = grouped["completion_mask"] > 0  # padding rows differ on the kernels (ignored)
  np.testing.assert_allclose(np.asarray(got)[real], _window(flat)(want)[real], atol=TOL,
                             rtol=0)


def test_groups_split_in_parts_give_the_same_loss_and_gradients():
  """rl.shared_prefix_parts = 2: each group of 4 as two groups of 2, each with its prompt:
  the unshared loss, metrics and gradients still."""
  prompts, comps, adv = _groups(4)
  flat = jax.tree.map(np.asarray, rollout.assemble(prompts, comps, jnp.asarray(adv),
                                                  group_size=4))
  parts = jax.tree.map(np.asarray, rollout.assemble_grouped(prompts, comps,
                                                            jnp.asarray(adv), parts=2))
  assert parts["prompt_ids"].shape[0] == 6 and parts["completion_ids"].shape[0] == 12
  np.testing.assert_array_equal(parts["prompt_ids"][1], prompts["input_ids"][0])
  flat, parts = _with_logps(flat, parts)
  flat.pop("ref_logp"), parts.pop("ref_logp")
  _assert_same(_loss_and_grads(parts, BASE), _loss_and_grads(flat, BASE))



def test_the_shared_recipe_variant():
  """configs/rl.py:<size>:shared: grouped passes, the update's groups in parts with one
  group per batch shard per micro-batch, the log-prob passes on whole groups, sequence
  parallel; the same rollouts and updates per step as the plain recipe."""
  from atlas_jax import config as config_lib
  from configs import rl as rl_recipe
  plain = rl_recipe.get_config("qwen2.5-vl-7b")
  c = rl_recipe.get_config("qwen2.5-vl-7b:shared")
  config_lib.validate(c)
  assert c.model.size == "qwen2.5-vl-7b" and not plain.rl.shared_prefix
  assert (c.rl.shared_prefix, c.rl.shared_prefix_parts, c.rl.sequence_parallel) == (True, 4, True)
  assert c.rl.prompts_per_step * c.rl.shared_prefix_parts // c.optim.grad_accum == \
      c.data.batch_size  # one group per batch shard
  assert config_lib.logprob_micro_batches(c) == 16  # each prompt once, 4 per micro-batch
  assert c.train.steps // c.optim.grad_accum == plain.train.steps // plain.optim.grad_accum
  with pytest.raises(ValueError, match="variant"):
    rl_recipe.get_config("qwen2.5-vl-7b:grouped")
