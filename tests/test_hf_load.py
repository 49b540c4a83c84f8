"""Loading local Hugging Face checkpoints: layouts, sharding, dtypes and broken inputs."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from atlas_jax import hf
from atlas_jax.model import abstract_params, param_axes
from tests import factories as F

NAME = "gqa2_wide_window"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("hf_load"))
  F.save_tiny_hf(NAME, path)
  return path


def _rewrite(src, dst, edit):
  """Copies a single-file checkpoint, applying `edit(tensors) -> tensors`."""
  os.makedirs(dst, exist_ok=True)
  shutil.copy(os.path.join(src, "config.json"), dst)
  tensors = load_file(os.path.join(src, "model.safetensors"))
  save_file(edit(tensors), os.path.join(dst, "model.safetensors"))
  return dst


def _assert_same(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def test_params_match_abstract_shapes_and_carry_axes(saved):
  config, params = hf.load(saved)
  abstract = abstract_params(config)
  assert jax.tree.structure(params) == jax.tree.structure(abstract)
  jax.tree.map(lambda p, a: (p.shape, p.dtype) == (a.shape, a.dtype) or pytest.fail(str(p.shape)),
               params, abstract)
  axes = param_axes(config)
  for spec, leaf in zip(jax.tree.leaves(axes, is_leaf=lambda x: isinstance(
      x, jax.sharding.PartitionSpec)), jax.tree.leaves(params)):
    assert len(spec) == leaf.ndim and all(isinstance(n, (str, type(None))) for n in spec)


def test_values_land_where_the_table_says(saved):
  config, params = hf.load(saved)
  raw = load_file(os.path.join(saved, "model.safetensors"))
  # q_proj of layer 1: HF [N*H, D] -> ours [L, D, N, H].
  q = raw["model.layers.1.self_attn.q_proj.weight"]
  n, h = config.text.num_attention_heads, config.text.head_dim
  np.testing.assert_array_equal(np.asarray(params["decoder"]["layers"]["q"]["kernel"][1]),
                                q.T.reshape(-1, n, h))
  conv = raw["visual.patch_embed.proj.weight"]
  np.testing.assert_array_equal(np.asarray(params["visual"]["patch_embed"]["kernel"]),
                                conv.reshape(conv.shape[0], -1).T)


def test_transformers5_layout_loads_identically(saved, tmp_path):
  def rename(t):
    out = {}
    for k, v in t.items():
      if k.startswith("model."):
        k = "model.language_model." + k[len("model."):]
      elif k.startswith("visual."):
        k = "model." + k
      out[k] = v
    return out
  _, base = hf.load(saved)
  _, params = hf.load(_rewrite(saved, str(tmp_path / "v5"), rename))
  _assert_same(base, params)


def test_sharded_checkpoint_loads_identically(saved, tmp_path):
  model = F.make_hf_model(NAME)
  model.save_pretrained(str(tmp_path), max_shard_size="100KB")
  assert os.path.isfile(tmp_path / "model.safetensors.index.json")
  assert len([f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]) > 1
  _, base = hf.load(saved)
  _, params = hf.load(str(tmp_path))
  _assert_same(base, params)


def test_bf16_checkpoint_loads_and_casts(saved, tmp_path):
  import torch
  model = F.make_hf_model(NAME).to(torch.bfloat16)
  model.save_pretrained(str(tmp_path))
  _, p32 = hf.load(str(tmp_path), dtype=jnp.float32)
  _, p16 = hf.load(str(tmp_path), dtype=jnp.bfloat16)
  leaf32 = p32["embed"]["embedding"]
  assert leaf32.dtype == jnp.float32 and p16["embed"]["embedding"].dtype == jnp.bfloat16
  want = model.model.language_model.embed_tokens.weight.float().detach().numpy()
  np.testing.assert_array_equal(np.asarray(leaf32), want)


def test_loading_places_leaves_with_given_shardings(saved):
  config, _ = hf.load(saved)
  device = jax.devices()[0]
  shardings = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(device),
                           abstract_params(config))
  _, params = hf.load(saved, shardings=shardings)
  assert all(leaf.sharding == jax.sharding.SingleDeviceSharding(device)
             for leaf in jax.tree.leaves(params))


def test_missing_key_names_the_key(saved, tmp_path):
  def drop(t):
    del t["model.layers.2.mlp.up_proj.weight"]
    return t
  path = _rewrite(saved, str(tmp_path / "missing"), drop)
  with pytest.raises(ValueError, match=r"missing 1 tensor.*'model\.layers\.2\.mlp\.up_proj\.weight'"
                     r".*expected shape \(128, 64\)"):
    hf.load(path)


def test_wrong_shape_names_key_found_and_expected(saved, tmp_path):
  def shrink(t):
    t["visual.blocks.0.attn.qkv.weight"] = t["visual.blocks.0.attn.qkv.weight"][:-3]
    return t
  path = _rewrite(saved, str(tmp_path / "shape"), shrink)
  with pytest.raises(ValueError, match=r"'visual\.blocks\.0\.attn\.qkv\.weight' has shape "
                     r"\(141, 48\); expected \(144, 48\)"):
    hf.load(path)


def test_unexpected_key_names_the_key(saved, tmp_path):
  def add(t):
    t["model.layers.0.self_attn.rotary.inv_freq"] = np.zeros(4, np.float32)
    return t
  path = _rewrite(saved, str(tmp_path / "extra"), add)
  with pytest.raises(ValueError, match=r"unexpected tensor.*'model\.layers\.0\.self_attn"
                     r"\.rotary\.inv_freq'"):
    hf.load(path)


def test_missing_directory_and_missing_weights_are_clear(tmp_path):
  with pytest.raises(FileNotFoundError, match="config.json does not exist"):
    hf.load(str(tmp_path / "nowhere"))
  (tmp_path / "cfg_only").mkdir()
  with open(tmp_path / "cfg_only" / "config.json", "w") as f:
    json.dump(F.hf_config(NAME).to_dict(), f)
  with pytest.raises(FileNotFoundError, match="neither model.safetensors nor"):
    hf.load(str(tmp_path / "cfg_only"))


def test_flat_config_form_reads_the_same(saved, tmp_path):
  """Published hub configs are flat (text fields at the top level)."""
  from atlas_jax.model import from_hf_dict
  with open(os.path.join(saved, "config.json")) as f:
    nested = json.load(f)
  flat = {k: v for k, v in nested.items() if k != "text_config"}
  text = dict(nested["text_config"])
  rp = text.pop("rope_parameters")
  flat.update(text)
  flat["rope_theta"] = rp["rope_theta"]
  flat["rope_scaling"] = {"type": "mrope", "mrope_section": rp["mrope_section"]}
  a, b = from_hf_dict(nested), from_hf_dict(flat)
  assert a.text == b.text and a.vision == b.vision
  assert a.text.mrope_section == tuple(rp["mrope_section"])


# Shapes whose sharded dims divide an fsdp=4 x tensor=2 mesh (vocab: the tiny tokenizer's).
MESH_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                 num_attention_heads=4, num_key_value_heads=2, mrope_section=[4, 2, 2])
MESH_VISION = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2)

_MESH_SCRIPT = """
import jax, numpy as np
from transformers import AutoTokenizer
from atlas_jax import functional_tokens as ft, hf, sharding
from atlas_jax.model import config as config_lib, param_shardings
path = {path!r}
config, single = hf.load(path)
mesh = sharding.make_mesh(dict(data=1, fsdp=4, tensor=2))
shardings = param_shardings(mesh, config_lib.from_hf_dir(path))
_, sharded = hf.load(path, shardings=shardings)
flat = jax.tree_util.tree_flatten_with_path
for (name, a), b, s in zip(flat(single)[0], jax.tree.leaves(sharded), jax.tree.leaves(shardings)):
  assert b.sharding == s, (name, b.sharding, s)
  assert np.asarray(a).tobytes() == np.asarray(b).tobytes(), name
  for shard in b.addressable_shards:  # each device holds its block, and only that
    assert np.array_equal(np.asarray(shard.data), np.asarray(a)[shard.index]), name
spread = sharded["decoder"]["layers"]["mlp"]["up"]["kernel"]
assert {{len(s.data.reshape(-1)) for s in spread.addressable_shards}} == {{spread.size // 8}}
for init in ("mean", "describe"):
  tok_a = AutoTokenizer.from_pretrained(path, local_files_only=True)
  tok_b = AutoTokenizer.from_pretrained(path, local_files_only=True)
  pa, ca, ta = ft.extend_vocab(tok_a, single, config, init=init)
  pb, cb, tb = ft.extend_vocab(tok_b, sharded, config, init=init)
  assert ca == cb and ta == tb and cb.text.vocab_size > config.text.vocab_size
  grown = param_shardings(mesh, cb)
  for leaf in (("embed", "embedding"), ("lm_head", "kernel")):
    a, b = pa[leaf[0]][leaf[1]], pb[leaf[0]][leaf[1]]
    assert b.sharding == grown[leaf[0]][leaf[1]], (leaf, b.sharding)
    assert np.asarray(a).tobytes() == np.asarray(b).tobytes(), (init, leaf)
print("same")
"""


def test_8_device_load_is_born_sharded_and_bitwise_the_single_device_load(tmp_path):
  """fsdp=4 x tensor=2: every leaf carries its sharding, every device holds exactly its
  block, the values are the single-device load's bitwise, and the vocabulary extension
  grows the sharded embedding and LM head (sharded) to the single-device values."""
  path = write_mesh_model(str(tmp_path / "hf"))
  assert "same" in run_8_devices(_MESH_SCRIPT.format(path=path))


def write_mesh_model(path: str) -> str:
  """A random HF directory (with the tiny tokenizer) whose dims divide fsdp=8 and
  fsdp=4 x tensor=2, with too few spare vocabulary rows for the functional tokens."""
  from atlas_jax import random_checkpoint
  from atlas_jax.data.tokenizer import build_tokenizer
  tok = build_tokenizer(path)
  ids = {k: tok.convert_tokens_to_ids(t) for k, t in [
      ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
      ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>")]}
  vocab = len(tok) + len(tok) % 2  # divisible by tensor=2
  cfg = random_checkpoint.hf_config(dict(MESH_TEXT, vocab_size=vocab), MESH_VISION, **ids)
  random_checkpoint.write(path, cfg, seed=3)
  return path


def run_8_devices(script: str) -> str:
  """Runs `script` in a Python with 8 CPU devices; returns its stdout (fails on an error)."""
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=F.xla_flags(8), PYTHONPATH=root)
  proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                        env=env, timeout=300, cwd=root)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout


def test_truncated_file_stops_before_any_tensor_is_read(saved, tmp_path):
  path = _rewrite(saved, str(tmp_path / "cut"), lambda t: t)
  weights = os.path.join(path, "model.safetensors")
  with open(weights, "r+b") as f:
    f.truncate(os.path.getsize(weights) - 100)
  with pytest.raises(ValueError, match=r"the file is truncated or its header inconsistent"):
    hf.load(path)
