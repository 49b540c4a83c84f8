"""Qwen2.5-VL image preprocessing: smart resize, normalisation, flattened patches.

Decoding (`open_image`, `to_rgb`) is transformers': the EXIF orientation applied as
`load_image` does, then any transparency composited onto white and every other mode
converted to RGB as the image processor's `convert_to_rgb` does (16-bit, CMYK, palette...).
Preprocessing reproduces transformers' Qwen2-VL image processor (PIL backend): resize with
bicubic interpolation so both sides are multiples of patch*merge (28) and the area is
within [min_pixels, max_pixels], scale to [0, 1], normalise with the CLIP mean/std, and cut
into patches laid out block-major over 2x2 merge units, each patch repeated over the
temporal patch size (a still image is a 2-frame clip).
"""

from __future__ import annotations

import io
import math
from typing import Sequence

import numpy as np
from PIL import ExifTags, Image, ImageOps

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MIN_PIXELS = 56 * 56
MAX_PIXELS = 28 * 28 * 1280
SWAPS_SIDES = (5, 6, 7, 8)  # EXIF orientations that turn the image by 90 degrees


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = MIN_PIXELS,
                 max_pixels: int = MAX_PIXELS) -> tuple[int, int]:
  """(height, width) rounded to multiples of `factor`, area within [min, max] pixels,
  aspect ratio kept as closely as possible."""
  if max(height, width) / min(height, width) > 200:
    raise ValueError(f"absolute aspect ratio must be smaller than 200, got "
                     f"{max(height, width) / min(height, width)}")
  h = round(height / factor) * factor
  w = round(width / factor) * factor
  if h * w > max_pixels:
    beta = math.sqrt(height * width / max_pixels)
    h = max(factor, math.floor(height / beta / factor) * factor)
    w = max(factor, math.floor(width / beta / factor) * factor)
  elif h * w < min_pixels:
    beta = math.sqrt(min_pixels / (height * width))
    h = math.ceil(height * beta / factor) * factor
    w = math.ceil(width * beta / factor) * factor
  return h, w


def exif_orientation(image: Image.Image) -> int:
  """The EXIF orientation tag (1-8; 1, upright, when absent or unreadable)."""
  try:
    value = image.getexif().get(ExifTags.Base.Orientation, 1)
  except Exception:  # noqa: BLE001  (a damaged EXIF block: Pillow ignores it when decoding)
    return 1
  return value if value in range(1, 9) else 1


def open_image(data: bytes) -> Image.Image:
  """Encoded bytes -> a decoded image, upright by its EXIF orientation (as transformers'
  `load_image`), in its own mode."""
  image = Image.open(io.BytesIO(data))
  image.load()
  return ImageOps.exif_transpose(image) if exif_orientation(image) != 1 else image


def to_rgb(image: Image.Image) -> Image.Image:
  """An RGB image, as transformers' `convert_to_rgb`: transparency (an alpha band or a
  transparent palette entry) composited onto white, any other mode converted."""
  if image.mode == "RGB":
    return image
  if "A" in image.getbands() or image.info.get("transparency") is not None:
    rgba = image.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")
  return image.convert("RGB")


def _to_pil(image) -> Image.Image:
  if isinstance(image, np.ndarray):
    image = Image.fromarray(image)
  return to_rgb(image)


def patchify(image_chw: np.ndarray, patch_size: int, temporal_patch_size: int,
             merge_size: int) -> np.ndarray:
  """float32[C, H, W] -> float32[gh*gw, C*T*p*p], block-major over merge units."""
  c, h, w = image_chw.shape
  gh, gw, m, p = h // patch_size, w // patch_size, merge_size, patch_size
  x = image_chw.reshape(c, gh // m, m, p, gw // m, m, p)
  x = x.transpose(1, 4, 2, 5, 0, 3, 6)  # (gh/m, gw/m, m, m, C, p, p)
  x = np.broadcast_to(x[:, :, :, :, :, None], x.shape[:5] + (temporal_patch_size,) + x.shape[5:])
  return x.reshape(gh * gw, c * temporal_patch_size * p * p)


def preprocess(images: Sequence, *, min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS,
               patch_size: int = 14, temporal_patch_size: int = 2, merge_size: int = 2,
               image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD):
  """Images (PIL of any mode, converted by `to_rgb`, or uint8[H, W, C] arrays) -> model inputs.

  Returns:
    pixel_values: float32[P, 3*T*p*p], the patches of all images in order.
    image_grid_thw: int32[I, 3], (1, H/p, W/p) per image.
  """
  mean = np.asarray(image_mean, np.float32)[:, None, None]
  std = np.asarray(image_std, np.float32)[:, None, None]
  patches, grids = [], []
  for image in images:
    img = _to_pil(image)
    h, w = smart_resize(img.height, img.width, patch_size * merge_size, min_pixels, max_pixels)
    img = img.resize((w, h), Image.Resampling.BICUBIC)
    x = np.asarray(img, np.float32).transpose(2, 0, 1) * np.float32(1 / 255)
    x = (x - mean) / std
    patches.append(patchify(x, patch_size, temporal_patch_size, merge_size))
    grids.append((1, h // patch_size, w // patch_size))
  if not patches:
    return (np.zeros((0, 3 * temporal_patch_size * patch_size**2), np.float32),
            np.zeros((0, 3), np.int32))
  return np.concatenate(patches).astype(np.float32), np.asarray(grids, np.int32)


def num_image_tokens(image_grid_thw, merge_size: int = 2) -> np.ndarray:
  """int32[I]: `<|image_pad|>` tokens per image (t*h*w / merge**2)."""
  grid = np.asarray(image_grid_thw, np.int64).reshape(-1, 3)
  return (grid.prod(-1) // merge_size**2).astype(np.int32)
