"""Benchmark evaluation: readers (this project's JSONL and the formats of data/formats.py,
VLMEvalKit TSV, Hugging Face parquet), prompts, rule-based answer extraction, the evaluator
(batched over the mesh with the RL sampler), its report, and the hook that runs it during
training.

  benchmarks   files -> `Item`s (a trajectory record + options, hint, category, ...)
  prompts      the user text of an item: native | boxed | question
  extract      a row's score from the answer `atlas_jax.answers` reads
  evaluator    `Settings`, `evaluate(model, params, items, settings, output_dir=...)`
  report       summary.json, predictions.jsonl, summary.png
  load         a model from a training workdir, an orbax directory or a HF directory
  in_training  config.eval inside the SFT and RL loops (metrics, best checkpoint)
  writers      items back out as VLMEvalKit TSV or HF parquet
  attention_maps  each functional token's attention to the image, one PNG per example
"""
