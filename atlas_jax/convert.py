"""Hugging Face <-> orbax conversion (the library side of `launch/convert.py`).

An atlas_jax model directory ("ready to train from") holds:
  checkpoints/  an orbax checkpoint whose state has the params (and whose metadata has the
                model config and the functional-token table), as training writes it;
  tokenizer/    the tokenizer with the functional tokens.
A training workdir has the same layout, so both directions accept either.
"""

from __future__ import annotations

import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import optax

from atlas_jax import checkpoint as checkpoint_lib
from atlas_jax import functional_tokens, hf, sharding
from atlas_jax.model import abstract_params, param_shardings
from atlas_jax.model import config as config_lib
from atlas_jax.run import setup
from atlas_jax.run.state import TrainState


def _progress(total: int, label: str):
  """A plain progress line on stderr (works in logs, no extra dependency)."""
  import sys
  count = {"n": 0, "t0": time.time()}

  def tick(key: str):
    count["n"] += 1
    n = count["n"]
    if n == total or n % max(total // 50, 1) == 0:
      sys.stderr.write(f"\r{label}: {n}/{total} tensors ({time.time() - count['t0']:.0f}s) "
                       f"{key[:60]:<60}")
      if n == total:
        sys.stderr.write("\n")
      sys.stderr.flush()
  return tick


def checkpoint_dir(src: str) -> str:
  sub = os.path.join(src, "checkpoints")
  return sub if os.path.isdir(sub) else src


def tokenizer_dir(src: str) -> str:
  for cand in (os.path.join(src, "tokenizer"), os.path.join(os.path.dirname(src.rstrip("/")),
                                                              "tokenizer")):
    if os.path.isfile(os.path.join(cand, "tokenizer_config.json")):
      return cand
  raise FileNotFoundError(f"no tokenizer/ directory next to {src}; expected the one training "
                          "wrote")


def hf_to_orbax(src: str, dst: str, *, dtype: str = "float32",
                add_functional_tokens: bool = True, fsdp: int = -1, tensor: int = 1) -> None:
  """HF directory -> atlas_jax model directory (params only; optimizer state starts fresh).

  The params are born sharded over a data=1 x `fsdp` x `tensor` mesh of every device
  (`setup.load_hf_sharded`: each process reads only its devices' blocks), grow their
  vocabulary sharded and are written by orbax shard by shard: no process holds more than
  its devices' shards plus one layer's slice."""
  from transformers import AutoTokenizer
  mesh = sharding.make_mesh({"data": 1, "fsdp": fsdp, "tensor": tensor})
  config, params = setup.load_hf_sharded(src, mesh, {}, dtype=jnp.dtype(dtype))
  tokenizer = AutoTokenizer.from_pretrained(src, local_files_only=True)
  tokens = functional_tokens.FUNCTIONAL_TOKENS if add_functional_tokens else ()
  params, config, table = functional_tokens.extend_vocab(tokenizer, params, config, tokens)
  state = TrainState.create(params, optax.identity(), seed=0)
  os.makedirs(dst, exist_ok=True)
  if jax.process_index() == 0:
    tokenizer.save_pretrained(os.path.join(dst, "tokenizer"))
  with checkpoint_lib.Checkpointer(os.path.join(dst, "checkpoints"), save_every=1, keep=1,
                                   async_save=False) as ckpt:
    ckpt.save(0, state, data_state=None, force=True,
              extra={"functional_tokens": table.to_json(),
                     "model_config": dataclasses.asdict(config)})


def orbax_to_hf(src: str, dst: str, *, step: int | None = None, dtype: str = "bfloat16",
                max_shard_size: str = "5GB", fsdp: int = -1, tensor: int = 1) -> None:
  """atlas_jax model directory or training workdir -> HF directory.

  The params are restored sharded over a data=1 x `fsdp` x `tensor` mesh of every device
  (orbax reads each device's blocks), then `hf.save` gathers one (per-layer) tensor at a
  time: beside its devices' shards, a process holds at most one whole per-layer tensor
  (the largest, e.g. the embedding or LM head [V, D]) and its converted copy, and process
  0 the safetensors shard being written (`max_shard_size`)."""
  from transformers import AutoTokenizer
  ckpt_dir = checkpoint_dir(src)
  extra = checkpoint_lib.read_extra(ckpt_dir, step)
  if "model_config" not in extra:
    raise ValueError(f"checkpoint in {ckpt_dir} has no model_config metadata; expected one "
                     "written by atlas_jax training or conversion")
  config = config_lib.from_dict(extra["model_config"])
  tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir(src), local_files_only=True)
  for token, tid in extra.get("functional_tokens", {}).items():
    if tokenizer.convert_tokens_to_ids(token) != tid:
      raise ValueError(f"tokenizer in {tokenizer_dir(src)} maps {token} to "
                       f"{tokenizer.convert_tokens_to_ids(token)}; the checkpoint says {tid}")
  mesh = sharding.make_mesh({"data": 1, "fsdp": fsdp, "tensor": tensor})
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          abstract_params(config), param_shardings(mesh, config))
  params = checkpoint_lib.restore_params_only(ckpt_dir, step, abstract)
  total = sum(config.vision.depth if r.per_layer and r.path[0] == "visual" else
              config.text.num_hidden_layers if r.per_layer else 1
              for r in hf.param_table(config))
  hf.save(config, params, tokenizer, dst, dtype=jnp.dtype(dtype), max_shard_size=max_shard_size,
          progress=_progress(total, "export"))
