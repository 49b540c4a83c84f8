"""Scores a checkpoint on a benchmark file; writes predictions, a summary and a bar chart.

  python -m launch.evaluate --checkpoint=/tmp/atlas_demo/rl --data=bench.tsv \
      --output=/tmp/eval_bench
  python -m launch.evaluate --checkpoint=/models/atlas-7b-hf --data=BLINK_val.parquet \
      --output=/tmp/blink --prompt=boxed --subtasks=blink_atlas --max_pixels=1003520 \
      --max_images=4 --max_length=8192 --max_new_tokens=1024 --samples=4

--checkpoint: a training workdir, an orbax checkpoint directory (e.g. <workdir>/best) or a
Hugging Face directory. --data: this project's JSONL (or the chat / llava / rl formats),
VLMEvalKit's .tsv, or a Hugging Face datasets .parquet file. Data limits and sampling
settings default to the saved run's config (configs/base.py for a Hugging Face directory);
the flags below override them. Writes <output>/predictions.jsonl, summary.json and
summary.png, and prints the summary's headline numbers.
"""

from absl import app, flags, logging

FLAGS = flags.FLAGS
flags.DEFINE_string("checkpoint", None, "Training workdir, orbax directory or HF directory.")
flags.DEFINE_string("data", None, "Benchmark file: .jsonl/.json, .tsv or .parquet.")
flags.DEFINE_string("output", None, "Directory for predictions.jsonl, summary.json/.png.")
flags.DEFINE_string("format", "auto", "auto (from the extension) | tsv | parquet | atlas | "
                    "chat | llava | rl.")
flags.DEFINE_enum("prompt", "native", ["native", "boxed", "question"],
                  "native: the format's convention; boxed: with the \\boxed{} instruction; "
                  "question: the question field + the \\boxed{} instruction.")
flags.DEFINE_integer("samples", 1, "1: greedy; k > 1: k sampled completions, pass@k.")
flags.DEFINE_float("temperature", -1.0, "Sampling temperature for --samples > 1 (-1: saved).")
flags.DEFINE_integer("max_new_tokens", 0, "Completion budget (0: the saved rl.max_new_tokens).")
flags.DEFINE_integer("batch_size", 0, "Prompts per batch, global (0: rl.eval_batch_size).")
flags.DEFINE_integer("max_rows", 0, "Evaluate the first this many usable rows (0: all).")
flags.DEFINE_list("subtasks", [], "Categories averaged as subtask_mean, or blink_atlas.")
flags.DEFINE_string("tokenizer", "", "Tokenizer directory (default: the checkpoint's).")
flags.DEFINE_string("image_root", "", "Folder relative image paths are looked up in first.")
flags.DEFINE_integer("max_pixels", 0, "Per-image pixel budget (0: saved data.max_pixels).")
flags.DEFINE_integer("max_images", 0, "Images per row (0: saved data.max_images).")
flags.DEFINE_integer("max_patches", 0, "Patches per row (0: enough for max_pixels x "
                     "max_images when either is set, else saved).")
flags.DEFINE_integer("max_length", 0, "Prompt tokens per row (0: saved data.max_length).")
flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.DEFINE_bool("distributed", False, "jax.distributed.initialize() (multi-host); the "
                  "three flags below, when unset, come from the environment.")
flags.DEFINE_string("coordinator_address", "", "Multi-host: the coordinator's host:port.")
flags.DEFINE_integer("num_processes", -1, "Multi-host: the number of processes.")
flags.DEFINE_integer("process_id", -1, "Multi-host: this process's index.")
flags.mark_flags_as_required(["checkpoint", "data", "output"])


def _limits(c) -> dict:
  """Data limits after the flags; max_patches follows max_pixels x max_images."""
  d = c.data
  out = dict(max_pixels=FLAGS.max_pixels or d.max_pixels,
             max_images=FLAGS.max_images or d.max_images,
             max_length=FLAGS.max_length or d.max_length)
  if FLAGS.max_patches:
    out["max_patches"] = FLAGS.max_patches
  elif FLAGS.max_pixels or FLAGS.max_images:
    per_image = -(-out["max_pixels"] // 196)  # ceil
    out["max_patches"] = -(-per_image * out["max_images"] // 4) * 4
  else:
    out["max_patches"] = d.max_patches
  buckets = tuple(b for b in d.length_buckets if b < out["max_length"]) + (out["max_length"],)
  out["length_buckets"] = buckets
  return out


def main(argv):
  logging.set_verbosity(logging.WARNING)
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from atlas_jax.eval import benchmarks, evaluator
  from atlas_jax.eval import load as load_lib
  c = load_lib.config_for(FLAGS.checkpoint, tokenizer=FLAGS.tokenizer)
  limits = _limits(c)
  changes = dict(limits, prompt=FLAGS.prompt, samples=FLAGS.samples, seed=FLAGS.seed,
                 subtasks=tuple(FLAGS.subtasks))
  for flag, field in (("max_new_tokens", "max_new_tokens"), ("batch_size", "batch_size")):
    if getattr(FLAGS, flag):
      changes[field] = getattr(FLAGS, flag)
  if FLAGS.temperature >= 0:
    changes["temperature"] = FLAGS.temperature
  settings = evaluator.Settings.from_config(c, **changes)
  c.data.batch_size = settings.batch_size
  c.distributed.initialize = FLAGS.distributed
  c.distributed.coordinator_address = FLAGS.coordinator_address
  c.distributed.num_processes = FLAGS.num_processes
  c.distributed.process_id = FLAGS.process_id
  items, skipped = benchmarks.read(FLAGS.data, format=FLAGS.format, image_root=FLAGS.image_root,
                                   max_rows=FLAGS.max_rows,
                                   allowed_tokens=tuple(c.functional_tokens.tokens))
  model, params = load_lib.load(c)
  summary = evaluator.evaluate(model, params, items, settings, output_dir=FLAGS.output,
                               skipped=skipped,
                               info={"checkpoint": FLAGS.checkpoint, "data": FLAGS.data})
  import jax
  if jax.process_index():
    return
  head = {k: summary[k] for k in ("rows", "accuracy", "category_mean", "subtask_mean",
                                  f"pass@{settings.samples}", "extraction_failures",
                                  "mean_length") if k in summary}
  head["functional_per_answer"] = summary["functional_tokens_per_answer"]["total"]
  print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                 for k, v in head.items()))
  print(f"wrote {FLAGS.output}/predictions.jsonl, summary.json, summary.png")


if __name__ == "__main__":
  app.run(main)
