"""Forward pass of a tiny random Qwen2.5-VL on a generated image: prints shapes and timing.

    python -m launch.forward_demo [--batch 2] [--image 224x168]

The placeholder main job until the SFT + LA-GRPO demo lands; needs no downloads.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageDraw

from atlas_jax.data import image as image_lib
from atlas_jax.model import ModelConfig, TextConfig, VisionConfig, forward, get_rope_index, \
    init_params

IMAGE_PAD, VISION_START, VISION_END = 250, 251, 252

TINY = ModelConfig(
    vision=VisionConfig(depth=4, hidden_size=64, intermediate_size=128, num_heads=4,
                        out_hidden_size=128, window_size=56, fullatt_block_indexes=(1, 3)),
    text=TextConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=2, mrope_section=(4, 6, 6),
                    tie_word_embeddings=True),
    image_token_id=IMAGE_PAD, vision_start_token_id=VISION_START, vision_end_token_id=VISION_END)


def draw_image(width: int, height: int) -> Image.Image:
  img = Image.new("RGB", (width, height), "white")
  d = ImageDraw.Draw(img)
  d.line([(10, 10), (width - 10, height // 2)], fill="red", width=3)
  d.ellipse([width // 2, height // 2, width // 2 + 30, height // 2 + 30], outline="blue", width=3)
  return img


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--image", default="224x168", help="WIDTHxHEIGHT of the generated image")
  args = parser.parse_args(argv)
  width, height = (int(s) for s in args.image.split("x"))

  pixel_values, grid = image_lib.preprocess([draw_image(width, height)] * args.batch)
  n = int(grid[0].prod()) // 4
  row = [1, 2, 3, VISION_START] + [IMAGE_PAD] * n + [VISION_END] + list(range(10, 30))
  input_ids = np.tile(np.array(row, np.int32), (args.batch, 1))
  attention_mask = np.ones_like(input_ids)
  position_ids, _ = get_rope_index(input_ids, attention_mask, grid, image_token_id=IMAGE_PAD,
                                   spatial_merge_size=2)

  params = init_params(TINY, jax.random.key(0))
  n_params = sum(x.size for x in jax.tree.leaves(params))
  fwd = jax.jit(forward, static_argnums=0)
  t0 = time.perf_counter()
  logits = fwd(TINY, params, input_ids, attention_mask, pixel_values, grid, position_ids)
  logits.block_until_ready()
  compile_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  for _ in range(5):
    logits = fwd(TINY, params, input_ids, attention_mask, pixel_values, grid, position_ids)
  logits.block_until_ready()
  step_s = (time.perf_counter() - t0) / 5

  print(f"devices        {jax.devices()}")
  print(f"parameters     {n_params:,}")
  print(f"pixel_values   {pixel_values.shape} {pixel_values.dtype}")
  print(f"image_grid_thw {grid.tolist()}")
  print(f"input_ids      {input_ids.shape} ({n} image tokens per sample)")
  print(f"logits         {logits.shape} {logits.dtype}, finite={bool(jnp.isfinite(logits).all())}")
  print(f"first call     {compile_s:.2f} s (compile + run)")
  print(f"forward        {step_s * 1e3:.1f} ms/batch, "
        f"{input_ids.size / step_s:,.0f} tokens/s")


if __name__ == "__main__":
  main()
