"""Scores a checkpoint on a benchmark file; writes predictions, a summary and a bar chart.

  python -m launch.evaluate --checkpoint=/tmp/atlas_demo/rl --data=bench.tsv \
      --output=/tmp/eval_bench
  python -m launch.evaluate --checkpoint=/models/atlas-7b-hf --data=BLINK_val.parquet \
      --output=/tmp/blink --prompt=boxed --subtasks=blink_atlas --samples=4 \
      --config.data.max_pixels=1003520 --config.data.max_images=4 \
      --config.data.max_length=8192 --config.eval.max_new_tokens=1024

--checkpoint: a training workdir, an orbax checkpoint directory (e.g. <workdir>/best) or a
Hugging Face directory. --data: this project's JSONL (or the chat / llava / rl formats),
VLMEvalKit's .tsv, or a Hugging Face datasets .parquet file. The run's config comes with
the checkpoint (`atlas_jax.config.base_config` for a Hugging Face directory), and any field
takes a --config.<group>.<field>=<value> override (`launch/checkpoint_config.py`), e.g.
config.eval.format, prompt, subtasks, batch_size, max_new_tokens, max_rows;
config.data.max_pixels, max_images, max_patches (by default enough for max_pixels x
max_images when either is overridden), max_length, image_root; config.rl.temperature (with
--samples > 1), config.seed; config.distributed.* for multi-host. --prompt and --subtasks
are kept as aliases of config.eval.prompt and config.eval.subtasks. Writes
<output>/predictions.jsonl, summary.json and summary.png, and prints the summary's
headline numbers.
"""

from absl import flags, logging
import jax

from atlas_jax.eval import benchmarks, evaluator
from atlas_jax.eval import load as load_lib
from launch import checkpoint_config, cli

FLAGS = flags.FLAGS
flags.DEFINE_string("checkpoint", None, "Training workdir, orbax directory or HF directory.")
flags.DEFINE_string("data", None, "Benchmark file: .jsonl/.json, .tsv or .parquet.")
flags.DEFINE_string("output", None, "Directory for predictions.jsonl, summary.json/.png.")
flags.DEFINE_integer("samples", 1, "1: greedy; k > 1: k sampled completions, pass@k.")
flags.DEFINE_string("tokenizer", "", "Tokenizer directory (default: the checkpoint's).")
flags.DEFINE_enum("prompt", None, ["native", "boxed", "question"],
                  "Alias of --config.eval.prompt: native (the format's convention), boxed "
                  "(with the \\boxed{} instruction) or question (the question field + the "
                  "\\boxed{} instruction).")
flags.DEFINE_list("subtasks", None, "Alias of --config.eval.subtasks: categories averaged "
                  "as subtask_mean, or blink_atlas.")
flags.mark_flags_as_required(["checkpoint", "data", "output"])


def fit_data_limits(c, overridden: dict) -> None:
  """max_patches follows max_pixels x max_images when either is overridden and it is not;
  the length buckets end at max_length."""
  d = c.data
  if "data.max_patches" not in overridden and {"data.max_pixels", "data.max_images"} & set(
      overridden):
    per_image = -(-d.max_pixels // 196)  # ceil
    d.max_patches = -(-per_image * d.max_images // 4) * 4
  d.length_buckets = tuple(b for b in d.length_buckets if b < d.max_length) + (d.max_length,)


def main(argv):
  logging.set_verbosity(logging.WARNING)
  c, overridden = checkpoint_config.load(
      FLAGS.checkpoint, argv, tokenizer=FLAGS.tokenizer,
      aliases={"eval.prompt": FLAGS.prompt, "eval.subtasks": FLAGS.subtasks})
  fit_data_limits(c, overridden)
  settings = evaluator.Settings.from_config(c, samples=FLAGS.samples)
  c.data.batch_size = settings.batch_size
  items, skipped = benchmarks.read(FLAGS.data, format=c.eval.format,
                                   image_root=c.data.image_root, max_rows=c.eval.max_rows,
                                   allowed_tokens=tuple(c.functional_tokens.tokens))
  model, params = load_lib.load(c)
  summary = evaluator.evaluate(model, params, items, settings, output_dir=FLAGS.output,
                               skipped=skipped,
                               info={"checkpoint": FLAGS.checkpoint, "data": FLAGS.data})
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
  cli.run(main, flags_parser=checkpoint_config.parse_flags)
