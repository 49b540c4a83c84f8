"""Writes a random Qwen2.5-VL checkpoint of a published size (optionally with fewer layers)
as a local HF directory, to benchmark conversion:

  python -m launch.bench_convert --size=qwen2.5-vl-3b --text_layers=8 --vision_depth=8 \
      --out=/tmp/bench_hf
  /usr/bin/time -v python -m launch.convert --direction=hf_to_orbax --src=/tmp/bench_hf \
      --dst=/tmp/bench_orbax --dtype=float32
  /usr/bin/time -v python -m launch.convert --direction=orbax_to_hf --src=/tmp/bench_orbax \
      --dst=/tmp/bench_export

Prints the parameter count and the checkpoint size.
"""

import dataclasses
import os
import time

from absl import flags

from launch import cli

FLAGS = flags.FLAGS
flags.DEFINE_string("size", "qwen2.5-vl-3b", "A name in atlas_jax.model.SIZES.")
flags.DEFINE_integer("text_layers", -1, "Decoder layers (-1: the size's).")
flags.DEFINE_integer("vision_depth", -1, "Vision blocks (-1: the size's).")
flags.DEFINE_string("out", None, "Output directory.")
flags.mark_flags_as_required(["out"])


def main(argv):
  del argv
  import jax
  import jax.numpy as jnp
  from atlas_jax import hf
  from atlas_jax.data.tokenizer import build_tokenizer
  from atlas_jax.model import from_size, init_params
  config = from_size(FLAGS.size)
  if FLAGS.text_layers > 0:
    config = config.replace_text(num_hidden_layers=FLAGS.text_layers)
  if FLAGS.vision_depth > 0:
    v = dataclasses.replace(config.vision, depth=FLAGS.vision_depth,
                            fullatt_block_indexes=tuple(
                                i for i in config.vision.fullatt_block_indexes
                                if i < FLAGS.vision_depth))
    config = config.replace(vision=v)
  t0 = time.perf_counter()
  params = init_params(config, jax.random.key(0))
  n = sum(x.size for x in jax.tree.leaves(params))
  tok = build_tokenizer(os.path.join(FLAGS.out, "_tok"))
  hf.save(config, params, tok, FLAGS.out, dtype=jnp.bfloat16)
  size = sum(os.path.getsize(os.path.join(FLAGS.out, f)) for f in os.listdir(FLAGS.out)
             if f.endswith(".safetensors"))
  print(f"{n / 1e9:.2f}B params, {size / 2**30:.2f} GiB bf16 safetensors, written in "
        f"{time.perf_counter() - t0:.0f}s to {FLAGS.out}")


if __name__ == "__main__":
  cli.run(main)
