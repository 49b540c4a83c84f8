"""atlas_jax's Qwen2.5-VL against transformers (PyTorch, fp32) on tiny random models."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from atlas_jax import hf
from atlas_jax.model import get_rope_index, rope, vision, vlm
from tests import factories as F

LOGIT_TOL = 1e-4


def _batch(seed: int):
  """Inputs covering: two images of different, non-square sizes in one sample; a
  text-only left-padded sample; a one-image right-padded sample."""
  rng = np.random.default_rng(seed)
  images = [F.random_image(rng, 56, 84), F.random_image(rng, 100, 60),
            F.random_image(rng, 70, 70)]
  pixel_values, grid = F.hf_pixels(images)
  tokens = (grid.prod(-1) // 4).tolist()
  rows = [F.prompt_ids(rng, [5, ("img", tokens[0]), 3, ("img", tokens[1]), 7]),
          F.prompt_ids(rng, [9]),
          F.prompt_ids(rng, [2, ("img", tokens[2]), 4])]
  ids, mask = F.pad_batch(rows, ["right", "left", "right"])
  return ids, mask, pixel_values, grid


@pytest.fixture(scope="module")
def batch():
  return _batch(0)


def _hf_rope(model, ids, mask, grid):
  return model.model.get_rope_index(
      torch.from_numpy(ids), mm_token_type_ids=torch.from_numpy((ids == F.IMAGE_TOKEN).astype(np.int32)),
      image_grid_thw=None if grid is None else torch.from_numpy(grid),
      attention_mask=torch.from_numpy(mask))


def test_rope_index_equals_transformers(tiny_hf, batch):
  _, _, model = tiny_hf
  ids, mask, _, grid = batch
  want_pos, want_delta = _hf_rope(model, ids, mask, grid)
  for xp in (np, jnp):
    pos, delta = get_rope_index(ids, mask, grid, image_token_id=F.IMAGE_TOKEN,
                                spatial_merge_size=2, xp=xp)
    np.testing.assert_array_equal(np.asarray(pos), want_pos.numpy())
    np.testing.assert_array_equal(np.asarray(delta), want_delta.numpy()[:, 0])


def test_rope_index_text_only_equals_transformers(tiny_hf):
  _, _, model = tiny_hf
  rng = np.random.default_rng(1)
  ids, mask = F.pad_batch([F.prompt_ids(rng, [6]), F.prompt_ids(rng, [11])], ["left", "right"])
  want_pos, want_delta = _hf_rope(model, ids, mask, None)
  pos, delta = get_rope_index(ids, mask, None, image_token_id=F.IMAGE_TOKEN,
                              spatial_merge_size=2)
  np.testing.assert_array_equal(pos, want_pos.numpy())
  np.testing.assert_array_equal(delta, want_delta.numpy()[:, 0])


def test_vision_tower_equals_transformers(tiny_hf, batch):
  _, path, model = tiny_hf
  config, params = hf.load(path)
  _, _, pixel_values, grid = batch
  with torch.no_grad():
    want = model.model.visual(torch.from_numpy(pixel_values),
                              grid_thw=torch.from_numpy(grid)).pooler_output.numpy()
  tower = vision.VisionTower(config.vision, jnp.float32)
  got = tower.apply({"params": params["visual"]}, pixel_values, grid)
  assert got.shape == want.shape
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=0)


def test_vision_tower_ignores_padded_patches(tiny_hf, batch):
  """Rows past the grids' total (static-shape padding) change no real feature."""
  _, path, _ = tiny_hf
  config, params = hf.load(path)
  _, _, pixel_values, grid = batch
  tower = vision.VisionTower(config.vision, jnp.float32)
  base = tower.apply({"params": params["visual"]}, pixel_values, grid)
  padded_pixels = np.concatenate([pixel_values, np.ones((8, pixel_values.shape[1]), np.float32)])
  padded_grid = np.concatenate([grid, np.zeros((1, 3), grid.dtype)])
  padded = tower.apply({"params": params["visual"]}, padded_pixels, padded_grid)
  np.testing.assert_allclose(np.asarray(padded[:base.shape[0]]), np.asarray(base), atol=1e-6)


def _max_logit_diff(model, config, params, ids, mask, pixel_values, grid, position_ids=None):
  kwargs = {}
  if pixel_values is not None:
    kwargs = dict(pixel_values=torch.from_numpy(pixel_values),
                  image_grid_thw=torch.from_numpy(grid),
                  mm_token_type_ids=torch.from_numpy((ids == F.IMAGE_TOKEN).astype(np.int32)))
  if position_ids is not None:
    kwargs["position_ids"] = torch.from_numpy(position_ids)
  with torch.no_grad():
    want = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                 **kwargs).logits.numpy()
  got = np.asarray(jax.jit(vlm.forward, static_argnums=0)(config, params, ids, mask,
                                                           pixel_values, grid))
  assert got.dtype == np.float32 and got.shape == want.shape
  valid = mask.astype(bool)
  return float(np.abs(got[valid] - want[valid]).max())


def test_logits_equal_transformers_with_images(tiny_hf, batch):
  name, path, model = tiny_hf
  config, params = hf.load(path)
  diff = _max_logit_diff(model, config, params, *batch)
  print(f"\n[parity] {name}: image batch max |logit diff| = {diff:.2e}")
  assert diff <= LOGIT_TOL


def test_logits_equal_transformers_text_only(tiny_hf):
  name, path, model = tiny_hf
  config, params = hf.load(path)
  rng = np.random.default_rng(2)
  ids, mask = F.pad_batch([F.prompt_ids(rng, [6]), F.prompt_ids(rng, [13])], ["left", "right"])
  hf_pos, _ = _hf_rope(model, ids, mask, None)  # transformers uses arange without images
  diff = _max_logit_diff(model, config, params, ids, mask, None, None, hf_pos.numpy())
  print(f"\n[parity] {name}: text-only max |logit diff| = {diff:.2e}")
  assert diff <= LOGIT_TOL


def test_image_token_count_mismatch_is_a_clear_error(tiny_hf, batch):
  _, path, _ = tiny_hf
  config, params = hf.load(path)
  ids, mask, pixel_values, grid = batch
  ids = ids.copy()
  ids[0, np.flatnonzero(ids[0] == F.IMAGE_TOKEN)[0]] = 5  # drop one image-pad token
  with pytest.raises(ValueError, match=r"input_ids has \d+ <\|image_pad\|> tokens"):
    vlm.forward(config, params, ids, mask, pixel_values, grid)


def test_patch_layout_matches_transformers_windows(tiny_hf, batch):
  """Window ids group patches exactly as transformers' window_index/cu_window_seqlens."""
  from transformers.vision_utils import get_vision_window_index
  _, path, _ = tiny_hf
  config, _ = hf.load(path)
  grid = batch[3]
  v = config.vision
  window_index, cu = get_vision_window_index(torch.from_numpy(grid), v.spatial_merge_size,
                                             v.window_size, v.patch_size)
  num_patches = int(grid.prod(-1).sum())
  _, window_id, frame_id = vision.patch_layout(grid, num_patches, v)
  unit_window = np.asarray(window_id)[::4]  # one id per merged unit
  ordered = unit_window[window_index.numpy()]
  bounds = (cu.numpy() // 4).tolist()
  groups = [ordered[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
  assert all(len(set(g.tolist())) == 1 for g in groups)
  assert len({int(g[0]) for g in groups}) == len(groups)
  assert np.asarray(frame_id).max() == len(grid) - 1


def test_batch_major_images_equal_flat_images(tiny_hf, batch):
  """Per-sample pixel_values [B, P, C] (padded) give the flat form's logits."""
  _, path, _ = tiny_hf
  config, params = hf.load(path)
  ids, mask, pixel_values, grid = batch
  patches = grid.prod(-1)
  per_sample = [[0, 1], [], [2]]  # which images each row holds (see _batch)
  p_max, i_max = 64, 2
  px = np.zeros((3, p_max, pixel_values.shape[1]), np.float32)
  g = np.zeros((3, i_max, 3), np.int64)
  starts = np.concatenate([[0], np.cumsum(patches)])
  for b, imgs in enumerate(per_sample):
    rows = np.concatenate([pixel_values[starts[i]:starts[i + 1]] for i in imgs] or
                          [np.zeros((0, pixel_values.shape[1]), np.float32)])
    px[b, :len(rows)] = rows
    g[b, :len(imgs)] = grid[imgs]
  fwd = jax.jit(vlm.forward, static_argnums=0)
  flat = np.asarray(fwd(config, params, ids, mask, pixel_values, grid))
  batched = np.asarray(fwd(config, params, ids, mask, px, g))
  valid = mask.astype(bool)
  np.testing.assert_allclose(batched[valid], flat[valid], atol=1e-5)
