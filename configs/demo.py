"""The main job: the whole ATLAS pipeline on the synthetic suite, on a CPU, in minutes.

Generates the synthetic suite, builds the tiny tokenizer, initialises a tiny VLM, runs SFT
then LA-GRPO, evaluates held-out accuracy before training, after SFT and after RL, and
prints a summary table (also written to <workdir>/summary.txt).

  python -m launch.train --config=configs/demo.py --workdir=/tmp/atlas_demo
"""

import ml_collections

from configs.base import base_config


def get_config():
  c = base_config()
  c.recipe = "demo"
  c.model.size = "tiny"
  c.data.synthetic_per_family = 96
  c.data.synthetic_test_per_family = 12
  c.data.batch_size = 8
  c.data.max_length = 256
  c.data.length_buckets = (128, 256)
  c.train.logprob_chunk = 64
  c.optim.weight_decay = 0.0
  c.rl.group_size = 4
  c.rl.prompts_per_step = 4
  c.rl.max_new_tokens = 64
  c.rl.eval_prompts = 60
  c.demo = ml_collections.ConfigDict()
  c.demo.sft = ml_collections.ConfigDict(dict(steps=240, lr=3e-3, warmup_steps=10, log_every=20))
  c.demo.rl = ml_collections.ConfigDict(dict(steps=20, lr=2e-4, warmup_steps=2, log_every=2))
  return c
