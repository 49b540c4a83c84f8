"""Run in a subprocess with 8 fake CPU devices: the same computation on several meshes.

Compared per mesh against one device: the forward logits, two SFT steps, two LA-GRPO
updates (alpha 0.1, functional tokens in the completions) and greedy sampling with the KV
cache (tokens must be identical). Prints one JSON object: for each mesh, the max abs
difference of each result against the single-device result. Used by
tests/test_multidevice.py.
"""

import functools
import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from atlas_jax import sharding  # noqa: E402
from atlas_jax.model import forward, init_params  # noqa: E402
from tests import factories  # noqa: E402
from atlas_jax.train import optimizer as optimizer_lib  # noqa: E402
from atlas_jax.train.sft import sft_step  # noqa: E402
from atlas_jax.train.state import TrainState  # noqa: E402
from atlas_jax.rl.sampler import Sampler, SamplerSettings  # noqa: E402
from atlas_jax.rl.update import rl_step, token_logps  # noqa: E402

CONFIG = factories.tiny_model_config()
MESHES = {"1": None, "fsdp=8": dict(data=1, fsdp=8, tensor=1),
          "data=2,fsdp=4": dict(data=2, fsdp=4, tensor=1),
          "fsdp=4,tensor=2": dict(data=1, fsdp=4, tensor=2)}
OPTIM = ml_collections.ConfigDict(dict(
    lr=1e-2, warmup_steps=1, total_steps=10, final_lr_fraction=0.1, weight_decay=0.01, b1=0.9,
    b2=0.95, eps=1e-3, clip_norm=1.0, grad_accum=1, freeze_vision=False))
# eps 1e-3, not 1e-8: Adam divides by sqrt(v) + eps, which would turn fp32 rounding noise
# on near-zero gradients (different reduction orders per mesh) into full-size steps.


def batch():
  rng = np.random.default_rng(0)
  b, t, n_img = 8, 32, 4  # each sample: one 4x4-patch image -> 4 image tokens
  ids = rng.integers(0, 240, (b, t)).astype(np.int32)
  ids[:, 2:2 + n_img] = CONFIG.image_token_id
  mask = np.ones((b, t), np.int32)
  mask[1, :5] = 0  # one left-padded row
  grid = np.tile(np.array([[[1, 4, 4]]], np.int32), (b, 1, 1))
  px = rng.normal(size=(b, 16, CONFIG.vision.patch_dim)).astype(np.float32)
  from atlas_jax.model import get_rope_index
  pos, _ = get_rope_index(ids, mask, grid.reshape(-1, 3), image_token_id=CONFIG.image_token_id,
                          spatial_merge_size=2)
  loss_mask = (rng.random((b, t)) < 0.5).astype(np.int32) * mask
  return dict(input_ids=ids, attention_mask=mask, loss_mask=loss_mask,
              position_ids=pos.transpose(1, 0, 2), pixel_values=px, image_grid_thw=grid)


FUNCTIONAL = (7, 9)
RL = ml_collections.ConfigDict(dict(
    temperature=1.0, clip_low=0.2, clip_high=0.28, loss_agg="token-mean", beta=0.0,
    kl_estimator="k3", tis_cap=0.0, alpha=0.1, anchor="pg"))


def rl_batch(params):
  """8 rollouts: the image prompt of `batch()` (16 tokens) + 16 completion tokens, with
  functional ids in the completions; old/sampler log-probs from one-device params."""
  b = batch()
  rng = np.random.default_rng(1)
  r, t, n = 8, 32, 16
  ids = np.concatenate([b["input_ids"], rng.integers(10, 240, (r, n)).astype(np.int32)], 1)
  ids[np.arange(r), t + rng.integers(0, n, r)] = np.array(FUNCTIONAL)[np.arange(r) % 2]
  completion = np.zeros((r, t + n), np.int32)
  for i in range(r):
    completion[i, t:t + 8 + i] = 1
  out = dict(input_ids=ids, attention_mask=np.concatenate([b["attention_mask"], completion[:, t:]], 1),
             completion_mask=completion, pixel_values=b["pixel_values"],
             image_grid_thw=b["image_grid_thw"],
             advantages=np.array([1.0, -1.0, 0.5, -0.5, 1.2, -0.8, 0.3, -0.7], np.float32))
  logp, _ = token_logps(CONFIG, params, out, chunk=16)
  out["old_logp"] = out["sampler_logp"] = np.asarray(logp)
  return out


def run(mesh_shape):
  devices = jax.devices()[:1] if mesh_shape is None else jax.devices()
  mesh = sharding.make_mesh(mesh_shape or dict(data=1, fsdp=1, tensor=1), devices=devices)
  param_sh = sharding.param_shardings(mesh, CONFIG)
  params = jax.jit(lambda: init_params(CONFIG, jax.random.key(0)), out_shardings=param_sh)()
  optimizer = optimizer_lib.make_optimizer(OPTIM)
  create = functools.partial(TrainState.create, optimizer=optimizer, seed=0)
  state_sh = sharding.state_shardings(mesh, jax.eval_shape(create, params), param_sh)
  state = jax.jit(create, out_shardings=state_sh)(params)
  host = batch()
  dev = {k: jax.device_put(v, sharding.batch_sharding(mesh, v.ndim)) for k, v in host.items()}
  out = {}
  with sharding.with_rules(mesh):
    logits = jax.jit(forward, static_argnums=0)(
        CONFIG, state.params, dev["input_ids"], dev["attention_mask"], dev["pixel_values"],
        dev["image_grid_thw"], jnp.transpose(dev["position_ids"], (1, 0, 2)))
    out["logits"] = np.asarray(logits) * host["attention_mask"][..., None]
    step = jax.jit(functools.partial(sft_step, config=CONFIG, optimizer=optimizer,
                                     functional_ids=jnp.array([7, 9]), chunk=16),
                   out_shardings=(state_sh, sharding.replicated(mesh)), donate_argnums=0)
    for _ in range(2):
      state, metrics = step(state, dev)
  out["loss"] = np.asarray(metrics["loss"])

  # LA-GRPO: two updates from fresh state on the same rollouts (re-initialised params:
  # the SFT steps donated the buffers `params` may share).
  params = jax.jit(lambda: init_params(CONFIG, jax.random.key(0)), out_shardings=param_sh)()
  state = jax.jit(create, out_shardings=state_sh)(
      jax.tree.map(jnp.copy, params))
  rl_host = rl_batch(jax.device_get(params))
  rl_dev = {k: jax.device_put(v, sharding.batch_sharding(mesh, v.ndim))
            for k, v in rl_host.items()}
  with sharding.with_rules(mesh):
    update = jax.jit(functools.partial(rl_step, config=CONFIG, optimizer=optimizer, rl=RL,
                                       functional_ids=jnp.array(FUNCTIONAL), chunk=16),
                     out_shardings=(state_sh, sharding.replicated(mesh)), donate_argnums=0)
    for _ in range(2):
      state, rl_metrics = update(state, rl_dev)
  out["rl_loss"] = np.asarray(rl_metrics["loss"])
  out["rl_anchor"] = np.asarray(rl_metrics["anchor_loss"])
  out["rl_params"] = np.concatenate([np.ravel(x) for x in jax.tree.leaves(jax.device_get(
      state.params))])

  # Greedy sampling with the KV cache, prompts = the image prompts of `batch()`.
  allowed = np.ones(CONFIG.text.vocab_size, bool)
  allowed[CONFIG.image_token_id] = False
  sampler = Sampler(CONFIG, SamplerSettings(max_new_tokens=8, greedy=True, stop_ids=(3,)),
                    allowed)
  prompts = {k: dev[k] for k in ("input_ids", "attention_mask", "pixel_values",
                                 "image_grid_thw")}
  with sharding.with_rules(mesh, sharding.SAMPLING_RULES):
    sampled = sampler.sample(params, prompts, jax.random.key(0))
  out["sample_tokens"] = np.asarray(sampled["tokens"])
  out["sample_logps"] = np.asarray(sampled["logps"])
  out["sample_mask"] = np.asarray(sampled["mask"])
  out["params"] = np.concatenate([np.ravel(x) for x in jax.tree.leaves(jax.device_get(
      state.params))])
  q = state.params["decoder"]["layers"]["q"]["kernel"]
  out["q_shard_shape"] = list(q.addressable_shards[0].data.shape)
  return out


def main():
  results = {name: run(shape) for name, shape in MESHES.items()}
  ref = results["1"]
  report = {}
  for name, r in results.items():
    report[name] = {k: float(np.max(np.abs(r[k] - ref[k])))
                    for k in ("logits", "loss", "params", "rl_loss", "rl_params",
                              "sample_logps")}
    report[name]["sample_token_mismatches"] = int((r["sample_tokens"] != ref["sample_tokens"]).sum())
    report[name]["sampled_tokens"] = int(r["sample_mask"].sum())
    report[name]["rl_loss_value"] = float(r["rl_loss"])
    report[name]["rl_anchor_value"] = float(r["rl_anchor"])
    report[name]["q_shard_shape"] = r["q_shard_shape"]
    report[name]["loss_value"] = float(r["loss"])
  json.dump(report, sys.stdout)


if __name__ == "__main__":
  main()
