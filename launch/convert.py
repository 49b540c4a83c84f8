"""Converts checkpoints between Hugging Face and atlas_jax (orbax).

  # HF -> orbax checkpoint ready to train from (functional tokens added on the way)
  python -m launch.convert --direction=hf_to_orbax --src=/models/Qwen2.5-VL-7B-Instruct \
      --dst=/ckpt/qwen7b_atlas
  # orbax checkpoint (an SFT/RL workdir) -> HF directory for transformers / vLLM
  python -m launch.convert --direction=orbax_to_hf --src=/tmp/atlas_sft --dst=/export/atlas7b \
      --dtype=bfloat16 --max_shard_size=5GB

An orbax source is a training workdir (its checkpoints/ and tokenizer/) or its
checkpoints/ directory; --step picks a checkpoint (default: the latest). A non-empty --dst
is refused unless --overwrite.
"""

import os
import shutil

from absl import app, flags, logging

from launch import cli

FLAGS = flags.FLAGS
flags.DEFINE_enum("direction", None, ["hf_to_orbax", "orbax_to_hf"], "Conversion direction.")
flags.DEFINE_string("src", None, "Source directory.")
flags.DEFINE_string("dst", None, "Destination directory.")
flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32", "float16"],
                  "dtype of the written tensors (HF export) / params (orbax import).")
flags.DEFINE_string("max_shard_size", "5GB", "HF export: safetensors shard size.")
flags.DEFINE_integer("step", None, "orbax_to_hf: checkpoint step (default latest).")
flags.DEFINE_bool("add_functional_tokens", True, "hf_to_orbax: add the ATLAS tokens.")
flags.DEFINE_bool("overwrite", False, "Allow writing into a non-empty --dst.")
flags.DEFINE_integer("fsdp", -1, "Mesh fsdp axis the params are read into, sharded (-1: "
                     "every device not in --tensor).")
flags.DEFINE_integer("tensor", 1, "Mesh tensor axis the params are read into.")
flags.mark_flags_as_required(["direction", "src", "dst"])


def check_destination(dst: str, overwrite: bool) -> None:
  if os.path.exists(dst) and os.listdir(dst):
    if not overwrite:
      raise app.UsageError(f"--dst {dst} is not empty; pass --overwrite to replace it")
    shutil.rmtree(dst)


def main(argv):
  logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not os.path.isdir(FLAGS.src):
    raise app.UsageError(f"--src {FLAGS.src} does not exist")
  check_destination(FLAGS.dst, FLAGS.overwrite)
  from atlas_jax import convert
  if FLAGS.direction == "hf_to_orbax":
    convert.hf_to_orbax(FLAGS.src, FLAGS.dst, dtype=FLAGS.dtype,
                        add_functional_tokens=FLAGS.add_functional_tokens, fsdp=FLAGS.fsdp,
                        tensor=FLAGS.tensor)
  else:
    convert.orbax_to_hf(FLAGS.src, FLAGS.dst, step=FLAGS.step, dtype=FLAGS.dtype,
                        max_shard_size=FLAGS.max_shard_size, fsdp=FLAGS.fsdp,
                        tensor=FLAGS.tensor)


if __name__ == "__main__":
  cli.run(main)
