"""SFT recipe (ATLAS stage 1) on trajectories with functional tokens.

Variants by argument: `tiny` (CPU, synthetic suite, random init) or a published size
(`qwen2.5-vl-3b`, `-7b`, `-32b`, `-72b`; set --config.model.hf_path to the local weights).

  python -m launch.train --config=configs/sft.py:tiny --workdir=/tmp/atlas_sft
  python -m launch.train --config=configs/sft.py:qwen2.5-vl-7b --workdir=/ckpt/sft7b \
      --config.model.hf_path=/models/Qwen2.5-VL-7B-Instruct \
      --config.data.train_jsonl=/data/atlas/train.jsonl
"""

from configs.base import base_config


def get_config(arg: str = "tiny"):
  c = base_config()
  c.recipe = "sft"
  c.model.size = arg
  if arg == "tiny":
    c.optim.lr = 3e-3
    c.optim.warmup_steps = 10
    c.optim.weight_decay = 0.0
    c.train.steps = 150
    c.train.log_every = 10
    c.checkpoint.every = 50
  else:
    c.model.dtype = "bfloat16"
    c.model.remat = "dots_no_batch"
    c.optim.lr = 1e-5
    c.optim.warmup_steps = 50
    c.optim.weight_decay = 0.01
    c.data.batch_size = 64
    c.data.max_length = 4096
    c.data.length_buckets = (1024, 2048, 4096)
    c.data.max_pixels = 28 * 28 * 1280
    c.data.max_patches = 5120
    c.train.steps = 2000
    c.train.logprob_chunk = 512
    c.checkpoint.every = 200
  return c
