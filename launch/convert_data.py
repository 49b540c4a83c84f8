"""Converts a data file in a user's format to this project's trajectory JSONL.

  python -m launch.convert_data --src=/data/sharegpt.json --dst=/data/atlas/train.jsonl
  python -m launch.convert_data --src=/data/llava.json --dst=/data/atlas/train.jsonl \
      --image_root=/data/llava/images --format=llava --max_images=4

Formats (chosen per file from its fields unless --format): atlas, chat (LLaMA-Factory
sharegpt / ms-swift messages), llava (LLaVA / qwen-vl-finetune), rl (verl / EasyR1 / TRL
prompt rows); see atlas_jax/data/formats.py. Records that cannot be used are skipped and
counted by reason; the counts are printed. Embedded images are written next to --dst.
When no record is usable it writes nothing and exits with status 1 and one line saying
why (the file and the counts).
"""

import sys

from absl import app, flags

from launch import cli

FLAGS = flags.FLAGS
flags.DEFINE_string("src", None, "Source data file (.json list or .jsonl).")
flags.DEFINE_string("dst", None, "Destination .jsonl file.")
flags.DEFINE_enum("format", "auto", ["auto", "atlas", "chat", "llava", "rl"],
                  "Source format; auto detects it from the first record's fields.")
flags.DEFINE_string("image_root", "", "Folder that relative image paths are under (else the "
                    "source file's folder).")
flags.DEFINE_bool("check_images", True, "Open every image and skip those the preprocessing "
                  "cannot take.")
flags.DEFINE_integer("max_images", None, "Skip records with more images (too_many_images).")
flags.DEFINE_integer("max_patches", None, "Skip records whose images resize to more patches.")
flags.DEFINE_integer("min_pixels", 28 * 28 * 4, "Resize lower bound (as config.data).")
flags.DEFINE_integer("max_pixels", 28 * 28 * 1280, "Resize upper bound (as config.data).")
flags.mark_flags_as_required(["src", "dst"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from atlas_jax.data import formats, schema
  if FLAGS.dst.endswith(".json") or FLAGS.src == FLAGS.dst:
    raise app.UsageError(f"--dst {FLAGS.dst} must be a new .jsonl file")
  try:
    written, skipped = formats.convert(
        FLAGS.src, FLAGS.dst, format=FLAGS.format, image_root=FLAGS.image_root,
        check_images=FLAGS.check_images, min_pixels=FLAGS.min_pixels,
        max_pixels=FLAGS.max_pixels, max_images=FLAGS.max_images,
        max_patches=FLAGS.max_patches)
  except (schema.NoUsableRecord, FileNotFoundError) as e:
    sys.exit(f"[convert_data] {e}")  # one line on stderr, exit status 1
  total = sum(skipped.values())
  print(f"[convert_data] wrote {written} records to {FLAGS.dst}; skipped {total}"
        + "".join(f"\n  {reason}: {n}" for reason, n in sorted(skipped.items())))


if __name__ == "__main__":
  cli.run(main)
