"""Attention maps: the model's attention weights against transformers' eager
output_attentions, the patch-to-pixel mapping on a constructed case, and the command line
end to end on a tiny random model."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch

from atlas_jax import hf
from atlas_jax.eval import attention_maps as maps
from atlas_jax.model import vlm
from tests import factories as F

ATTENTION_TOL = 1e-5


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("hf_attn"))
  model = F.save_tiny_hf("gqa2_wide_window", path)
  config, params = hf.load(path)
  return model, config, params


def _image_batch():
  """A one-image prompt (right-padded) and a text-only prompt (left-padded)."""
  rng = np.random.default_rng(0)
  pixel_values, grid = F.hf_pixels([F.random_image(rng, 56, 84)])
  tokens = int(grid.prod(-1)[0]) // 4
  rows = [F.prompt_ids(rng, [4, ("img", tokens), 6]), F.prompt_ids(rng, [9])]
  ids, mask = F.pad_batch(rows, ["right", "left"])
  return ids, mask, pixel_values, grid


def test_attention_weights_equal_transformers_eager(tiny):
  model, config, params = tiny
  ids, mask, pixel_values, grid = _image_batch()
  with torch.no_grad():
    out = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                pixel_values=torch.from_numpy(pixel_values),
                image_grid_thw=torch.from_numpy(grid),
                mm_token_type_ids=torch.from_numpy((ids == F.IMAGE_TOKEN).astype(np.int32)),
                output_attentions=True)
  want = np.stack([a.numpy() for a in out.attentions])  # [L, B, N, T, S]
  fwd = jax.jit(vlm.forward, static_argnums=0,
                static_argnames=("return_attention", "attention_layers"))
  logits, probs = fwd(config, params, ids, mask, pixel_values, grid, return_attention=True)
  probs = np.asarray(probs)
  assert probs.dtype == np.float32 and probs.shape == want.shape
  valid = mask.astype(bool)  # padding query rows are meaningless
  diff = float(np.abs(probs.transpose(0, 1, 3, 2, 4)[:, valid]
                      - want.transpose(0, 1, 3, 2, 4)[:, valid]).max())
  print(f"\n[attention] max |prob diff| vs transformers eager = {diff:.2e}")
  assert diff <= ATTENTION_TOL
  plain = fwd(config, params, ids, mask, pixel_values, grid)
  np.testing.assert_array_equal(np.asarray(plain), np.asarray(logits))
  _, last = fwd(config, params, ids, mask, pixel_values, grid, return_attention=True,
                attention_layers=(config.text.num_hidden_layers - 1,))
  np.testing.assert_array_equal(np.asarray(last), probs[-1:])
  with pytest.raises(ValueError, match="attention_layers"):
    vlm.forward(config, params, ids, mask, pixel_values, grid, return_attention=True,
                attention_layers=(config.text.num_hidden_layers,))


def test_attention_chunked_path_returns_the_same_weights(tiny):
  import dataclasses
  _, config, params = tiny
  ids, mask, pixel_values, grid = _image_batch()
  t = ids.shape[1]
  chunk = next(c for c in range(2, t) if t % c == 0)
  _, whole = vlm.forward(config, params, ids, mask, pixel_values, grid, return_attention=True)
  chunked = dataclasses.replace(config, attention_chunk=chunk)
  _, got = vlm.forward(chunked, params, ids, mask, pixel_values, grid, return_attention=True)
  valid = mask.astype(bool)
  np.testing.assert_allclose(np.asarray(got).transpose(0, 1, 3, 2, 4)[:, valid],
                             np.asarray(whole).transpose(0, 1, 3, 2, 4)[:, valid], atol=1e-6)


def test_attention_on_one_patch_lights_up_its_pixels():
  """Grid (1, 4, 6) patches -> 2 x 3 merged tokens; all attention on merged token 4
  (row 1, column 1) lights up exactly pixels [28:56, 28:56] of the 56 x 84 image."""
  image_id, func_id = 9, 7
  ids = np.array([1, 2, image_id, image_id, image_id, image_id, image_id, image_id, 3, 5,
                  func_id, 4])
  grid = np.array([[1, 4, 6]])
  spans = maps.image_spans(ids, grid, image_id, merge_size=2)
  assert [s.positions.tolist() for s in spans] == [[2, 3, 4, 5, 6, 7]]
  assert spans[0].shape == (1, 2, 3)
  assert maps.functional_positions(ids, [func_id], start=8).tolist() == [10]
  probs = np.zeros((2, 3, len(ids), len(ids)), np.float32)  # [L, N, T, S]
  probs[:, :, 10, 2 + 4] = 1.0
  cells = maps.attention_to_image(probs, 10, spans[0])
  assert cells.shape == (1, 2, 3) and cells[0, 1, 1] == 1.0 and cells.sum() == 1.0
  pixels = maps.to_pixels(cells[0], (56, 84), patch_size=14, merge_size=2)
  assert pixels.shape == (56, 84)
  lit = np.zeros((56, 84), bool)
  lit[28:56, 28:56] = True
  np.testing.assert_array_equal(pixels > 0, lit)
  # On an original image of another size, the same cell covers the same fraction.
  pixels = maps.to_pixels(cells[0], (112, 168), patch_size=14, merge_size=2)
  lit = np.zeros((112, 168), bool)
  lit[56:112, 56:112] = True
  np.testing.assert_array_equal(pixels > 0, lit)


def test_sentences_before_functional_tokens():
  text = ("I will outline the doorway area to localize the reflection.\n<|Shape|>\nWithin "
          "this region there are two people. I will number them.\n<|Text|>\nSo \\boxed{B}.")
  assert maps.sentence_before(text, text.index("<|Shape|>")) == \
      "I will outline the doorway area to localize the reflection."
  assert maps.sentence_before(text, text.index("<|Text|>")) == "I will number them."
  assert maps.sentence_before("<|Text|>", 0) == ""


def test_layer_selection_is_parsed():
  assert maps.parse_layers("all", 4) == (0, 1, 2, 3)
  assert maps.parse_layers("2", 4) == (2,)
  assert maps.parse_layers("-1", 4) == (3,)
  assert maps.parse_layers("1:3", 4) == (1, 2)
  for bad in ("4", "3:1", "x", "1:9"):
    with pytest.raises(ValueError, match="--layers"):
      maps.parse_layers(bad, 4)


@pytest.mark.slow
def test_command_line_writes_one_png_per_example(tmp_path):
  from PIL import Image, ImageDraw
  hf_dir = str(tmp_path / "hf")
  F.save_tiny_hf_with_tokenizer(hf_dir)
  img = Image.new("RGB", (84, 56), "white")
  ImageDraw.Draw(img).rectangle([10, 10, 40, 40], fill="red")
  img.save(tmp_path / "square.png")
  rows = [dict(id="given", images=["square.png"], question="What colour is the square?",
               trajectory="I will outline the square.\n<|Shape|>\nIt is red. I will label "
                          "it.\n<|Text|>\nSo the answer is \\boxed{A}.",
               answer="A", choices=["red", "blue"]),
          dict(id="generated", images=["square.png"], question="Which colour is it?",
               trajectory="", answer="B", choices=["red", "blue"])]
  data = tmp_path / "rows.jsonl"
  data.write_text("".join(json.dumps(r) + "\n" for r in rows))
  out = tmp_path / "maps"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  done = subprocess.run(
      [sys.executable, "-m", "launch.attention_maps", f"--checkpoint={hf_dir}",
       f"--data={data}", f"--output={out}", "--layers=0:2",
       "--config.eval.max_new_tokens=6"],
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), env=env,
      capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  for name in ("given", "generated"):
    png = out / f"{name}.png"
    assert png.is_file() and png.stat().st_size > 1000, name
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  index = json.loads((out / "index.json").read_text())
  given = next(r for r in index["examples"] if r["id"] == "given")
  assert given["source"] == "given" and [p["token"] for p in given["panels"]] == [
      "<|Shape|>", "<|Text|>"]
  assert given["panels"][0]["sentence"] == "I will outline the square."
  assert index["layers"] == [0, 1]
  assert "wrote" in done.stdout
