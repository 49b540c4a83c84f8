"""LA-GRPO recipe (ATLAS stage 2), started from an SFT checkpoint.

  python -m launch.train --config=configs/rl.py:tiny --workdir=/tmp/atlas_rl \
      --config.model.init_checkpoint=/tmp/atlas_sft/checkpoints \
      --config.tokenizer.path=/tmp/atlas_sft/tokenizer
  python -m launch.train --config=configs/rl.py:qwen2.5-vl-7b --workdir=/ckpt/rl7b \
      --config.model.init_checkpoint=/ckpt/sft7b/checkpoints \
      --config.tokenizer.path=/ckpt/sft7b/tokenizer --config.data.train_jsonl=/data/rl.jsonl

`--config.rl.alpha=0` is plain GRPO. A published size defaults to the mesh, remat,
attention chunking and micro-batching proven to fit its slice in `FITS` (3B v5e:2x4, 7B
v5e:4x4, 32B and 72B v5p:2x2x4). `<size>:shared` (e.g. `configs/rl.py:qwen2.5-vl-7b:shared`)
runs the training passes on grouped batches (rl.shared_prefix) as `SHARED_PREFIX` says.
"""

from atlas_jax.config import at_published_size, base_config

UPDATES = 500
# Per published size, the settings proven to fit the slice named (the smallest of the
# README's AOT table), by `python -m launch.aot_report --config=configs/rl.py:<size>
# --topology=<slice>` (README, "Memory at scale"): mesh.tensor (fsdp takes the rest) and the
# Adam moments' dtype. Each update takes rl.prompts_per_step x rl.group_size = 512
# rollouts in micro-batches of one row per data x fsdp batch shard (optim.grad_accum of
# them); remat=full, attention "auto" (splash on TPU) and attention_chunk=1024 (the einsum
# path's, elsewhere) for all.
# The sampler encodes every prompt's image at once (rl.prompts_per_step of them); with the
# splash kernels the vision tower never holds [heads, patches, patches], so every size takes
# images of up to 5,120 patches (1,280 merged tokens). With the einsum attention the 7B
# prefill needed 22.7 GiB per chip at 5,120 patches on v5e:4x4, and 3B and 7B were capped
# at 2,048 there (--config.model.attention_impl=xla needs --config.data.max_patches=2048
# --config.data.max_pixels=401408 on v5e).
FITS = {  # batch_shards: data x fsdp on that slice = chips / tensor
    "qwen2.5-vl-3b": dict(slice="v5e:2x4", tensor=2, batch_shards=4, moments="float32",
                          patches=5120),
    "qwen2.5-vl-7b": dict(slice="v5e:4x4", tensor=4, batch_shards=4, moments="float32",
                          patches=5120),
    # 32B: on v5p:2x2x2 (2 batch shards) the decode needs 179 GiB per chip.
    "qwen2.5-vl-32b": dict(slice="v5p:2x2x4", tensor=4, batch_shards=4, moments="bfloat16",
                           patches=5120),
    "qwen2.5-vl-72b": dict(slice="v5p:2x2x4", tensor=4, batch_shards=4, moments="bfloat16",
                           patches=5120),
}


# Per published size, the shared-prefix training passes (`<size>:shared`): the update's
# groups in `parts` (one group per batch shard per micro-batch: grad_accum = prompts x
# parts / batch shards), the log-prob passes on whole groups (rl.logprob_micro_batches 0:
# grad_accum / parts, each prompt once), the residual stream sequence-parallel over
# mesh.tensor. AOT on the FITS slice (2026-12-06, the splash kernels compiled for real),
# training passes per RL step and la-grpo GiB per chip, unshared -> shared: 3B 57.0 s ->
# 28.0 s, 11.89 -> 11.85 GiB; 7B 51.8 s -> 25.7 s, 13.09 -> 12.60 GiB; 72B (parts 2)
# 182.6 s -> 74.9 s, 86.68 -> 83.69 GiB. The other part counts, compiled with splash's
# Pallas interpretation (not re-run): 72B parts 4 95.5 s at 84.11 GiB; 7B parts 2 holds
# more (19.5 s at 14.29 GiB).
SHARED_PREFIX = {
    "qwen2.5-vl-3b": dict(parts=4),
    "qwen2.5-vl-7b": dict(parts=4),
    "qwen2.5-vl-72b": dict(parts=2),
}
VARIANTS = ("", "shared")


def get_config(arg: str = "tiny"):
  arg, _, variant = arg.partition(":")
  if variant not in VARIANTS or (variant and arg not in SHARED_PREFIX):
    raise ValueError(f"configs/rl.py:{arg}:{variant}: the variant must be one of "
                     f"{VARIANTS[1:]} after one of {sorted(SHARED_PREFIX)}")
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
    fits = FITS.get(arg, FITS["qwen2.5-vl-7b"])
    at_published_size(c, tensor=fits["tensor"], moments_dtype=fits["moments"])
    c.data.batch_size = fits["batch_shards"]  # RL reads rl.prompts_per_step; checked
    c.optim.lr = 1e-6
    c.optim.warmup_steps = 10
    c.data.max_length = 2048
    c.data.length_buckets = (1024, 2048)
    c.data.max_pixels = 28 * 28 * fits["patches"] // 4
    c.data.max_patches = fits["patches"]
    c.rl.group_size = 8
    c.rl.prompts_per_step = 64
    c.rl.max_new_tokens = 1024
    c.optim.grad_accum = c.rl.prompts_per_step * c.rl.group_size // fits["batch_shards"]
    if variant == "shared":
      parts = SHARED_PREFIX[arg]["parts"]
      c.rl.shared_prefix, c.rl.shared_prefix_parts, c.rl.sequence_parallel = True, parts, True
      c.optim.grad_accum = c.rl.prompts_per_step * parts // fits["batch_shards"]
    # train.steps and checkpoint.every count micro-batches: UPDATES optimizer updates.
    c.train.steps = UPDATES * c.optim.grad_accum
    c.checkpoint.every = 25 * c.optim.grad_accum
  return c
