"""Qwen2.5-VL image preprocessing: smart resize, normalisation, flattened patches.

Reproduces transformers' Qwen2-VL image processor (PIL backend): resize with bicubic
interpolation so both sides are multiples of patch*merge (28) and the area is within
[min_pixels, max_pixels], scale to [0, 1], normalise with the CLIP mean/std, and cut into
patches laid out block-major over 2x2 merge units, each patch repeated over the temporal
patch size (a still image is a 2-frame clip).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from PIL import Image

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MIN_PIXELS = 56 * 56
MAX_PIXELS = 28 * 28 * 1280


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


def _to_pil(image) -> Image.Image:
  if isinstance(image, np.ndarray):
    image = Image.fromarray(image)
  return image.convert("RGB") if image.mode != "RGB" else image


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
  """Images (PIL of any mode, or uint8[H, W, C] arrays) -> model inputs.

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
