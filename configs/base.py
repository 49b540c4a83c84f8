"""Config groups shared by every recipe. Recipes call `base_config()` and change fields.

Groups: model, tokenizer, functional_tokens, data, optim, train, checkpoint, mesh, distributed.
"""

import ml_collections

FUNCTIONAL_TOKENS = ("<|Manip|>", "<|Line|>", "<|Arrow|>", "<|Shape|>", "<|Text|>")


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.recipe = "sft"
  c.seed = 0

  c.model = ml_collections.ConfigDict()
  c.model.size = "tiny"     # a name in atlas_jax.model.SIZES, used when hf_path is empty
  c.model.hf_path = ""      # local Hugging Face Qwen2.5-VL directory to start from
  c.model.init_checkpoint = ""  # orbax checkpoint directory to take params from (RL after SFT)
  c.model.dtype = "float32"  # compute dtype; master params are always float32
  c.model.remat = "none"     # none | full | dots | dots_no_batch | attention_out

  c.tokenizer = ml_collections.ConfigDict()
  c.tokenizer.path = ""      # local HF tokenizer dir; empty: hf_path, else build the tiny BPE

  c.functional_tokens = ml_collections.ConfigDict()
  c.functional_tokens.tokens = FUNCTIONAL_TOKENS
  c.functional_tokens.init = "mean"  # mean | describe

  c.data = ml_collections.ConfigDict()
  c.data.train_jsonl = ""    # ATLAS trajectories; empty: generate the synthetic suite
  c.data.test_jsonl = ""
  c.data.dataset_dir = ""    # where the TFDS dataset is built; empty: <workdir>/data
  c.data.synthetic_per_family = 64
  c.data.synthetic_test_per_family = 16
  c.data.synthetic_seed = 0
  c.data.batch_size = 8      # global batch, split over data x fsdp
  c.data.max_length = 384
  c.data.length_buckets = (128, 256, 384)
  c.data.max_images = 1
  c.data.min_pixels = 28 * 28 * 4
  c.data.max_pixels = 28 * 28 * 36
  c.data.max_patches = 144    # per sample, = max_pixels / 14**2 for one image
  c.data.prompt_suffix = "\nPut the final answer in \\boxed{}."

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 1e-5
  c.optim.warmup_steps = 10
  c.optim.total_steps = -1   # -1: train.steps / grad_accum
  c.optim.final_lr_fraction = 0.1
  c.optim.weight_decay = 0.0
  c.optim.b1 = 0.9
  c.optim.b2 = 0.95
  c.optim.eps = 1e-8
  c.optim.clip_norm = 1.0
  c.optim.grad_accum = 1
  c.optim.freeze_vision = False

  c.train = ml_collections.ConfigDict()
  c.train.steps = 100
  c.train.log_every = 10
  c.train.logprob_chunk = 128  # sequence chunk for log-probs (never full [B, T, V] logits)

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every = 50
  c.checkpoint.keep = 2
  c.checkpoint.async_save = True

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = 1
  c.mesh.fsdp = -1           # -1: the rest of the devices
  c.mesh.tensor = 1

  c.distributed = ml_collections.ConfigDict()
  c.distributed.initialize = False  # jax.distributed.initialize (multi-host); env vars fill in
  c.distributed.coordinator_address = ""
  c.distributed.num_processes = -1
  c.distributed.process_id = -1
  return c
