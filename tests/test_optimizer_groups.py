"""Per-module optimisation: each group (vision tower, merger, LLM) moves at its own rate, a
zero rate or a frozen group leaves it bitwise unchanged, bfloat16 moments train, and a
checkpoint keeps (and checks) the grouping."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from atlas_jax.config import OPTIM_GROUPS
from atlas_jax import checkpoint as checkpoint_lib
from atlas_jax import sharding
from atlas_jax.functional_tokens import TokenTable
from atlas_jax.model import init_params, param_shardings
from atlas_jax.run import metrics as metrics_lib
from atlas_jax.run import optimizer as optimizer_lib
from atlas_jax.run import setup as run_lib
from atlas_jax.config import validate as validate_config
from atlas_jax.sft.update import sft_step
from atlas_jax.run.state import TrainState
from configs import sft as sft_config
from tests.test_sft_step import CONFIG, _batch

LR = 1e-2


def _optim(**groups):
  """A constant-rate optim group (no warmup, no decay) with the given group settings."""
  base = dict(lr=LR, warmup_steps=0, total_steps=10, final_lr_fraction=1.0, weight_decay=0.1,
              b1=0.9, b2=0.95, eps=1e-8, clip_norm=1.0, grad_accum=1, moments_dtype="float32")
  for name in OPTIM_GROUPS:
    base[name] = dict(dict(trainable=True, lr_scale=1.0), **groups.pop(name, {}))
  return ml_collections.ConfigDict(dict(base, **groups))


def _train(optim, steps: int):
  """(initial state, final state, losses) of `steps` SFT steps on one batch."""
  tx = optimizer_lib.make_optimizer(optim)
  first = TrainState.create(init_params(CONFIG, jax.random.key(0)), tx, 0)
  step = jax.jit(functools.partial(sft_step, config=CONFIG, optimizer=tx,
                                   functional_ids=jnp.array([3]), chunk=16))
  state, losses, batch = first, [], _batch()
  for _ in range(steps):
    state, m = step(state, batch)
    losses.append(float(m["loss"]))
  return first, state, losses


def _by_group(tree) -> dict[str, list]:
  labels = jax.tree.leaves(optimizer_lib.param_groups(tree))
  out = {name: [] for name in OPTIM_GROUPS}
  for label, leaf in zip(labels, jax.tree.leaves(tree)):
    out[label].append(np.asarray(leaf))
  return out


def test_groups_split_the_tower_the_merger_and_the_llm():
  labels = optimizer_lib.param_groups(init_params(CONFIG, jax.random.key(0)))
  assert {labels["visual"][k]["kernel"] for k in ("merger_fc1", "merger_fc2")} == {"merger"}
  assert labels["visual"]["merger_norm"]["scale"] == "merger"
  assert set(jax.tree.leaves(labels["visual"]["blocks"])) == {"vision"}
  assert labels["visual"]["patch_embed"]["kernel"] == "vision"
  assert labels["embed"]["embedding"] == labels["lm_head"]["kernel"] == "llm"
  assert set(jax.tree.leaves(labels["decoder"])) == {"llm"}


def test_each_group_moves_by_its_own_rate():
  """Adam's first update is lr x g / (|g| + eps): each leaf moves by its group's rate
  (where its gradient is not ~0), and a scaled group moves by scale x the unscaled move."""
  scales = {"vision": 0.1, "merger": 0.5, "llm": 2.0}
  start, base, _ = _train(_optim(weight_decay=0.0), 1)
  _, scaled, _ = _train(_optim(weight_decay=0.0,
                               **{g: {"lr_scale": s} for g, s in scales.items()}), 1)
  p0, p1, p2 = (_by_group(s.params) for s in (start, base, scaled))
  for group, scale in scales.items():
    unscaled = [b - a for a, b in zip(p0[group], p1[group])]
    moved = [b - a for a, b in zip(p0[group], p2[group])]
    biggest = max(float(np.abs(d).max()) for d in moved)
    np.testing.assert_allclose(biggest, LR * scale, rtol=1e-3, err_msg=group)
    for u, d in zip(unscaled, moved):
      np.testing.assert_allclose(d, scale * u, rtol=1e-3, atol=1e-6, err_msg=group)


def _bits(leaves) -> list[bytes]:
  return [x.tobytes() for x in leaves]


@pytest.mark.parametrize("moments", ["float32", "bfloat16"])
def test_a_zero_rate_or_a_frozen_group_stays_bitwise_unchanged(moments):
  optim = _optim(vision={"lr_scale": 0.0}, merger={"trainable": False}, moments_dtype=moments)
  start, end, _ = _train(optim, 3)  # weight decay 0.1: decay must not move them either
  p0, p1 = _by_group(start.params), _by_group(end.params)
  assert _bits(p1["vision"]) == _bits(p0["vision"])
  assert _bits(p1["merger"]) == _bits(p0["merger"])
  assert _bits(p1["llm"]) != _bits(p0["llm"])
  # A frozen group holds no moments: mu and nu exist for the vision and llm leaves only.
  moments_held = [x for x in jax.tree.leaves(end.opt_state) if x.ndim > 0]
  trainable = len(p0["vision"]) + len(p0["llm"])
  assert len(moments_held) == 2 * trainable


def test_bfloat16_moments_are_stored_in_bfloat16_and_train():
  _, f32, f32_losses = _train(_optim(), 8)
  _, bf16, losses = _train(_optim(moments_dtype="bfloat16"), 8)
  moments = [x for x in jax.tree.leaves(bf16.opt_state) if x.ndim > 0]
  assert moments and {x.dtype for x in moments} == {jnp.dtype(jnp.bfloat16)}
  assert {x.dtype for x in jax.tree.leaves(f32.opt_state) if x.ndim > 0} == {
      jnp.dtype(jnp.float32)}
  assert {x.dtype for x in jax.tree.leaves(bf16.params)} == {jnp.dtype(jnp.float32)}
  print(f"\n[moments] loss fp32 {f32_losses[0]:.3f} -> {f32_losses[-1]:.3f}, "
        f"bf16 -> {losses[-1]:.3f}")
  assert losses[-1] < 0.7 * losses[0]
  assert abs(losses[-1] - f32_losses[-1]) < 0.1 * f32_losses[0]


def test_moments_of_a_group_take_the_params_shardings():
  params = init_params(CONFIG, jax.random.key(0))
  tx = optimizer_lib.make_optimizer(_optim(vision={"trainable": False}))
  mesh = sharding.make_mesh(dict(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
  param_sh = param_shardings(mesh, CONFIG)
  abstract = jax.eval_shape(lambda p: TrainState.create(p, tx, 0), params)
  state_sh = sharding.state_shardings(mesh, abstract, param_sh)
  q_spec = param_sh["decoder"]["layers"]["q"]["kernel"].spec
  assert any(s["decoder"]["layers"]["q"]["kernel"].spec == q_spec
             for s in _moment_trees(state_sh.opt_state))


def _moment_trees(opt_state) -> list[dict]:
  """The params-shaped dicts (mu, nu) inside an optax state."""
  is_params = lambda x: isinstance(x, dict) and "decoder" in x
  return [x for x in jax.tree.leaves(opt_state, is_leaf=is_params) if is_params(x)]


def _run(tmp_path, **groups):
  """A Run around a tiny model whose config has the given optimizer settings."""
  c = sft_config.get_config("tiny")
  for name, fields in groups.items():
    if name == "moments_dtype":
      c.optim.moments_dtype = fields
    else:
      for field, value in fields.items():
        c.optim[name][field] = value
  mesh = sharding.make_mesh(dict(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path / "checkpoints"), save_every=1, keep=2,
                                     async_save=False)
  run = run_lib.Run(c, str(tmp_path), mesh, None, CONFIG, TokenTable({"<|Manip|>": 3}), {},
                    metrics_lib.MetricWriter(str(tmp_path)), ckpt)
  optimizer = optimizer_lib.make_optimizer(run_lib.resolve_optim(c))
  state, state_sh = run_lib.create_state(run, init_params(CONFIG, jax.random.key(0)),
                                         optimizer)
  step = jax.jit(functools.partial(sft_step, config=CONFIG, optimizer=optimizer,
                                   functional_ids=jnp.array([3]), chunk=16))
  return run, state, state_sh, step


def test_a_checkpoint_restores_the_grouping_and_refuses_another(tmp_path):
  groups = dict(vision={"lr_scale": 0.1}, merger={"trainable": False},
                moments_dtype="bfloat16")
  run, state, state_sh, step = _run(tmp_path, **groups)
  batch = _batch()
  state, _ = step(state, batch)
  run.checkpointer.save(1, state, extra=run_lib.checkpoint_extra(run), force=True)
  assert checkpoint_lib.read_extra(run.checkpointer.directory, 1)["optimizer"] == \
      optimizer_lib.describe(run_lib.resolve_optim(run.config))
  straight, _ = step(state, batch)

  again, fresh, fresh_sh, again_step = _run(tmp_path, **groups)
  restored = run_lib.maybe_restore(again, fresh, fresh_sh, iterator=None)
  assert int(restored.step) == 1
  assert _bits(jax.tree.leaves(restored.opt_state)) == _bits(jax.tree.leaves(state.opt_state))
  resumed, _ = again_step(restored, batch)
  assert _bits(jax.tree.leaves(resumed)) == _bits(jax.tree.leaves(straight))

  for changed in (dict(groups, merger={"trainable": True}),
                  dict(groups, moments_dtype="float32")):
    other, other_state, other_sh, _ = _run(tmp_path, **changed)
    with pytest.raises(ValueError, match="checkpoint at step 1 was trained with trainable "
                       "groups"):
      run_lib.maybe_restore(other, other_state, other_sh, iterator=None)


@pytest.mark.parametrize("group, fields, match", [
    ("vision", dict(trainable=True, lr_scale=-0.5),
     r"config.optim.vision.lr_scale -0.5 must be a number >= 0"),
    ("merger", dict(trainable=1, lr_scale=1.0),
     r"config.optim.merger.trainable 1 must be True or False"),
])
def test_bad_optimizer_groups_stop_with_the_field_named(group, fields, match):
  c = sft_config.get_config("tiny")
  c.optim[group] = ml_collections.ConfigDict(fields)
  with pytest.raises(ValueError, match=match):
    validate_config(c)


def test_an_unknown_moments_dtype_is_refused():
  c = sft_config.get_config("tiny")
  c.optim.moments_dtype = "float16"
  with pytest.raises(ValueError, match=r"config.optim.moments_dtype 'float16' is not one of"):
    validate_config(c)


def test_all_groups_frozen_is_refused():
  c = sft_config.get_config("tiny")
  for name in OPTIM_GROUPS:
    c.optim[name].trainable = False
  with pytest.raises(ValueError, match="nothing would train"):
    validate_config(c)


@pytest.mark.parametrize("max_norm", [0.5, 100.0])
def test_clipping_matches_optax_above_and_below_the_threshold(max_norm):
  """The fused clip (one scalar product) is optax.clip_by_global_norm: within one rounding
  step when it clips, bitwise when the norm is below the threshold."""
  rng = np.random.default_rng(0)
  grads = {"a": jnp.asarray(rng.normal(size=(64, 32)), jnp.float32),
           "b": {"c": jnp.asarray(rng.normal(size=(7,)), jnp.float32)}}
  ours, _ = optimizer_lib.clip_by_global_norm(max_norm).update(grads, optax.EmptyState())
  want, _ = optax.clip_by_global_norm(max_norm).update(grads, optax.EmptyState())
  assert float(optax.global_norm(ours)) == pytest.approx(min(max_norm, float(
      optax.global_norm(grads))), rel=1e-6)
  for o, w in zip(jax.tree.leaves(ours), jax.tree.leaves(want)):
    if max_norm > 50:
      np.testing.assert_array_equal(np.asarray(o), np.asarray(w))
    else:
      np.testing.assert_allclose(np.asarray(o), np.asarray(w), rtol=2e-7, atol=0)
