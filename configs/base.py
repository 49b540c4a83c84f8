"""Config groups shared by every recipe. Recipes call `base_config()` and change fields.

Groups: model, tokenizer, functional_tokens, data, optim, train, checkpoint, mesh, rl,
eval, distributed.
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
  c.model.attention_chunk = 0  # >0: decoder attention over this many queries at a time
  # xla (einsums) | cudnn (GPU, bf16) | splash (TPU Pallas) | auto (splash on TPU, else xla)
  c.model.attention_impl = "xla"

  c.tokenizer = ml_collections.ConfigDict()
  c.tokenizer.path = ""      # local HF tokenizer dir; empty: hf_path, else build the tiny BPE

  c.functional_tokens = ml_collections.ConfigDict()
  c.functional_tokens.tokens = FUNCTIONAL_TOKENS
  c.functional_tokens.init = "mean"  # mean | describe

  c.data = ml_collections.ConfigDict()
  c.data.train_jsonl = ""    # .jsonl or .json data file; empty: generate the synthetic suite
  c.data.test_jsonl = ""
  c.data.format = "auto"     # reader per file: auto (from its fields) | atlas | chat | llava | rl
  c.data.image_root = ""     # relative image paths: under this folder if found, else the file's
  c.data.on_source_change = "rebuild"  # a source changed since the build: rebuild | error
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
  # Per module, by parameter path: vision = the tower without the patch merger, merger =
  # the 2x2 merger, llm = embedding + decoder + LM head. A frozen group keeps its init and
  # holds no moments; lr_scale multiplies optim.lr (and its schedule) for that group.
  for group in ("vision", "merger", "llm"):
    c.optim[group] = ml_collections.ConfigDict(dict(trainable=True, lr_scale=1.0))
  c.optim.moments_dtype = "float32"  # Adam mu/nu storage: float32 | bfloat16 (half memory)

  c.train = ml_collections.ConfigDict()
  c.train.steps = 100
  c.train.stop_after = -1    # stop this job after this many steps (-1: at train.steps); resumes
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

  c.rl = ml_collections.ConfigDict()
  c.rl.group_size = 4          # G completions per prompt
  c.rl.prompts_per_step = 4    # B prompts per step (global)
  c.rl.max_new_tokens = 128    # must be a multiple of train.logprob_chunk
  c.rl.temperature = 1.0
  c.rl.top_k = 0
  c.rl.top_p = 1.0
  c.rl.inner_updates = 1       # mu: updates per rollout batch against stored old log-probs
  c.rl.clip_low = 0.2
  c.rl.clip_high = 0.28
  c.rl.beta = 0.0              # KL to the frozen start; 0 keeps no reference copy
  c.rl.kl_estimator = "k3"     # k1 | k3
  c.rl.loss_agg = "token-mean"  # verl's agg_loss modes (see grpo.aggregate) or TRL's dr_grpo
  c.rl.alpha = 0.1             # LA-GRPO anchor weight; 0 = plain GRPO
  c.rl.anchor = "pg"           # pg | nll_pos
  c.rl.scale_adv_by_std = True  # False: Dr. GRPO advantages (r - group mean)
  c.rl.adv_std = "sample"      # sample (ddof 1, as verl/TRL) | population (ddof 0)
  c.rl.clip_ratio_c = 3.0      # dual-clip bound for negative advantages (verl's); 0 = off
  c.rl.log_ratio_clamp = 20.0  # |log pi/pi_old| clamp before exp (verl's); 0 = off
  c.rl.importance_level = "token"  # token | sequence (GSPO's sequence-level ratio)
  c.rl.dynamic_sampling = False  # DAPO: drop all-equal-reward groups, draw more prompts
  c.rl.dynamic_sampling_max_draws = 10  # prompt batches drawn per step at most (then pad)
  c.rl.overlong_buffer = 0     # DAPO soft overlong penalty over the last this many tokens; 0 = off
  c.rl.overlong_penalty = 1.0  # the penalty at max_new_tokens (DAPO's penalty factor)
  c.rl.tis_cap = 0.0           # truncated importance sampling cap; 0 = off
  c.rl.eval_prompts = 64
  c.rl.eval_batch_size = 16    # prompts per greedy evaluation batch (global)
  c.rl.reward = ml_collections.ConfigDict()
  c.rl.reward.weights = ml_collections.ConfigDict(
      dict(accuracy=1.0, format=0.2, functional=0.2, spam_penalty=0.2, length_penalty=0.1))
  c.rl.reward.max_functional_tokens = 6
  c.rl.reward.length_budget = 256
  c.rl.reward.functional_tokens = FUNCTIONAL_TOKENS

  c.eval = ml_collections.ConfigDict()  # a benchmark scored during SFT and RL (atlas_jax.eval)
  c.eval.data = ""           # .jsonl/.json, VLMEvalKit .tsv or HF .parquet; empty: off
  c.eval.format = "auto"     # auto (from the extension) | tsv | parquet | atlas | chat | llava | rl
  c.eval.prompt = "native"   # native (the format's convention) | boxed | question
  c.eval.every = 0           # steps between evaluations; 0: only at the job's last step
  c.eval.max_rows = 0        # the first this many usable rows; 0: all
  c.eval.batch_size = 16     # prompts per batch (global)
  c.eval.max_new_tokens = 0  # 0: rl.max_new_tokens
  c.eval.subtasks = ()       # categories averaged as eval/subtask_mean, or ("blink_atlas",)
  c.eval.keep_best = ""      # metric to keep <workdir>/best by (e.g. "accuracy"; "-x": lowest)

  c.distributed = ml_collections.ConfigDict()
  c.distributed.initialize = False  # jax.distributed.initialize (multi-host); env vars fill in
  c.distributed.coordinator_address = ""
  c.distributed.num_processes = -1
  c.distributed.process_id = -1
  return c
