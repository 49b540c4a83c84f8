"""Image preprocessing equals transformers' Qwen2-VL image processor (PIL backend)."""

import numpy as np
import pytest
from PIL import Image, ImageDraw
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from atlas_jax.data import image as image_lib

MIN, MAX = 56 * 56, 28 * 28 * 160


def _noise(rng, w, h, mode="RGB"):
  arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
  return Image.fromarray(arr).convert(mode)


def _drawing(w, h):
  img = Image.new("RGB", (w, h), "white")
  d = ImageDraw.Draw(img)
  d.rectangle([w // 5, h // 4, w // 2, h // 2], fill="red")
  d.line([(0, h - 1), (w - 1, 0)], fill="blue", width=3)
  return img


def _reference(images, **kw):
  out = Qwen2VLImageProcessorPil(min_pixels=MIN, max_pixels=MAX, **kw)(images=images,
                                                                       return_tensors="np")
  return np.asarray(out["pixel_values"]), np.asarray(out["image_grid_thw"])


@pytest.mark.parametrize("w, h", [(56, 56), (100, 37), (224, 300), (640, 480), (30, 20),
                                  (1000, 90)])
def test_single_image_equals_transformers(w, h):
  rng = np.random.default_rng(w * h)
  for img in (_noise(rng, w, h), _drawing(w, h)):
    want_px, want_grid = _reference([img])
    px, grid = image_lib.preprocess([img], min_pixels=MIN, max_pixels=MAX)
    np.testing.assert_array_equal(grid, want_grid)
    assert px.dtype == np.float32 and px.shape == want_px.shape
    np.testing.assert_allclose(px, want_px, atol=1e-5, rtol=0)


def test_several_images_and_modes_in_one_call():
  rng = np.random.default_rng(0)
  images = [_noise(rng, 84, 56, "RGBA"), _noise(rng, 60, 90, "L"), _drawing(120, 120),
            np.asarray(_noise(rng, 70, 40))]
  want_px, want_grid = _reference([im if isinstance(im, Image.Image) else Image.fromarray(im)
                                   for im in images])
  px, grid = image_lib.preprocess(images, min_pixels=MIN, max_pixels=MAX)
  np.testing.assert_array_equal(grid, want_grid)
  np.testing.assert_allclose(px, want_px, atol=1e-5, rtol=0)
  np.testing.assert_array_equal(image_lib.num_image_tokens(grid), want_grid.prod(-1) // 4)


def test_smart_resize_equals_transformers_and_respects_bounds():
  from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize
  for h, w in [(2000, 3000), (10, 10), (57, 1000), (333, 334), (28, 2000)]:
    got = image_lib.smart_resize(h, w, min_pixels=MIN, max_pixels=MAX)
    assert got == smart_resize(h, w, min_pixels=MIN, max_pixels=MAX)
    assert got[0] % 28 == 0 and got[1] % 28 == 0 and MIN <= got[0] * got[1] <= MAX
  with pytest.raises(ValueError, match="aspect ratio must be smaller than 200"):
    image_lib.smart_resize(10, 2500)
