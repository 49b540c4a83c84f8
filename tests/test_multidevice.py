"""Same results on 1 device and on 8 fake CPU devices under several meshes (subprocess)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from atlas_jax import sharding
from tests import factories

HERE = os.path.dirname(__file__)


@pytest.fixture(scope="module")
def report():
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=factories.xla_flags(8),
             PYTHONPATH=os.path.dirname(HERE))
  proc = subprocess.run([sys.executable, os.path.join(HERE, "multidevice_check.py")],
                        capture_output=True, text=True, env=env, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("mesh", ["fsdp=8", "data=2,fsdp=4", "fsdp=4,tensor=2"])
def test_forward_and_sft_steps_match_single_device(report, mesh):
  r = report[mesh]
  print(f"\n[mesh {mesh}] logits {r['logits']:.1e} loss {r['loss']:.1e} params {r['params']:.1e}")
  assert r["logits"] < 1e-5
  assert r["loss"] < 1e-5
  # Two AdamW steps at lr 1e-2: Adam divides by sqrt(v), which turns ~1e-7 gradient
  # differences on near-zero gradients into visible update differences; 1e-4 is 1% of a step.
  assert r["params"] < 1e-4
  assert report["1"]["loss_value"] > 0


@pytest.mark.slow
def test_single_device_rl_and_sampling_runs_are_not_degenerate(report):
  """What the mesh comparisons below compare is a real update and real sampling."""
  one = report["1"]
  print(f"\n[one device] LA-GRPO losses {one['rl_loss_value']} anchor "
        f"{one['rl_anchor_value']} ratio_mean {one['rl_ratio_mean_value']}, params moved up "
        f"to {one['rl_params_moved']:.1e} (median {one['rl_params_moved_median']:.1e}); "
        f"sampling {one['sampled_non_stop_tokens']} non-stop tokens of "
        f"{one['sampled_tokens']}, {one['sampled_distinct_tokens']} distinct; seconds "
        f"{one['seconds']}")
  losses = np.array(one["rl_loss_value"])
  assert np.all(np.isfinite(losses)) and np.all(np.abs(losses) > 1e-3)
  assert one["rl_skipped_steps"] == 0
  # The anchor is live: every completion has one functional token. Its value is 0 at the
  # first step by construction (ratios 1, one token per row, advantages summing to 0), and
  # at the second every functional ratio is clipped (-0.18 = -(1.28 * 3 - 0.8 * 3) / 8), but
  # its first-step gradient, alpha * -adv * dlogp, is not zero: it is in the gradient norm
  # and the params compared below. A nonzero second value shows the positions are found.
  assert one["rl_functional_positions"] == 8
  assert abs(one["rl_anchor_value"][1]) > 1e-2
  # The first update changed the model: the second step's ratios are no longer all 1.
  assert abs(one["rl_ratio_mean_value"][1] - 1.0) > 1e-3
  # Params moved by far more than the tolerance on their mesh differences below.
  assert one["rl_params_moved"] > 100 * 1e-4 and one["rl_params_moved_median"] > 1e-3
  # Greedy sampling produced real, varied tokens (not all stop or one repeated id).
  assert one["sampled_non_stop_tokens"] >= 32 and one["sampled_distinct_tokens"] >= 8


@pytest.mark.slow
@pytest.mark.parametrize("mesh", ["fsdp=8", "data=2,fsdp=4", "fsdp=4,tensor=2"])
def test_la_grpo_update_matches_single_device(report, mesh):
  r = report[mesh]
  print(f"\n[mesh {mesh}] LA-GRPO loss {r['rl_loss']:.1e} pg {r['rl_pg_loss']:.1e} anchor "
        f"{r['rl_anchor_loss']:.1e} grad_norm {r['rl_grad_norm']:.1e} params "
        f"{r['rl_params']:.1e}; seconds {r['seconds']}")
  assert r["rl_skipped_steps"] == 0 and r["rl_functional_positions"] == 8
  # fp32, losses of order 0.1 and a gradient norm of order 1: different reduction orders
  # per mesh give ~1e-7; 1e-5 is as for the SFT loss and logits.
  for key in ("rl_loss", "rl_pg_loss", "rl_anchor_loss", "rl_grad_norm"):
    assert r[key] < 1e-5, key
  # As for SFT: two AdamW steps at lr 1e-2 (params move by ~1e-2, see above); 1e-4 is 1%
  # of a step.
  assert r["rl_params"] < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("mesh", ["fsdp=8", "data=2,fsdp=4", "fsdp=4,tensor=2"])
def test_greedy_sampling_matches_single_device(report, mesh):
  r = report[mesh]
  print(f"\n[mesh {mesh}] sampling: {r['sample_token_mismatches']} token mismatches of "
        f"{r['sampled_tokens']}, log-probs {r['sample_logps']:.1e}")
  # Greedy decoding is deterministic: identical tokens (and stops) on every mesh.
  assert r["sample_token_mismatches"] == 0 and r["sample_mask_mismatches"] == 0
  # fp32 log-softmax of logits that agree to ~5e-7 (see the forward check): 1e-5 as there.
  assert r["sample_logps"] < 1e-5
  # Weights sharded over fsdp: the decode takes them one layer at a time (per token), and
  # reads them where they lie (sharding.DECODE_RULES): no all-gather in it assembles even
  # one layer's q kernel (the smallest matrix), as the prefill's do (training layout).
  assert r["decode_one_layer_at_a_time"] and not report["1"]["decode_one_layer_at_a_time"]
  assert r["prefill_largest_gather"] >= r["q_layer_gathered"] > r["decode_largest_gather"], r


@pytest.mark.slow
def test_params_are_actually_sharded(report):
  # q kernel [layers=2, embed=64, heads=4, head_dim=16]: embed over fsdp, heads over tensor.
  assert report["1"]["q_shard_shape"] == [2, 64, 4, 16]
  assert report["fsdp=8"]["q_shard_shape"] == [2, 8, 4, 16]
  assert report["data=2,fsdp=4"]["q_shard_shape"] == [2, 16, 4, 16]
  assert report["fsdp=4,tensor=2"]["q_shard_shape"] == [2, 16, 2, 16]


@pytest.mark.slow
def test_activation_constraints_and_sampled_rows_follow_the_mesh(report):
  # sharding.constrain on [8, 4, 16] (activation_batch, activation_length, activation_mlp):
  # rows over data x fsdp, features over tensor. Dropped, it would stay whole on each device.
  assert report["1"]["constrained_shard_shape"] == [8, 4, 16]
  assert report["fsdp=8"]["constrained_shard_shape"] == [1, 4, 16]
  assert report["data=2,fsdp=4"]["constrained_shard_shape"] == [1, 4, 16]
  assert report["fsdp=4,tensor=2"]["constrained_shard_shape"] == [2, 4, 8]
  # The sampler's tokens stay over the batch shards (each process reads back its own rows).
  rows, new = report["1"]["sample_tokens_shard_shape"]
  assert report["fsdp=8"]["sample_tokens_shard_shape"] == [rows // 8, new]
  assert report["fsdp=4,tensor=2"]["sample_tokens_shard_shape"] == [rows // 4, new]


def test_mesh_shape_errors_are_clear():
  with pytest.raises(ValueError, match="mesh data=2 x fsdp=3 x tensor=1 needs 6 devices, "
                     "found 8"):
    sharding.resolve_mesh_shape(dict(data=2, fsdp=3, tensor=1), 8)
  with pytest.raises(ValueError, match="cannot fill 8 devices"):
    sharding.resolve_mesh_shape(dict(data=3, fsdp=-1, tensor=1), 8)
  assert sharding.resolve_mesh_shape(dict(data=2, fsdp=-1, tensor=2), 8) == dict(
      data=2, fsdp=2, tensor=2)


def test_indivisible_model_dims_name_the_leaf():
  import jax
  from atlas_jax.model import ModelConfig, TextConfig
  config = ModelConfig(text=TextConfig(vocab_size=256, hidden_size=64, intermediate_size=96,
                                       num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=2, mrope_section=(2, 3, 3)))
  mesh = jax.sharding.Mesh(
      __import__("numpy").asarray(jax.devices()[:1] * 1).reshape(1, 1, 1), sharding.AXES)
  fake = type("M", (), {"shape": {"data": 1, "fsdp": 1, "tensor": 4}})()
  specs = {"k": jax.sharding.PartitionSpec("embed", "kv_heads", "head_dim")}
  shapes = {"k": jax.ShapeDtypeStruct((64, 2, 16), "float32")}
  with pytest.raises(ValueError, match=r"k dim 1 \(size 2\) is not divisible by mesh axes "
                     r"\('tensor',\) = 4"):
    sharding.logical_to_shardings(fake, specs, shapes=shapes)
  del config, mesh
