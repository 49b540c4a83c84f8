"""Hugging Face export: bitwise round trips, a trained ATLAS model that transformers loads
and runs identically, sharded and multi-device export, and bad inputs."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.numpy import load_file

from atlas_jax import functional_tokens, hf
from atlas_jax.data import chat, image as image_lib
from atlas_jax.model import forward, get_rope_index
from atlas_jax.sampler import allowed_ids
from atlas_jax.sampler import Sampler, SamplerSettings
from tests import factories as F

ROOT = os.path.dirname(os.path.dirname(__file__))


def _tensors(path):
  out = {}
  index = os.path.join(path, "model.safetensors.index.json")
  files = (sorted(set(json.load(open(index))["weight_map"].values())) if os.path.exists(index)
           else ["model.safetensors"])
  for f in files:
    out.update(load_file(os.path.join(path, f)))
  return out


def test_round_trip_reproduces_every_tensor_bitwise(tmp_path):
  src, dst = str(tmp_path / "src"), str(tmp_path / "dst")
  _, tok = F.save_tiny_hf_with_tokenizer(src)
  config, params = hf.load(src)
  hf.save(config, params, tok, dst, dtype=jnp.float32)
  a, b = _tensors(src), _tensors(dst)
  assert set(a) == set(b)
  for k in a:
    assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  exported = json.load(open(os.path.join(dst, "config.json")))
  assert exported["architectures"] == ["Qwen2_5_VLForConditionalGeneration"]
  for f in ("generation_config.json", "tokenizer.json", "preprocessor_config.json"):
    assert os.path.isfile(os.path.join(dst, f)), f


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """HF -> atlas_jax -> functional tokens (vocab grows) -> 3 SFT steps -> HF export."""
  import functools
  import ml_collections
  from atlas_jax.run import optimizer as optimizer_lib
  from atlas_jax.sft.update import sft_step
  from atlas_jax.run.state import TrainState
  root = tmp_path_factory.mktemp("export")
  src, dst = str(root / "src"), str(root / "dst")
  F.save_tiny_hf_with_tokenizer(src)
  from transformers import AutoTokenizer
  tok = AutoTokenizer.from_pretrained(src, local_files_only=True)
  config, params = hf.load(src)
  params, config, table = functional_tokens.extend_vocab(tok, params, config)
  img = Image.new("RGB", (84, 56), "white")
  px, grid = image_lib.preprocess([img])
  out = chat.render(tok, "Which region?", "I outline it.\n<|Shape|>\nDone \\boxed{A}.",
                    image_lib.num_image_tokens(grid).tolist())
  ids = out["input_ids"][None]
  pos, _ = get_rope_index(ids, None, grid, image_token_id=config.image_token_id,
                          spatial_merge_size=2)
  batch = dict(input_ids=ids, attention_mask=np.ones_like(ids), loss_mask=out["loss_mask"][None],
               position_ids=pos.transpose(1, 0, 2), pixel_values=px[None],
               image_grid_thw=grid[None])
  optim = ml_collections.ConfigDict(dict(
      lr=1e-2, warmup_steps=0, total_steps=3, final_lr_fraction=1.0, weight_decay=0.0,
      b1=0.9, b2=0.95, eps=1e-8, clip_norm=1.0, grad_accum=1))
  tx = optimizer_lib.make_optimizer(optim)
  state = TrainState.create(params, tx, 0)
  step = jax.jit(functools.partial(sft_step, config=config, optimizer=tx,
                                   functional_ids=jnp.asarray(table.id_array),
                                   chunk=ids.shape[1]))
  for _ in range(3):
    state, _ = step(state, batch)
  hf.save(config, state.params, tok, dst, dtype=jnp.float32)
  return config, state.params, tok, table, dst, (ids, px, grid)


def test_trained_export_matches_in_transformers(trained):
  from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration
  config, params, tok, table, dst, (ids, px, grid) = trained
  model = Qwen2_5_VLForConditionalGeneration.from_pretrained(dst, dtype=torch.float32,
                                                             local_files_only=True).eval()
  assert model.config.text_config.vocab_size == config.text.vocab_size
  hf_tok = AutoTokenizer.from_pretrained(dst, local_files_only=True)
  text = "Outline.\n<|Shape|>\nCount.\n<|Text|>\n\\boxed{B}"
  enc = hf_tok.encode(text, add_special_tokens=False)
  assert table.ids["<|Shape|>"] in enc
  assert hf_tok.decode(enc + [hf_tok.convert_tokens_to_ids("<|im_end|>")],
                       skip_special_tokens=True) == text
  mask = np.ones_like(ids)
  with torch.no_grad():
    want = model(input_ids=torch.from_numpy(ids.astype(np.int64)),
                 attention_mask=torch.from_numpy(mask.astype(np.int64)),
                 pixel_values=torch.from_numpy(px), image_grid_thw=torch.from_numpy(grid.astype(np.int64)),
                 mm_token_type_ids=torch.from_numpy((ids == config.image_token_id).astype(np.int32))
                 ).logits.numpy()
  got = np.asarray(forward(config, params, ids, mask, px, grid))
  diff = float(np.abs(got - want).max())
  print(f"\n[export] max |logit diff| after vocab growth + SFT = {diff:.2e}")
  assert diff <= 1e-4

  prompt = ids[:, :-12]  # cut the answer; generate it greedily
  pmask = np.ones_like(prompt)
  blocked = [config.image_token_id, config.video_token_id, config.vision_start_token_id,
             config.vision_end_token_id]
  with torch.no_grad():
    gen = model.generate(input_ids=torch.from_numpy(prompt.astype(np.int64)),
                         attention_mask=torch.from_numpy(pmask.astype(np.int64)),
                         pixel_values=torch.from_numpy(px),
                         image_grid_thw=torch.from_numpy(grid.astype(np.int64)),
                         mm_token_type_ids=torch.from_numpy(
                             (prompt == config.image_token_id).astype(np.int32)),
                         max_new_tokens=10, do_sample=False,
                         eos_token_id=hf_tok.convert_tokens_to_ids("<|im_end|>"),
                         pad_token_id=hf_tok.pad_token_id,
                         bad_words_ids=[[b] for b in blocked] +
                         [[i] for i in range(len(hf_tok), config.text.vocab_size)])
  hf_new = gen[0, prompt.shape[1]:].numpy()
  allowed = allowed_ids(hf_tok, config)
  assert not allowed[blocked].any()
  settings = SamplerSettings(max_new_tokens=10, greedy=True,
                             stop_ids=(hf_tok.convert_tokens_to_ids("<|im_end|>"),),
                             pad_id=hf_tok.pad_token_id)
  out = Sampler(config, settings, allowed).sample(
      params, dict(input_ids=prompt, attention_mask=pmask, pixel_values=px[None],
                   image_grid_thw=grid[None]), jax.random.key(0))
  k = int(np.asarray(out["mask"]).sum())
  np.testing.assert_array_equal(np.asarray(out["tokens"])[0, :k], hf_new[:k])


def test_sharded_export_loads_the_same(trained, tmp_path):
  config, params, tok, _, dst, _ = trained
  small = str(tmp_path / "sharded")
  hf.save(config, params, tok, small, dtype=jnp.float32, max_shard_size="60KB")
  index = json.load(open(os.path.join(small, "model.safetensors.index.json")))
  assert len(set(index["weight_map"].values())) > 2
  a, b = _tensors(dst), _tensors(small)
  assert set(a) == set(b)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
  _, reloaded = hf.load(small)
  for x, y in zip(jax.tree.leaves(reloaded), jax.tree.leaves(params)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.slow
def test_export_from_8_devices_equals_single_device(trained, tmp_path):
  _, _, _, _, dst, _ = trained
  script = f"""
import jax, numpy as np
from transformers import AutoTokenizer
from atlas_jax import hf, sharding
from atlas_jax.model import param_shardings
config, params = hf.load({dst!r})
mesh = sharding.make_mesh(dict(data=1, fsdp=8, tensor=1))
params = jax.device_put(params, param_shardings(mesh, config))
assert len(params["decoder"]["layers"]["q"]["kernel"].sharding.device_set) == 8
tok = AutoTokenizer.from_pretrained({dst!r}, local_files_only=True)
hf.save(config, params, tok, {str(tmp_path / 'multi')!r}, dtype=np.float32)
"""
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=F.xla_flags(8),
             PYTHONPATH=ROOT)
  proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  a, b = _tensors(dst), _tensors(str(tmp_path / "multi"))
  assert set(a) == set(b)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])


def test_bad_inputs_stop_with_one_clear_sentence(trained, tmp_path):
  config, params, tok, _, dst, _ = trained
  wrong = dict(params, embed={"embedding": params["embed"]["embedding"][:-128]})
  with pytest.raises(ValueError, match=r"params leaf embed/embedding has shape \(\d+, 64\); the "
                     r"config expects"):
    hf.save(config, wrong, tok, str(tmp_path / "x"))

  def convert(*args):
    return subprocess.run([sys.executable, "-m", "launch.convert", *args], capture_output=True,
                          text=True, cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"),
                          timeout=300)
  proc = convert("--direction=orbax_to_hf", f"--src={tmp_path / 'nowhere'}",
                 f"--dst={tmp_path / 'out'}")
  assert proc.returncode != 0 and "does not exist" in proc.stderr
  (tmp_path / "full").mkdir()
  (tmp_path / "full" / "keep.txt").write_text("x")
  proc = convert("--direction=hf_to_orbax", f"--src={dst}", f"--dst={tmp_path / 'full'}")
  assert proc.returncode != 0 and "is not empty; pass --overwrite" in proc.stderr
  assert (tmp_path / "full" / "keep.txt").exists()


@pytest.mark.slow
def test_convert_round_trip_through_orbax(trained, tmp_path):
  _, params, _, _, dst, _ = trained
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  run = lambda *a: subprocess.run([sys.executable, "-m", "launch.convert", *a], cwd=ROOT, env=env,
                                  capture_output=True, text=True, timeout=300)
  p1 = run("--direction=hf_to_orbax", f"--src={dst}", f"--dst={tmp_path / 'orbax'}",
           "--dtype=float32")
  assert p1.returncode == 0, p1.stderr[-2000:]
  p2 = run("--direction=orbax_to_hf", f"--src={tmp_path / 'orbax'}", f"--dst={tmp_path / 'hf'}",
           "--dtype=float32", "--max_shard_size=100KB")
  assert p2.returncode == 0, p2.stderr[-2000:]
  assert "export:" in p2.stderr  # progress
  a, b = _tensors(dst), _tensors(str(tmp_path / "hf"))
  assert set(a) == set(b)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
