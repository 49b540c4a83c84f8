"""Run in a subprocess with 8 fake CPU devices: the same computation on several meshes.

Compared per mesh against one device: the forward logits, two SFT steps, two LA-GRPO
updates (alpha 0.1, functional tokens in the completions) and greedy sampling with the KV
cache (tokens must be identical). Prints one JSON object: for each mesh, the max abs
difference of each result against the single-device result. Used by
tests/test_multidevice.py.
"""

import functools
import json
import math
import os
import re
import sys
import time

from tests import factories  # noqa: E402  (numpy only; before jax reads XLA_FLAGS)

os.environ["XLA_FLAGS"] = factories.xla_flags(8)
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from atlas_jax import sharding  # noqa: E402
from atlas_jax.model import forward, init_params, param_shardings  # noqa: E402
from atlas_jax.run import optimizer as optimizer_lib  # noqa: E402
from atlas_jax.sft.update import sft_step  # noqa: E402
from atlas_jax.run.state import TrainState  # noqa: E402
from atlas_jax import sampler as sampler_lib  # noqa: E402
from atlas_jax.sampler import Sampler, SamplerSettings  # noqa: E402
from atlas_jax.rl import grpo  # noqa: E402
from atlas_jax.rl.update import rl_step  # noqa: E402
from atlas_jax.run.logprobs import token_logps  # noqa: E402

CONFIG = factories.tiny_model_config()
MESHES = {"1": None, "fsdp=8": dict(data=1, fsdp=8, tensor=1),
          "data=2,fsdp=4": dict(data=2, fsdp=4, tensor=1),
          "fsdp=4,tensor=2": dict(data=1, fsdp=4, tensor=2)}
OPTIM = ml_collections.ConfigDict(dict(
    lr=1e-2, warmup_steps=1, total_steps=10, final_lr_fraction=0.1, weight_decay=0.01, b1=0.9,
    b2=0.95, eps=1e-3, clip_norm=1.0, grad_accum=1))
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
STOP_IDS = (3,)
RL_SETTINGS = grpo.LossSettings(alpha=0.1)  # clip 0.2 / 0.28, token-mean, no KL, no TIS
# No warmup for the RL updates: with OPTIM's warmup_steps=1 the first update has lr 0, so
# the second would see unchanged params and ratio == 1 everywhere (a loss that hardly
# depends on the model). Here both updates move the params and the second step's loss,
# ratios and clipping depend on the first update.
RL_OPTIM = ml_collections.ConfigDict(dict(OPTIM.to_dict(), warmup_steps=0))


_RL_BATCH = []


def rl_batch(params):
  """8 rollouts: the 32-token image prompts of `batch()` + 16 completion positions (8 + i
  generated tokens in row i, right-padded), one functional id in each completion;
  old/sampler log-probs from `params`. Computed on the first call (the one-device run,
  its initial params) and reused: every mesh gets the same host arrays."""
  if _RL_BATCH:
    return _RL_BATCH[0]
  params = jax.device_get(params)
  b = batch()
  rng = np.random.default_rng(1)
  r, t, n = 8, 32, 16
  ids = np.concatenate([b["input_ids"], rng.integers(10, 240, (r, n)).astype(np.int32)], 1)
  # Inside each row's completion (the first 8 + i positions), so every row has one.
  ids[np.arange(r), t + rng.integers(0, 8, r)] = np.array(FUNCTIONAL)[np.arange(r) % 2]
  completion = np.zeros((r, t + n), np.int32)
  for i in range(r):
    completion[i, t:t + 8 + i] = 1
  out = dict(input_ids=ids, attention_mask=np.concatenate([b["attention_mask"], completion[:, t:]], 1),
             completion_mask=completion, pixel_values=b["pixel_values"],
             image_grid_thw=b["image_grid_thw"],
             advantages=np.array([1.0, -1.0, 0.5, -0.5, 1.2, -0.8, 0.3, -0.7], np.float32))
  logp, _ = jax.jit(functools.partial(token_logps, CONFIG, chunk=16))(params, out)
  out["old_logp"] = out["sampler_logp"] = np.asarray(logp)
  _RL_BATCH.append(out)
  return out


def flat(tree):
  return np.concatenate([np.ravel(x) for x in jax.tree.leaves(jax.device_get(tree))])


def largest_all_gather(hlo: str) -> int:
  """Elements of the largest result of an all-gather in compiled HLO text (0: none)."""
  sizes = [0]
  for line in hlo.splitlines():
    m = re.search(r"=(.*?)\ball-gather(?:-start)?\(", line)
    if m:
      sizes += [math.prod(int(d) for d in dims.split(",") if d)
                for dims in re.findall(r"\w+\[([\d,]*)\]", m.group(1))]
  return max(sizes)


def run(mesh_shape):
  devices = jax.devices()[:1] if mesh_shape is None else jax.devices()
  mesh = sharding.make_mesh(mesh_shape or dict(data=1, fsdp=1, tensor=1), devices=devices)
  param_sh = param_shardings(mesh, CONFIG)
  init = jax.jit(lambda: init_params(CONFIG, jax.random.key(0)), out_shardings=param_sh)
  params = init()
  optimizer = optimizer_lib.make_optimizer(OPTIM)
  create = functools.partial(TrainState.create, optimizer=optimizer, seed=0)
  state_sh = sharding.state_shardings(mesh, jax.eval_shape(create, params), param_sh)
  state = jax.jit(create, out_shardings=state_sh)(params)
  host = batch()
  dev = {k: jax.device_put(v, sharding.batch_sharding(mesh, v.ndim)) for k, v in host.items()}
  out, seconds, start = {}, {}, time.perf_counter()
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
  out["params"] = flat(state.params)
  q = state.params["decoder"]["layers"]["q"]["kernel"]
  out["q_shard_shape"] = list(q.addressable_shards[0].data.shape)
  out["q_shape"] = list(q.shape)
  seconds["forward+sft"] = time.perf_counter() - start

  # LA-GRPO: two updates from a fresh state on the same host rollouts (re-initialised
  # params: the SFT steps donated the buffers `params` may share).
  start = time.perf_counter()
  params = init()
  initial = flat(params)
  rl_optimizer = optimizer_lib.make_optimizer(RL_OPTIM)
  rl_create = functools.partial(TrainState.create, optimizer=rl_optimizer, seed=0)
  rl_state_sh = sharding.state_shardings(mesh, jax.eval_shape(rl_create, params), param_sh)
  state = jax.jit(rl_create, out_shardings=rl_state_sh)(jax.tree.map(jnp.copy, params))
  rl_dev = {k: jax.device_put(v, sharding.batch_sharding(mesh, v.ndim))
            for k, v in rl_batch(params).items()}
  with sharding.with_rules(mesh):
    update = jax.jit(functools.partial(rl_step, config=CONFIG, optimizer=rl_optimizer,
                                       settings=RL_SETTINGS, temperature=1.0,
                                       functional_ids=jnp.array(FUNCTIONAL), chunk=16),
                     out_shardings=(rl_state_sh, sharding.replicated(mesh)), donate_argnums=0)
    rl_metrics = []
    for _ in range(2):
      state, m = update(state, rl_dev)
      rl_metrics.append(jax.device_get(m))
  # Per step: loss, gradient norm (a fingerprint of the whole gradient), and the terms.
  for key in ("loss", "grad_norm", "pg_loss", "anchor_loss", "ratio_mean", "skipped_step",
              "functional_positions"):
    out["rl_" + key] = np.array([float(m[key]) for m in rl_metrics])
  out["rl_params"] = flat(state.params)
  out["rl_params_moved"] = np.abs(out["rl_params"] - initial)
  seconds["la-grpo"] = time.perf_counter() - start

  # Greedy sampling with the KV cache, prompts = the image prompts of `batch()`.
  allowed = np.ones(CONFIG.text.vocab_size, bool)
  allowed[CONFIG.image_token_id] = False
  start = time.perf_counter()
  sampler = Sampler(CONFIG, SamplerSettings(max_new_tokens=8, greedy=True,
                                            stop_ids=STOP_IDS), allowed)
  prompts = {k: dev[k] for k in ("input_ids", "attention_mask", "pixel_values",
                                 "image_grid_thw")}
  with sharding.with_rules(mesh, sharding.RULES):
    sampled = sampler.sample(params, prompts, jax.random.key(0))
  out["sample_tokens_shard_shape"] = list(sampled["tokens"].addressable_shards[0].data.shape)
  out["decode_one_layer_at_a_time"] = sampler_lib.weights_split_over_batch(params)
  # The decode as compiled: the largest array any of its all-gathers assembles.
  with sharding.with_rules(mesh, sharding.RULES):
    state0 = sampler_lib.jit_prefill(CONFIG, params, *prompts.values(), jax.random.key(0),
                                     sampler.allowed, settings=sampler.settings)
    hlo = sampler_lib.jit_decode.lower(
        CONFIG, params, state0, sampler.allowed, settings=sampler.settings,
        one_layer_at_a_time=out["decode_one_layer_at_a_time"]).compile().as_text()
  out["decode_largest_gather"] = largest_all_gather(hlo)
  with sharding.with_rules(mesh, sharding.RULES):
    out["prefill_largest_gather"] = largest_all_gather(sampler_lib.jit_prefill.lower(
        CONFIG, params, *prompts.values(), jax.random.key(0), sampler.allowed,
        settings=sampler.settings).compile().as_text())
  # An activation constraint under the training rules: [8 rows, 4, 16 features].
  with sharding.with_rules(mesh, sharding.RULES):
    constrained = jax.jit(lambda x: sharding.constrain(
        x * 2, ("activation_batch", "activation_length", "activation_mlp")))(np.ones((8, 4, 16)))
  out["constrained_shard_shape"] = list(constrained.addressable_shards[0].data.shape)
  out["sample_tokens"] = np.asarray(sampled["tokens"])
  out["sample_logps"] = np.asarray(sampled["logps"])
  out["sample_mask"] = np.asarray(sampled["mask"])
  seconds["sampling"] = time.perf_counter() - start
  out["seconds"] = seconds
  return out


def main():
  results = {name: run(shape) for name, shape in MESHES.items()}
  ref = results["1"]
  report = {}
  for name, r in results.items():
    # Max abs difference against one device (RL metrics: over both updates).
    report[name] = {k: float(np.max(np.abs(r[k] - ref[k])))
                    for k in ("logits", "loss", "params", "rl_loss", "rl_grad_norm",
                              "rl_pg_loss", "rl_anchor_loss", "rl_params", "sample_logps")}
    report[name]["sample_token_mismatches"] = int((r["sample_tokens"] != ref["sample_tokens"]).sum())
    report[name]["sample_mask_mismatches"] = int((r["sample_mask"] != ref["sample_mask"]).sum())
    # Values of this mesh's run, for the sanity checks (is anything being compared at all).
    tokens, mask = r["sample_tokens"], r["sample_mask"].astype(bool)
    report[name].update(
        loss_value=float(r["loss"]), q_shard_shape=r["q_shard_shape"],
        sample_tokens_shard_shape=r["sample_tokens_shard_shape"],
        decode_one_layer_at_a_time=r["decode_one_layer_at_a_time"],
        decode_largest_gather=r["decode_largest_gather"],
        prefill_largest_gather=r["prefill_largest_gather"],
        # One layer's q kernel on a device once gathered over fsdp: [embed, heads/tensor, H].
        q_layer_gathered=int(r["q_shape"][1] * math.prod(r["q_shard_shape"][2:])),
        constrained_shard_shape=r["constrained_shard_shape"],
        rl_loss_value=r["rl_loss"].tolist(), rl_anchor_value=r["rl_anchor_loss"].tolist(),
        rl_grad_norm_value=r["rl_grad_norm"].tolist(),
        rl_ratio_mean_value=r["rl_ratio_mean"].tolist(),
        rl_skipped_steps=float(r["rl_skipped_step"].sum()),
        rl_functional_positions=float(r["rl_functional_positions"][0]),
        rl_params_moved=float(r["rl_params_moved"].max()),
        rl_params_moved_median=float(np.median(r["rl_params_moved"])),
        sampled_tokens=int(mask.sum()),
        sampled_non_stop_tokens=int((mask & ~np.isin(tokens, STOP_IDS)).sum()),
        sampled_distinct_tokens=int(len(np.unique(tokens[mask]))),
        seconds={k: round(v, 1) for k, v in r["seconds"].items()})
  json.dump(report, sys.stdout)


if __name__ == "__main__":
  main()
