"""A model to evaluate, from a training workdir, an orbax checkpoint directory or a Hugging
Face directory.

  training workdir  <dir>/checkpoints (the latest step) with the tokenizer of <dir>/tokenizer
  orbax directory   the step directories themselves (e.g. <workdir>/checkpoints, or the
                    best checkpoint <workdir>/best), the tokenizer from ../tokenizer
  Hugging Face      config.json + safetensors, the tokenizer from the same directory (the
                    functional tokens are added when it lacks them)

Orbax checkpoints bring the config of the run that saved them (data limits, prompt suffix,
sampling settings); a Hugging Face directory starts from the base config
(`atlas_jax.config.base_config`).
"""

from __future__ import annotations

import dataclasses
import os

import ml_collections

from atlas_jax import checkpoint as checkpoint_lib
from atlas_jax.config import base_config
from atlas_jax.run import setup

_GROUPS = ("model", "tokenizer", "functional_tokens", "data", "rl", "mesh", "eval")


@dataclasses.dataclass
class Model:
  """What the evaluator needs (the fields of a training Run it reads), and the config."""

  config: ml_collections.ConfigDict
  mesh: object
  tokenizer: object
  model_config: object
  table: object


def kind_of(path: str) -> str:
  """"workdir", "orbax" or "hf"; raises naming what was expected."""
  if os.path.isdir(os.path.join(path, "checkpoints")):
    return "workdir"
  if os.path.isfile(os.path.join(path, "config.json")):
    return "hf"
  if os.path.isdir(path) and any(d.isdigit() for d in os.listdir(path)):
    return "orbax"
  raise ValueError(f"--checkpoint {path!r} is not a training workdir (with checkpoints/), an "
                   "orbax checkpoint directory (step sub-directories) or a Hugging Face "
                   "directory (config.json)")


def _merge(base: ml_collections.ConfigDict, saved: dict) -> None:
  """The saved run's values of the groups an evaluation uses, where `base` has the field."""
  for group in _GROUPS:
    for k, v in (saved.get(group) or {}).items():
      if k not in base[group] or isinstance(v, dict):
        continue
      if isinstance(base[group][k], tuple) and isinstance(v, list):
        v = tuple(v)
      base[group][k] = v


def config_for(path: str, *, tokenizer: str = "") -> ml_collections.ConfigDict:
  """The run config an evaluation of `path` starts from (unlocked)."""
  c = base_config()
  kind = kind_of(path)
  if kind == "hf":
    c.model.hf_path = os.path.abspath(path)
    c.tokenizer.path = tokenizer
    return c
  ckpt = os.path.join(path, "checkpoints") if kind == "workdir" else path
  extra = checkpoint_lib.read_extra(ckpt)
  _merge(c, extra.get("config") or {})
  c.model.hf_path = ""
  c.model.init_checkpoint = os.path.abspath(ckpt)
  found = os.path.join(os.path.dirname(os.path.abspath(ckpt)), "tokenizer")
  c.tokenizer.path = tokenizer or found
  if not os.path.isdir(c.tokenizer.path):
    raise ValueError(f"no tokenizer for checkpoint {ckpt}: expected {found} (the tokenizer "
                     "the run saved) or --tokenizer")
  return c


def load(c) -> tuple[Model, object]:
  """(Model, params sharded over the mesh) for a config from `config_for`."""
  setup.maybe_initialize_distributed(c)
  mesh = setup.make_mesh(c)
  tokenizer = setup.load_tokenizer(c, "")
  model_config, params, table = setup.load_model(c, tokenizer, mesh)
  return Model(c, mesh, tokenizer, model_config, table), params
