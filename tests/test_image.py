"""Image preprocessing equals transformers' Qwen2-VL image processor (PIL backend)."""

import io

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


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_as_transformers_load_image(tmp_path, orientation):
  from transformers.image_utils import load_image
  exif = Image.Exif()
  exif[0x0112] = orientation
  path = str(tmp_path / "shot.png")  # PNG: lossless, so the pixels compare exactly
  _drawing(84, 56).save(path, exif=exif.tobytes())
  with open(path, "rb") as f:
    got = image_lib.to_rgb(image_lib.open_image(f.read()))
  want = load_image(path)
  assert got.size == want.size == ((84, 56) if orientation < 5 else (56, 84))
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  if orientation != 1:
    assert not np.array_equal(np.asarray(got), np.asarray(_drawing(84, 56).resize(got.size)))


def _modes():
  rng = np.random.default_rng(1)
  base = _noise(rng, 70, 42)
  rgba = base.convert("RGBA")
  rgba.putalpha(Image.fromarray(rng.integers(0, 256, (42, 70), dtype=np.uint8)))
  palette = base.convert("P")
  palette.info["transparency"] = 3
  la = rgba.convert("LA")
  grey16 = Image.fromarray(rng.integers(0, 600, (42, 70), dtype=np.uint16))
  return {"RGBA": rgba, "P+transparency": palette, "LA": la, "CMYK": base.convert("CMYK"),
          "I;16": grey16, "L": base.convert("L"), "1": base.convert("1")}


@pytest.mark.parametrize("name", sorted(_modes()))
def test_modes_convert_as_transformers_convert_to_rgb(name):
  """Transparency is composited onto white (not dropped to its colour underneath); other
  modes convert as transformers' image processor converts them; the patches equal its."""
  from transformers.image_transforms import convert_to_rgb
  img = _modes()[name]
  buf = io.BytesIO()
  img.save(buf, "TIFF" if name in ("CMYK", "I;16") else "PNG")
  decoded = image_lib.open_image(buf.getvalue())
  np.testing.assert_array_equal(np.asarray(image_lib.to_rgb(decoded)),
                                convert_to_rgb(decoded, return_numpy=True))
  want_px, want_grid = _reference([decoded])
  px, grid = image_lib.preprocess([decoded], min_pixels=MIN, max_pixels=MAX)
  np.testing.assert_array_equal(grid, want_grid)
  np.testing.assert_allclose(px, want_px, atol=1e-5, rtol=0)
