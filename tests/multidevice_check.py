"""Run in a subprocess with 8 fake CPU devices: the same computation on several meshes.

Prints one JSON object: for each mesh, the max abs difference of each result against the
single-device result. Used by tests/test_multidevice.py.
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

CONFIG = factories.tiny_model_config()
MESHES = {"1": None, "fsdp=8": dict(data=1, fsdp=8, tensor=1),
          "data=2,fsdp=4": dict(data=2, fsdp=4, tensor=1),
          "fsdp=4,tensor=2": dict(data=1, fsdp=4, tensor=2)}
OPTIM = ml_collections.ConfigDict(dict(
    lr=1e-2, warmup_steps=1, total_steps=10, final_lr_fraction=0.1, weight_decay=0.01, b1=0.9,
    b2=0.95, eps=1e-8, clip_norm=1.0, grad_accum=1, freeze_vision=False))


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
    report[name] = {k: float(np.max(np.abs(r[k] - ref[k]))) for k in ("logits", "loss",
                                                                         "params")}
    report[name]["q_shard_shape"] = r["q_shard_shape"]
    report[name]["loss_value"] = float(r["loss"])
  json.dump(report, sys.stdout)


if __name__ == "__main__":
  main()
