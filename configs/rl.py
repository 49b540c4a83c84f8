"""LA-GRPO recipe (ATLAS stage 2), started from an SFT checkpoint.

  python -m launch.train --config=configs/rl.py:tiny --workdir=/tmp/atlas_rl \
      --config.model.init_checkpoint=/tmp/atlas_sft/checkpoints \
      --config.tokenizer.path=/tmp/atlas_sft/tokenizer
  python -m launch.train --config=configs/rl.py:qwen2.5-vl-7b --workdir=/ckpt/rl7b \
      --config.model.init_checkpoint=/ckpt/sft7b/checkpoints \
      --config.tokenizer.path=/ckpt/sft7b/tokenizer --config.data.train_jsonl=/data/rl.jsonl

`--config.rl.alpha=0` is plain GRPO.
"""

from configs.base import base_config


def get_config(arg: str = "tiny"):
  c = base_config()
  c.recipe = "rl"
  c.model.size = arg
  if arg == "tiny":
    c.optim.lr = 5e-4
    c.optim.warmup_steps = 2
    c.train.steps = 20
    c.train.log_every = 2
    c.train.logprob_chunk = 64
    c.rl.max_new_tokens = 64
    c.checkpoint.every = 10
  else:
    c.model.dtype = "bfloat16"
    c.model.remat = "dots_no_batch"
    c.optim.lr = 1e-6
    c.optim.warmup_steps = 10
    c.data.max_length = 2048
    c.data.length_buckets = (1024, 2048)
    c.data.max_pixels = 28 * 28 * 1280
    c.data.max_patches = 5120
    c.rl.group_size = 8
    c.rl.prompts_per_step = 64
    c.rl.max_new_tokens = 1024
    c.train.steps = 500
    c.train.logprob_chunk = 512
    c.checkpoint.every = 25
  return c
