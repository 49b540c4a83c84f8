"""Per-chip memory and FLOPs of the real-size steps on TPU slices, compiled ahead of time
without TPUs (needs libtpu: pip install -e '.[tpu]').

  python -m launch.aot_report --sizes=qwen2.5-vl-7b --topologies=v5e:4x4 --tensor=2
  python -m launch.aot_report --sizes=qwen2.5-vl-72b --topologies=v5p:4x4x4 --tensor=4
  # splash attention next to the einsum path:
  python -m launch.aot_report --sizes=qwen2.5-vl-7b --topologies=v5e:4x4 --steps=sft,la-grpo \
      --attention_impls=xla,splash
  # the smallest of several slices on which every step fits, per size:
  python -m launch.aot_report --sizes=qwen2.5-vl-3b,qwen2.5-vl-7b \
      --topologies=v5e:2x2,v5e:2x4,v5e:4x4 --smallest

--batch=0 (the default) gives one sequence per batch shard (data x fsdp), the smallest
batch a mesh can run; scale it with grad accumulation, not per-chip rows.
"""

import dataclasses
import json

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_list("sizes", ["qwen2.5-vl-7b"], "Model sizes (atlas_jax.model.SIZES).")
flags.DEFINE_list("topologies", ["v5e:4x4"], "TPU slices, e.g. v5e:4x4, v5p:4x4x4.")
flags.DEFINE_list("steps", ["sft", "la-grpo", "sampler"], "Steps to compile.")
flags.DEFINE_integer("data", 1, "Mesh data axis.")
flags.DEFINE_integer("fsdp", -1, "Mesh fsdp axis (-1: the rest).")
flags.DEFINE_integer("tensor", 1, "Mesh tensor axis.")
flags.DEFINE_integer("batch", 0, "Global sequences per step (0: one per batch shard).")
flags.DEFINE_integer("length", 4096, "Tokens per sequence.")
flags.DEFINE_integer("patches", 1024, "Vision patches per sequence (one image).")
flags.DEFINE_integer("new_tokens", 1024, "Sampler completion length.")
flags.DEFINE_integer("group_size", 8, "Sampler completions per prompt.")
flags.DEFINE_string("remat", "full", "Remat policy (full: save only layer inputs).")
flags.DEFINE_integer("chunk", 512, "Log-prob sequence chunk.")
flags.DEFINE_integer("attention_chunk", 1024, "Decoder attention query chunk (0: off).")
flags.DEFINE_integer("sampler_prompts", 0, "Prompts per rollout call (0: batch / group_size, "
                     "rounded up to the batch shards).")
flags.DEFINE_list("attention_impls", ["xla"], "model.attention_impl values to compile "
                  "(xla, splash); one report row per value.")
flags.DEFINE_string("output", "", "Also write the reports as JSON lines to this file.")
flags.DEFINE_bool("smallest", False, "Per size, try the slices in order of chip count and "
                  "stop at the first on which every step fits.")


def main(argv):
  del argv
  from atlas_jax import aot
  reports, smallest = [], {}
  topologies = FLAGS.topologies
  if FLAGS.smallest:
    topologies = sorted(topologies, key=aot.chip_count)
  for size in FLAGS.sizes:
    for topology in topologies:
      new = []
      for impl in FLAGS.attention_impls:
        try:
          new += aot.compile_steps(
              size, topology, mesh_shape={"data": FLAGS.data, "fsdp": FLAGS.fsdp,
                                          "tensor": FLAGS.tensor},
              batch=FLAGS.batch, length=FLAGS.length, patches=FLAGS.patches,
              new_tokens=FLAGS.new_tokens, steps=tuple(FLAGS.steps), remat=FLAGS.remat,
              chunk=FLAGS.chunk, group_size=FLAGS.group_size,
              sampler_prompts=FLAGS.sampler_prompts or None,
              attention_chunk=FLAGS.attention_chunk, attention_impl=impl)
        except Exception as e:  # one failing combination must not hide the others
          print(f"{size} on {topology} ({impl}): failed: {type(e).__name__}: {e}")
      if not new:
        continue
      reports += new
      print(aot.format_table(reports), flush=True)
      if FLAGS.output:
        with open(FLAGS.output, "w") as f:
          f.writelines(json.dumps(dataclasses.asdict(r)) + "\n" for r in reports)
      if FLAGS.smallest and all(r.fits for r in new):
        smallest[size] = topology
        break
  if FLAGS.smallest:
    for size in FLAGS.sizes:
      print(f"smallest slice for {size}: {smallest.get(size, 'none of ' + ','.join(topologies))}")


if __name__ == "__main__":
  app.run(main)
