"""Data: image preprocessing, tokenizer, chat rendering, schema, TFDS builder, grain pipelines, synthetic suite."""
