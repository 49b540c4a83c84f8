"""Draws where each functional token looks: one PNG per example, a panel per functional
token with its attention to the image's patches overlaid on the image.

  python -m launch.attention_maps --checkpoint=/tmp/atlas_demo/rl --data=test.jsonl \
      --output=/tmp/attention_maps --layers=all --max_examples=8
  python -m launch.attention_maps --checkpoint=/models/atlas-7b-hf --data=bench.tsv \
      --output=/tmp/maps --layers=20:28 --trajectory=generate \
      --config.eval.max_new_tokens=512

--checkpoint: a training workdir, an orbax checkpoint directory or a Hugging Face
directory (as launch.evaluate). --data: this project's JSONL (rows with a `trajectory`
are drawn as given), VLMEvalKit .tsv or HF .parquet. --layers: all, one layer N, or a
half-open range A:B; the map is the mean over those layers and all query heads.
--trajectory: auto (the row's trajectory when it has one, else a greedy completion),
given or generate. The checkpoint's config takes --config.<group>.<field>=<value>
overrides as in launch.evaluate, e.g. --config.eval.max_new_tokens (the generation budget;
0: rl.max_new_tokens), --config.eval.prompt, --config.eval.format,
--config.data.image_root, --config.seed. Writes <output>/<id>.png and <output>/index.json
(the panels' tokens, positions, sentences and attention mass on the image). One process.
"""

from absl import app, flags, logging

from atlas_jax.eval import attention_maps, benchmarks, evaluator
from atlas_jax.eval import load as load_lib
from launch import checkpoint_config, cli

FLAGS = flags.FLAGS
flags.DEFINE_string("checkpoint", None, "Training workdir, orbax directory or HF directory.")
flags.DEFINE_string("data", None, "Rows: .jsonl/.json, .tsv or .parquet.")
flags.DEFINE_string("output", None, "Directory for <id>.png and index.json.")
flags.DEFINE_string("layers", "all", "Decoder layers averaged: all | N | A:B (half-open).")
flags.DEFINE_enum("trajectory", "auto", ["auto", "given", "generate"],
                  "auto: the row's trajectory if it has one, else greedy generation.")
flags.DEFINE_integer("max_examples", 8, "Draw at most this many examples (0: all).")
flags.DEFINE_string("tokenizer", "", "Tokenizer directory (default: the checkpoint's).")
flags.mark_flags_as_required(["checkpoint", "data", "output"])


def main(argv):
  logging.set_verbosity(logging.WARNING)
  c, _ = checkpoint_config.load(FLAGS.checkpoint, argv, tokenizer=FLAGS.tokenizer)
  settings = evaluator.Settings.from_config(c, samples=1)
  items, skipped = benchmarks.read(FLAGS.data, format=c.eval.format, image_root=c.data.image_root,
                                   allowed_tokens=tuple(c.functional_tokens.tokens))
  if not items:
    raise app.UsageError(f"--data {FLAGS.data} has no usable rows (skipped: {dict(skipped)})")
  model, params = load_lib.load(c)
  layers = attention_maps.parse_layers(FLAGS.layers, model.model_config.text.num_hidden_layers)
  index = attention_maps.write_maps(model, params, items, settings, output_dir=FLAGS.output,
                                    layers=layers, trajectory=FLAGS.trajectory,
                                    max_examples=FLAGS.max_examples, seed=c.seed)
  panels = sum(len(e["panels"]) for e in index["examples"])
  print(f"drew {len(index['examples'])} examples, {panels} functional-token panels "
        f"(layers {FLAGS.layers}); skipped {dict(skipped, **index['skipped'])}")
  print(f"wrote {FLAGS.output}/<id>.png and index.json")


if __name__ == "__main__":
  cli.run(main, flags_parser=checkpoint_config.parse_flags)
