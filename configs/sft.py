"""SFT recipe (ATLAS stage 1) on trajectories with functional tokens.

Variants by argument: `tiny` (CPU, synthetic suite, random init) or a published size
(`qwen2.5-vl-3b`, `-7b`, `-32b`, `-72b`; set --config.model.hf_path to the local weights).
A published size defaults to the mesh, remat, attention chunking, micro-batch and grad
accumulation proven to fit its slice in `FITS` (3B v5e:2x4, 7B v5e:4x4, 32B v5p:2x2x2,
72B v5p:2x2x4): a global batch of 64 sequences of up to 4,096 tokens per update.

  python -m launch.train --config=configs/sft.py:tiny --workdir=/tmp/atlas_sft
  python -m launch.train --config=configs/sft.py:qwen2.5-vl-7b --workdir=/ckpt/sft7b \
      --config.model.hf_path=/models/Qwen2.5-VL-7B-Instruct \
      --config.data.train_jsonl=/data/atlas/train.jsonl
"""

from atlas_jax.config import at_published_size, base_config

GLOBAL_BATCH = 64  # sequences per optimizer update: data.batch_size x optim.grad_accum
UPDATES = 2000
# Per published size, the settings proven to fit the slice named (the smallest of the
# README's AOT table), by `python -m launch.aot_report --config=configs/sft.py:<size>
# --topology=<slice>` (README, "Memory at scale"): mesh.tensor (fsdp takes the rest), the
# micro-batch (one row per data x fsdp batch shard) and the Adam moments' dtype.
# remat=full, attention "auto" (splash on TPU) and attention_chunk=1024 (the einsum path's,
# elsewhere) for all.
FITS = {
    "qwen2.5-vl-3b": dict(slice="v5e:2x4", tensor=2, batch_size=4, moments="float32"),
    "qwen2.5-vl-7b": dict(slice="v5e:4x4", tensor=4, batch_size=4, moments="float32"),
    "qwen2.5-vl-32b": dict(slice="v5p:2x2x2", tensor=4, batch_size=2, moments="bfloat16"),
    "qwen2.5-vl-72b": dict(slice="v5p:2x2x4", tensor=4, batch_size=4, moments="bfloat16"),
}


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
    fits = FITS.get(arg, FITS["qwen2.5-vl-7b"])
    at_published_size(c, tensor=fits["tensor"], moments_dtype=fits["moments"])
    c.optim.lr = 1e-5
    c.optim.warmup_steps = 50
    c.optim.weight_decay = 0.01
    c.data.batch_size = fits["batch_size"]
    c.optim.grad_accum = GLOBAL_BATCH // fits["batch_size"]
    c.data.max_length = 4096
    c.data.length_buckets = (1024, 2048, 4096)
    c.data.max_pixels = 28 * 28 * 1280
    c.data.max_patches = 5120
    # train.steps and checkpoint.every count micro-batches: UPDATES optimizer updates.
    c.train.steps = UPDATES * c.optim.grad_accum
    c.checkpoint.every = 200 * c.optim.grad_accum
  return c
