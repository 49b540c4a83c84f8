"""Ahead-of-time compilation of the real-size steps for TPU slices, without TPUs.

libtpu (the `tpu` extra) lets `jax.experimental.topologies` describe a slice such as
"v5e:4x4" on any machine; jitted functions lowered with abstract, sharded arguments over a
mesh of those devices compile for it, and the compiled executable reports its per-chip
memory and FLOPs. Nothing is allocated.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import time

import jax
import jax.numpy as jnp
import ml_collections

from atlas_jax import sharding
from atlas_jax.model import from_size
from atlas_jax.rl import sampler as sampler_lib
from atlas_jax.rl.update import rl_step
from atlas_jax.train import optimizer as optimizer_lib
from atlas_jax.train.sft import sft_step
from atlas_jax.train.state import TrainState

GIB = 2**30
# HBM per chip, GiB (public TPU specs).
HBM_GIB = {"v4": 32, "v5e": 16, "v5litepod": 16, "v5p": 95, "v6e": 32}


@dataclasses.dataclass
class Report:
  size: str
  topology: str
  step: str
  mesh: str
  rows: int
  argument_gib: float
  temp_gib: float
  output_gib: float
  alias_gib: float
  total_gib: float
  hbm_gib: float
  tflops: float
  compile_s: float
  model_tflops: float = 0.0
  attention: str = "xla"

  @property
  def fits(self) -> bool:
    return self.total_gib <= self.hbm_gib


def topology_devices(topology: str):
  """Devices of a TPU slice description, e.g. "v5e:4x4" (needs libtpu)."""
  from jax.experimental import topologies
  return topologies.get_topology_desc(topology, "tpu").devices


def _model_flops(config, step: str, rows: int, length: int, new_tokens: int,
                 n_params: int) -> float:
  """Analytic FLOPs of one step (no rematerialisation): 2 per parameter per token forward,
  6 with the backward pass, plus causal attention scores and mixing (2 x 2 x L x D x T^2/2
  per sequence forward). Vision patches are counted as tokens of the same model."""
  t = config.text
  attention = 2 * t.num_hidden_layers * t.num_attention_heads * t.head_dim * length * length
  if step == "sampler":  # prefill + decode, forward only
    return rows * (2 * n_params * length + attention)
  return rows * 3 * (2 * n_params * length + attention)


def chip_count(topology: str) -> int:
  """Chips in a slice description: "v5e:4x4" -> 16, "v5p:4x4x4" -> 64."""
  return math.prod(int(d) for d in topology.split(":")[1].split("x"))


def default_optim(total_steps: int = 1000):
  o = ml_collections.ConfigDict(dict(
      lr=1e-5, warmup_steps=10, total_steps=total_steps, final_lr_fraction=0.1,
      weight_decay=0.01, b1=0.9, b2=0.95, eps=1e-8, clip_norm=1.0, grad_accum=1,
      freeze_vision=False))
  return o


def default_rl():
  return ml_collections.ConfigDict(dict(
      temperature=1.0, clip_low=0.2, clip_high=0.28, loss_agg="token-mean", beta=0.0,
      kl_estimator="k3", tis_cap=0.0, alpha=0.1, anchor="pg"))


def _abstract(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree,
                      shardings)


def _batch(mesh, shapes: dict):
  return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.batch_sharding(mesh, len(shape)))
          for k, (shape, dtype) in shapes.items()}


def _analyse(compiled, hbm_gib) -> dict:
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  arg, temp = mem.argument_size_in_bytes / GIB, mem.temp_size_in_bytes / GIB
  out, alias = mem.output_size_in_bytes / GIB, mem.alias_size_in_bytes / GIB
  return dict(argument_gib=arg, temp_gib=temp, output_gib=out, alias_gib=alias,
              total_gib=arg + temp + out - alias, hbm_gib=hbm_gib,
              tflops=float(cost.get("flops", 0.0)) / 1e12)


_OOM = re.compile(r"HLO temporaries \(([0-9.]+)([KMGT])\)")


def _shard_bytes(tree) -> int:
  """Per-device bytes of the largest shard of each abstract, sharded array in `tree`."""
  return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
             for x in jax.tree.leaves(tree) if hasattr(x, "sharding"))


def _out_of_memory(error, args, hbm_gib, lowered) -> dict:
  """Report fields for a step the compiler rejected for exceeding HBM: arguments from their
  shardings, temporaries from the compiler's message; re-raises any other error."""
  m = _OOM.search(str(error))
  if "RESOURCE_EXHAUSTED" not in str(error) or not m:
    raise error
  temp = float(m.group(1)) * 1024 ** ("KMGT".index(m.group(2)) + 1) / GIB
  arg = _shard_bytes(args) / GIB
  flops = (lowered.cost_analysis() or {}).get("flops", 0.0)
  return dict(argument_gib=arg, temp_gib=temp, output_gib=0.0, alias_gib=0.0,
              total_gib=arg + temp, hbm_gib=hbm_gib, tflops=float(flops) / 1e12)


def compile_steps(size: str, topology: str, *, mesh_shape: dict, batch: int, length: int,
                  patches: int, new_tokens: int, steps=("sft", "la-grpo", "sampler"),
                  remat: str = "dots_no_batch", chunk: int = 512, group_size: int = 8,
                  attention_chunk: int = 0, attention_impl: str = "xla",
                  sampler_prompts: int | None = None, devices=None,
                  hbm_gib: float | None = None) -> list[Report]:
  """Compiles the chosen steps of one model size for one slice; returns their reports.

  batch: global sequences per step (SFT and LA-GRPO; <= 0: one per batch shard),
  length: tokens per sequence,
  patches: vision patches per sequence (one image), new_tokens: sampler completion length
  (the sampler's prompt length is length - new_tokens). sampler_prompts: prompts per
  rollout call (default: batch / group_size, rounded up to the mesh's data x fsdp batch
  shards, since every shard needs at least one prompt); each yields group_size rows.
  """
  devices = topology_devices(topology) if devices is None else devices
  if hbm_gib is None:
    hbm_gib = HBM_GIB[topology.split(":")[0]]
  mesh = sharding.make_mesh(mesh_shape, devices=devices)
  if batch <= 0:
    batch = mesh.shape["data"] * mesh.shape["fsdp"]
  if attention_impl != "xla":
    attention_chunk = 0  # the kernels never hold [T, S] logits; chunking is the einsum's
  config = from_size(size, dtype="bfloat16", remat=remat, attention_chunk=attention_chunk,
                     attention_impl=attention_impl)
  param_sh = sharding.param_shardings(mesh, config)
  from atlas_jax.model import abstract_params
  n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_params(config)))
  params = _abstract(abstract_params(config), param_sh)
  optimizer = optimizer_lib.make_optimizer(default_optim())
  create = functools.partial(TrainState.create, optimizer=optimizer, seed=0)
  state_shape = jax.eval_shape(create, abstract_params(config))
  state_sh = sharding.state_shardings(mesh, state_shape, param_sh)
  state = _abstract(state_shape, state_sh)
  pd = config.vision.patch_dim
  common = {"input_ids": ((batch, length), jnp.int32),
            "attention_mask": ((batch, length), jnp.int32),
            "pixel_values": ((batch, patches, pd), jnp.float32),
            "image_grid_thw": ((batch, 1, 3), jnp.int32)}
  functional_ids = jnp.arange(5, dtype=jnp.int32)
  mesh_desc = "x".join(f"{k}={v}" for k, v in mesh.shape.items() if v > 1) or "1"
  reports = []
  replicated = sharding.replicated(mesh)

  def run(name, rows, fn, *args, **jit_kwargs):
    t0 = time.perf_counter()
    with sharding.with_rules(mesh, sharding.SAMPLING_RULES if name == "sampler"
                             else sharding.RULES):
      lowered = jax.jit(fn, **jit_kwargs).lower(*args)
      try:
        stats = _analyse(lowered.compile(), hbm_gib)
      except Exception as e:  # the TPU compiler refuses programs that exceed HBM
        stats = _out_of_memory(e, args, hbm_gib, lowered)
    reports.append(Report(size=size, topology=topology, step=name, mesh=mesh_desc, rows=rows,
                          compile_s=time.perf_counter() - t0, attention=attention_impl,
                          model_tflops=_model_flops(config, name, rows, length, new_tokens,
                                                    n_params) / len(devices) / 1e12,
                          **stats))

  if "sft" in steps:
    b = _batch(mesh, dict(common, loss_mask=((batch, length), jnp.int32),
                          position_ids=((batch, 3, length), jnp.int32)))
    run("sft", batch, functools.partial(sft_step, config=config, optimizer=optimizer,
                                 functional_ids=functional_ids, chunk=chunk), state, b,
        out_shardings=(state_sh, replicated), donate_argnums=0)
  if "la-grpo" in steps:
    per_token = ((batch, length), jnp.float32)
    b = _batch(mesh, dict(common, completion_mask=((batch, length), jnp.int32),
                          old_logp=per_token, sampler_logp=per_token,
                          advantages=((batch,), jnp.float32)))
    run("la-grpo", batch, functools.partial(rl_step, config=config, optimizer=optimizer,
                                     rl=default_rl(), functional_ids=functional_ids,
                                     chunk=chunk), state, b,
        out_shardings=(state_sh, replicated), donate_argnums=0)
  if "sampler" in steps:
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    prompts = sampler_prompts or -(-max(batch // group_size, 1) // shards) * shards
    t = length - new_tokens
    settings = sampler_lib.SamplerSettings(max_new_tokens=new_tokens, temperature=1.0,
                                           samples_per_prompt=group_size, stop_ids=(1,))
    allowed = jnp.ones((config.text.vocab_size,), bool)
    p = _batch(mesh, {"input_ids": ((prompts, t), jnp.int32),
                      "attention_mask": ((prompts, t), jnp.int32),
                      "pixel_values": ((prompts, patches, pd), jnp.float32),
                      "image_grid_thw": ((prompts, 1, 3), jnp.int32)})

    def sample(params, batch, rng):
      state = sampler_lib.prefill(config, params, batch["input_ids"], batch["attention_mask"],
                                  batch["pixel_values"], batch["image_grid_thw"], rng, allowed,
                                  settings)
      return sampler_lib.decode(config, params, state, allowed, settings).tokens

    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=replicated)
    run("sampler", prompts * group_size, sample, params, p, key)
  return reports


def format_table(reports: list[Report]) -> str:
  head = (f"{'size':<16}{'slice':<10}{'step':<9}{'attn':<7}{'mesh':<18}{'rows':>5}{'args':>8}{'temp':>8}"
          f"{'total':>8}{'HBM':>6}{'fits':>6}{'TFLOP':>8}{'compile':>9}")
  lines = [head, "-" * len(head)]
  for r in reports:
    lines.append(f"{r.size:<16}{r.topology:<10}{r.step:<9}{r.attention:<7}{r.mesh:<18}{r.rows:>5}"
                 f"{r.argument_gib:>8.2f}"
                 f"{r.temp_gib:>8.2f}{r.total_gib:>8.2f}{r.hbm_gib:>6.0f}"
                 f"{'yes' if r.fits else 'NO':>6}{r.model_tflops:>8.1f}{r.compile_s:>8.1f}s")
  lines.append("TFLOP: model FLOPs per chip per step (analytic, without remat; XLA's own "
               "count, in the JSON as tflops, sees a scanned layer once).")
  lines.append("attn: model.attention_impl (xla: einsums, query-chunked by "
               "--attention_chunk; splash: Pallas splash kernels, no chunking).")
  lines.append("rows: sequences per step (sampler: prompts x group size). "
               "GiB per chip: args = params + optimizer state + batch (sharded), temp = "
               "activations and scratch, total = args + temp + outputs - donated aliases.")
  return "\n".join(lines)
