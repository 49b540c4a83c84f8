"""Per-chip memory, FLOPs and a roofline step time of a recipe's steps on a TPU slice,
compiled ahead of time without TPUs (needs libtpu: pip install -e '.[tpu]').

From a recipe (the step functions `launch.train` builds from the same config):

  python -m launch.aot_report --config=configs/sft.py:qwen2.5-vl-7b --topology=v5e:4x4
  python -m launch.aot_report --config=configs/rl.py:qwen2.5-vl-72b --topology=v5p:2x2x4 \
      --config.optim.moments_dtype=bfloat16 --output=/tmp/rl72b.jsonl
  python -m launch.aot_report --config=configs/rl.py:qwen2.5-vl-7b:shared --topology=v5e:4x4 \
      --steps=la-grpo

An RL recipe's table ends with the training passes' seconds per RL step (each step's
roofline time x its calls: `aot.rl_step_totals`), and the sampler's where compiled.

From flags (a base config with these fields; sampler = prefill + decode, la-grpo = the
old-logp pass + the update over prompts x group_size rows of --length tokens):

  python -m launch.aot_report --sizes=qwen2.5-vl-7b --topologies=v5e:2x4,v5e:4x4 \
      --tensor=2 --smallest

--batch=0 (the default) gives one sequence per batch shard (data x fsdp), the smallest
batch a mesh can run; scale it with grad accumulation, not per-chip rows.
"""

import dataclasses
import json

from absl import app, flags
from ml_collections import config_flags

from launch import cli

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Recipe config file (configs/*.py[:arg]); "
                                "with it, --topology is the slice, --steps may choose steps "
                                "and the other flags are ignored.", lock_config=True)
flags.DEFINE_string("topology", "", "TPU slice for --config, e.g. v5e:4x4, v5p:2x2x4.")
flags.DEFINE_list("sizes", ["qwen2.5-vl-7b"], "Model sizes (atlas_jax.model.SIZES).")
flags.DEFINE_list("topologies", ["v5e:4x4"], "TPU slices, e.g. v5e:4x4, v5p:4x4x4.")
flags.DEFINE_list("steps", ["sft", "la-grpo", "sampler"], "Steps to compile (sft, sampler, "
                  "la-grpo: old-logp and the update; with --config also old-logp or update "
                  "alone).")
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


def _write(reports):
  if FLAGS.output:
    with open(FLAGS.output, "w") as f:
      f.writelines(json.dumps(dict(dataclasses.asdict(r), fits=r.fits)) + "\n"
                   for r in reports)


def recipe_main():
  from atlas_jax import aot
  if not FLAGS.topology:
    raise app.UsageError("--config needs --topology (e.g. --topology=v5e:4x4)")
  name = flags.FLAGS["config"].config_filename
  steps = None  # all the recipe's steps, unless --steps names some (flag-mode names)
  if FLAGS["steps"].present:
    steps = [s for name in FLAGS.steps for s in aot.STEP_GROUPS[name]]
  reports = aot.compile_recipe(FLAGS.config, FLAGS.topology, recipe=name, steps=steps)
  print(aot.format_table(reports), flush=True)
  _write(reports)


def flags_main():
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
      _write(reports)
      if FLAGS.smallest and all(r.fits for r in new):
        smallest[size] = topology
        break
  if FLAGS.smallest:
    for size in FLAGS.sizes:
      print(f"smallest slice for {size}: {smallest.get(size, 'none of ' + ','.join(topologies))}")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if FLAGS.config is not None:
    recipe_main()
  else:
    flags_main()


if __name__ == "__main__":
  cli.run(main)
