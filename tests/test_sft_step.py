"""The SFT step's contracts: non-finite skipping, frozen vision, gradient accumulation,
and config validation before any work."""

import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from atlas_jax.model import ModelConfig, TextConfig, VisionConfig, init_params
from atlas_jax.run import optimizer as optimizer_lib
from atlas_jax.config import validate as validate_config
from atlas_jax.sft.update import sft_step
from atlas_jax.run.state import TrainState
from configs import sft as sft_config

CONFIG = ModelConfig(
    vision=VisionConfig(depth=1, hidden_size=32, intermediate_size=48, num_heads=2,
                        out_hidden_size=64, window_size=56, fullatt_block_indexes=(0,)),
    text=TextConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                    num_attention_heads=4, num_key_value_heads=2, mrope_section=(2, 3, 3)),
    image_token_id=120)


def _optim(**kw):
  base = dict(lr=1e-2, warmup_steps=0, total_steps=10, final_lr_fraction=0.1, weight_decay=0.0,
              b1=0.9, b2=0.95, eps=1e-8, clip_norm=1.0, grad_accum=1)
  return ml_collections.ConfigDict(dict(base, **kw))


def _batch(nan=False):
  rng = np.random.default_rng(0)
  ids = rng.integers(0, 110, (2, 16)).astype(np.int32)
  ids[:, 1:5] = CONFIG.image_token_id
  px = rng.normal(size=(2, 16, CONFIG.vision.patch_dim)).astype(np.float32)
  if nan:
    px[0, 0, 0] = np.nan
  from atlas_jax.model import get_rope_index
  grid = np.tile(np.array([[[1, 4, 4]]], np.int32), (2, 1, 1))
  pos, _ = get_rope_index(ids, None, grid.reshape(-1, 3), image_token_id=120,
                          spatial_merge_size=2)
  return dict(input_ids=ids, attention_mask=np.ones_like(ids), loss_mask=np.ones_like(ids),
              position_ids=pos.transpose(1, 0, 2), pixel_values=px, image_grid_thw=grid)


def _run(optim, batches, skip="select"):
  tx = optimizer_lib.make_optimizer(optim)
  state = TrainState.create(init_params(CONFIG, jax.random.key(0)), tx, 0)
  step = jax.jit(functools.partial(sft_step, config=CONFIG, optimizer=tx,
                                   functional_ids=jnp.array([3]), chunk=16, skip=skip))
  history = [state]
  for b in batches:
    state, m = step(state, b)
    history.append(state)
  return history, m


def _same(a, b):
  return all(bool(jnp.array_equal(x, y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.slow
@pytest.mark.parametrize("skip", ["select", "branch"])
def test_non_finite_loss_skips_the_update_and_counts_it(skip):
  """Both ways of keeping the old state (the platforms' choices, `steps.skip_mode`) keep
  params and moments bitwise and apply the same update otherwise (to rounding: they are
  compiled differently, and Adam's first step is about +-lr wherever a gradient is near 0,
  so the bound is a small fraction of lr)."""
  hist, m = _run(_optim(), [_batch(nan=True)], skip)
  assert float(m["skipped_step"]) == 1.0 and int(hist[-1].skipped) == 1
  assert int(hist[-1].step) == 1
  assert _same(hist[-1].params, hist[0].params)
  assert _same(hist[-1].opt_state, hist[0].opt_state)
  hist, m = _run(_optim(), [_batch()], skip)
  assert float(m["skipped_step"]) == 0.0 and not _same(hist[-1].params, hist[0].params)
  other, _ = _run(_optim(), [_batch()], "branch" if skip == "select" else "select")
  for a, b in zip(jax.tree.leaves(hist[-1].params), jax.tree.leaves(other[-1].params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=2e-4)  # 2% of lr 1e-2


def test_frozen_vision_tower_does_not_move():
  frozen = {"trainable": False}
  hist, _ = _run(_optim(vision=frozen, merger=frozen), [_batch(), _batch()])
  assert _same(hist[-1].params["visual"], hist[0].params["visual"])
  assert not _same(hist[-1].params["decoder"], hist[0].params["decoder"])


def test_gradient_accumulation_updates_every_k_micro_batches():
  hist, _ = _run(_optim(grad_accum=2), [_batch(), _batch(), _batch()])
  assert _same(hist[1].params, hist[0].params)       # first micro-batch: accumulate only
  assert not _same(hist[2].params, hist[1].params)   # second: apply
  assert _same(hist[3].params, hist[2].params)


@pytest.mark.parametrize("field, value, match", [
    ("model.size", "qwen9", "config.model.size 'qwen9' is not one of"),
    ("data.length_buckets", (256, 128), "must be strictly increasing"),
    ("train.logprob_chunk", 100, "logprob_chunk 100 must divide every length bucket"),
    ("data.max_patches", 30, "max_patches 30 must be a multiple of 4"),
    ("functional_tokens.init", "random", "functional_tokens.init 'random' is not one of"),
    ("data.train_jsonl", "/nowhere.jsonl", "data.train_jsonl '/nowhere.jsonl' does not exist"),
])
def test_bad_config_stops_with_the_field_named(field, value, match):
  c = sft_config.get_config("tiny")
  group, name = field.split(".")
  c[group][name] = value
  with pytest.raises(ValueError, match=match):
    validate_config(c)


def test_rl_steps_must_fill_whole_rollouts():
  """train.steps counts optimizer micro-steps; each rollout takes inner_updates x grad_accum
  of them, checked before any work."""
  from configs import rl as rl_config
  c = rl_config.get_config("tiny")
  c.rl.inner_updates, c.optim.grad_accum = 2, 2
  c.train.steps = 6
  with pytest.raises(ValueError, match=r"train.steps 6 must be a multiple of rl.inner_updates "
                     r"x optim.grad_accum = 4"):
    validate_config(c)
  c.train.steps = 8
  validate_config(c)


def test_launcher_rejects_an_override_typo(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "launch.train", "--config=configs/sft.py:tiny",
       f"--workdir={tmp_path}", "--config.train.stepz=3"],
      capture_output=True, text=True, timeout=120, cwd=os.path.dirname(os.path.dirname(__file__)),
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode != 0
  assert "stepz" in proc.stderr
  assert not os.listdir(tmp_path)  # nothing was started
