"""Draws where each functional token looks: one PNG per example, a panel per functional
token with its attention to the image's patches overlaid on the image.

  python -m launch.attention_maps --checkpoint=/tmp/atlas_demo/rl --data=test.jsonl \
      --output=/tmp/attention_maps --layers=all --max_examples=8
  python -m launch.attention_maps --checkpoint=/models/atlas-7b-hf --data=bench.tsv \
      --output=/tmp/maps --layers=20:28 --trajectory=generate --max_new_tokens=512

--checkpoint: a training workdir, an orbax checkpoint directory or a Hugging Face
directory (as launch.evaluate). --data: this project's JSONL (rows with a `trajectory`
are drawn as given), VLMEvalKit .tsv or HF .parquet. --layers: all, one layer N, or a
half-open range A:B; the map is the mean over those layers and all query heads.
--trajectory: auto (the row's trajectory when it has one, else a greedy completion),
given or generate. Writes <output>/<id>.png and <output>/index.json (the panels' tokens,
positions, sentences and attention mass on the image). One process.
"""

from absl import app, flags, logging

FLAGS = flags.FLAGS
flags.DEFINE_string("checkpoint", None, "Training workdir, orbax directory or HF directory.")
flags.DEFINE_string("data", None, "Rows: .jsonl/.json, .tsv or .parquet.")
flags.DEFINE_string("output", None, "Directory for <id>.png and index.json.")
flags.DEFINE_string("format", "auto", "auto (from the extension) | tsv | parquet | atlas | "
                    "chat | llava | rl.")
flags.DEFINE_string("layers", "all", "Decoder layers averaged: all | N | A:B (half-open).")
flags.DEFINE_enum("trajectory", "auto", ["auto", "given", "generate"],
                  "auto: the row's trajectory if it has one, else greedy generation.")
flags.DEFINE_enum("prompt", "native", ["native", "boxed", "question"],
                  "The prompt style (as launch.evaluate).")
flags.DEFINE_integer("max_examples", 8, "Draw at most this many examples (0: all).")
flags.DEFINE_integer("max_new_tokens", 0, "Generation budget (0: the saved "
                     "rl.max_new_tokens).")
flags.DEFINE_string("tokenizer", "", "Tokenizer directory (default: the checkpoint's).")
flags.DEFINE_string("image_root", "", "Folder relative image paths are looked up in first.")
flags.DEFINE_integer("seed", 0, "Sampling seed (greedy decoding ignores it).")
flags.mark_flags_as_required(["checkpoint", "data", "output"])


def main(argv):
  logging.set_verbosity(logging.WARNING)
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from atlas_jax.eval import attention_maps, benchmarks, evaluator
  from atlas_jax.eval import load as load_lib
  c = load_lib.config_for(FLAGS.checkpoint, tokenizer=FLAGS.tokenizer)
  changes = dict(prompt=FLAGS.prompt, samples=1, seed=FLAGS.seed)
  if FLAGS.max_new_tokens:
    changes["max_new_tokens"] = FLAGS.max_new_tokens
  settings = evaluator.Settings.from_config(c, **changes)
  items, skipped = benchmarks.read(FLAGS.data, format=FLAGS.format, image_root=FLAGS.image_root,
                                   allowed_tokens=tuple(c.functional_tokens.tokens))
  if not items:
    raise app.UsageError(f"--data {FLAGS.data} has no usable rows (skipped: {dict(skipped)})")
  model, params = load_lib.load(c)
  layers = attention_maps.parse_layers(FLAGS.layers, model.model_config.text.num_hidden_layers)
  index = attention_maps.write_maps(model, params, items, settings, output_dir=FLAGS.output,
                                    layers=layers, trajectory=FLAGS.trajectory,
                                    max_examples=FLAGS.max_examples, seed=FLAGS.seed)
  panels = sum(len(e["panels"]) for e in index["examples"])
  print(f"drew {len(index['examples'])} examples, {panels} functional-token panels "
        f"(layers {FLAGS.layers}); skipped {dict(skipped, **index['skipped'])}")
  print(f"wrote {FLAGS.output}/<id>.png and index.json")


if __name__ == "__main__":
  app.run(main)
