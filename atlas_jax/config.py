"""The run configuration: every field with its default (`base_config`), the values each
field allows, the published-size settings both recipes share (`at_published_size`), and the
one check of every group (`validate`), run before any work.

Groups: model, tokenizer, functional_tokens, data, optim, train, checkpoint, mesh, rl,
eval, distributed (and, in the demo and ablation recipes, demo and ablate). Recipe files
under configs/ call `base_config()` and change fields; `validate` stops at the first bad
field with one sentence naming it and what was expected.
"""

from __future__ import annotations

import math
import os

import jax
import ml_collections

from atlas_jax import functional_tokens, sharding
from atlas_jax.data import chat, formats, tfds_builder
from atlas_jax.model import SIZES, attention

RECIPES = ("sft", "rl", "demo", "ablate")
DTYPES = ("float32", "bfloat16", "float16")
REMATS = ("none", "full", "dots", "dots_no_batch", "attention_out")
# optim: the parameter groups (each {trainable, lr_scale}) and the Adam moments' storage.
OPTIM_GROUPS = ("vision", "merger", "llm")
MOMENTS_DTYPES = ("float32", "bfloat16")
# rl: the loss's modes (their meaning: atlas_jax/rl/grpo.py).
AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                "seq-mean-token-sum-norm", "dr_grpo")
KL_ESTIMATORS = ("k1", "k3")
ANCHORS = ("pg", "nll_pos")
ADV_STDS = ("sample", "population")
IMPORTANCE_LEVELS = ("token", "sequence")
# eval: benchmark file formats, prompt modes and the metrics best checkpoints are kept by.
EVAL_FORMATS = ("auto", "tsv", "parquet") + tuple(f for f in formats.FORMATS if f != "auto")
PROMPTS = ("native", "boxed", "question")
EVAL_METRICS = ("accuracy", "category_mean", "subtask_mean", "extraction_failure_rate",
                "answers_with_functional_tokens", "mean_length", "functional_per_answer")
# ablate: the variants compared.
VARIANTS = ("grpo", "la_grpo_pg", "la_grpo_nll_pos")


def base_config() -> ml_collections.ConfigDict:
  """Every field a recipe may set, at its default (unlocked; recipes change fields)."""
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
  c.functional_tokens.tokens = functional_tokens.FUNCTIONAL_TOKENS
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
  # Appended to the last user turn. "auto": "\nPut the final answer in \\boxed{}." where the
  # record's answer is boxed (the synthetic suite, ATLAS trajectories) or it has none (RL
  # prompts: the reward reads the last \boxed{}), nothing for chat/LLaVA answers without a
  # box; any other string (e.g. "") is appended to every record as given.
  c.data.prompt_suffix = chat.AUTO_SUFFIX

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
  # Shared-prefix training passes (run/shared_prefix.py): old/ref log-probs and the update
  # run each prompt (vision tower, prompt layers) once for its G completions, not G times;
  # equal to the unshared rows within float32 rounding. Micro-batches then hold whole groups.
  c.rl.shared_prefix = False
  c.rl.shared_prefix_parts = 1  # the update's groups: each as this many groups of G / parts
  # completions, each with its prompt: micro-batches this many times smaller, the prompt run
  # this often; the log-prob passes read each prompt once whatever this says
  c.rl.logprob_micro_batches = 0  # micro-batches of the old/ref log-prob passes over the
  # rollout batch (whole groups under shared_prefix); 0: optim.grad_accum / shared_prefix_parts
  # (the update's completions per micro-batch)
  c.rl.sequence_parallel = False  # the RL training passes with the residual stream's length
  # over mesh.tensor too (sharding.SEQUENCE_PARALLEL_RULES): remat's saved layer inputs / tensor
  c.rl.eval_prompts = 64
  c.rl.eval_batch_size = 16    # prompts per greedy evaluation batch (global)
  c.rl.reward = ml_collections.ConfigDict()
  c.rl.reward.weights = ml_collections.ConfigDict(
      dict(accuracy=1.0, format=0.2, functional=0.2, spam_penalty=0.2, length_penalty=0.1))
  c.rl.reward.max_functional_tokens = 6
  c.rl.reward.length_budget = 256
  c.rl.reward.functional_tokens = c.functional_tokens.get_ref("tokens")  # unless set

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


def at_published_size(c, *, tensor: int, moments_dtype: str) -> None:
  """The settings every recipe takes at a published size (3B-72B, on a TPU slice or GPU
  hosts): bfloat16 compute, full remat, splash attention on TPU (the einsums chunked by
  1,024 queries elsewhere), `tensor`-way model parallelism (fsdp takes the rest), Adam
  moments in `moments_dtype`, log-probs 512 positions at a time."""
  c.model.dtype = "bfloat16"
  c.model.remat = "full"
  c.model.attention_impl = "auto"
  c.model.attention_chunk = 1024
  c.mesh.tensor = tensor
  c.optim.moments_dtype = moments_dtype
  c.train.logprob_chunk = 512


def _fail(field: str, value, expected: str):
  raise ValueError(f"config.{field} {value!r} {expected}")


def _one_of(c, field: str, allowed) -> None:
  value = c
  for part in field.split("."):
    value = value[part]
  if value not in allowed:
    _fail(field, value, f"is not one of {tuple(allowed)}")


def _number(value, field: str, *, low=None, integer: bool = False, positive: bool = False):
  """A real (or integer) number >= low (> 0 when positive), finite."""
  kind = int if integer else (int, float)
  if isinstance(value, bool) or not isinstance(value, kind) or not math.isfinite(value):
    _fail(field, value, f"must be a finite {'integer' if integer else 'number'}")
  if positive and value <= 0:
    _fail(field, value, "must be > 0")
  if low is not None and value < low:
    _fail(field, value, f"must be >= {low}")


def logprob_micro_batches(c) -> int:
  """Micro-batches of the RL log-prob passes over one rollout batch: rl.logprob_micro_batches,
  or (0) optim.grad_accum / rl.shared_prefix_parts (under rl.shared_prefix), at least 1: the
  update's completions per micro-batch."""
  if c.rl.logprob_micro_batches:
    return int(c.rl.logprob_micro_batches)
  parts = c.rl.shared_prefix_parts if c.rl.shared_prefix else 1
  return max(1, c.optim.grad_accum // parts)


def validate(c) -> None:
  """Stops before any work with one sentence naming the first bad field and what was
  expected. Checks every group the config has; values are checked before they are used in
  a check of their own (no division by a zero chunk)."""
  if c.recipe not in RECIPES:
    _fail("recipe", c.recipe, f"is not one of {RECIPES}")
  _validate_model(c)
  _validate_data(c)
  _validate_optim(c.optim)
  _validate_train(c)
  if c.recipe == "rl":
    _validate_rl(c)
  if c.get("eval") is not None and c.eval.data:
    _validate_eval(c)
  if c.get("ablate") is not None:
    _validate_ablate(c.ablate)


def _validate_model(c) -> None:
  m = c.model
  if not m.hf_path and m.size not in SIZES:
    _fail("model.size", m.size, f"is not one of {sorted(SIZES)} (or set config.model.hf_path)")
  if m.hf_path and not os.path.isdir(m.hf_path):
    _fail("model.hf_path", m.hf_path, "is not a directory")
  if m.init_checkpoint and not os.path.isdir(m.init_checkpoint):
    _fail("model.init_checkpoint", m.init_checkpoint, "is not a directory")
  _one_of(c, "model.dtype", DTYPES)
  _one_of(c, "model.remat", REMATS)
  _one_of(c, "model.attention_impl", attention.CHOICES)
  _number(m.attention_chunk, "model.attention_chunk", low=0, integer=True)
  if c.tokenizer.path and not os.path.isdir(c.tokenizer.path):
    _fail("tokenizer.path", c.tokenizer.path, "is not a directory (a local Hugging Face "
          "tokenizer)")
  tokens = tuple(c.functional_tokens.tokens)
  if len(set(tokens)) != len(tokens) or not all(
      isinstance(t, str) and t.startswith("<|") and t.endswith("|>") for t in tokens):
    _fail("functional_tokens.tokens", tokens, "must be distinct <|...|> strings")
  _one_of(c, "functional_tokens.init", functional_tokens.INIT_MODES)


def _validate_data(c) -> None:
  d = c.data
  for name in ("train_jsonl", "test_jsonl"):
    if d[name] and not os.path.isfile(d[name]):
      _fail(f"data.{name}", d[name], "does not exist")
  _one_of(c, "data.format", formats.FORMATS)
  _one_of(c, "data.on_source_change", tfds_builder.ON_SOURCE_CHANGE)
  if not isinstance(d.prompt_suffix, str):
    _fail("data.prompt_suffix", d.prompt_suffix, f"must be a string ({chat.AUTO_SUFFIX!r}, '' "
          "or the text to append)")
  if d.image_root and not os.path.isdir(d.image_root):
    _fail("data.image_root", d.image_root, "is not a directory")
  for name in ("batch_size", "max_length", "max_images", "min_pixels", "max_pixels",
               "max_patches", "synthetic_per_family", "synthetic_test_per_family"):
    _number(d[name], f"data.{name}", integer=True, positive=name != "max_images",
            low=0 if name == "max_images" else None)
  buckets = tuple(d.length_buckets)
  if (not buckets or not all(isinstance(b, int) and b > 0 for b in buckets)
      or list(buckets) != sorted(set(buckets)) or buckets[-1] > d.max_length):
    _fail("data.length_buckets", buckets, "must be strictly increasing positive integers "
          f"ending at or below data.max_length {d.max_length}")
  if d.min_pixels > d.max_pixels:
    _fail("data.min_pixels", d.min_pixels, f"must be <= data.max_pixels {d.max_pixels}")
  if d.max_patches % 4:
    _fail("data.max_patches", d.max_patches, "must be a multiple of 4")
  if d.max_pixels // 196 > d.max_patches * max(d.max_images, 1):
    _fail("data.max_patches", d.max_patches, f"cannot hold an image of data.max_pixels "
          f"{d.max_pixels} ({d.max_pixels // 196} patches)")


def _validate_optim(optim) -> None:
  for name in ("lr", "final_lr_fraction", "weight_decay", "eps", "clip_norm"):
    _number(optim[name], f"optim.{name}", low=0)
  for name in ("b1", "b2"):
    _number(optim[name], f"optim.{name}", low=0)
    if optim[name] >= 1:
      _fail(f"optim.{name}", optim[name], "must be in [0, 1)")
  _number(optim.warmup_steps, "optim.warmup_steps", low=0, integer=True)
  _number(optim.total_steps, "optim.total_steps", low=-1, integer=True)
  _number(optim.grad_accum, "optim.grad_accum", low=1, integer=True)
  for name in OPTIM_GROUPS:
    group = optim[name]
    if not isinstance(group.trainable, bool):
      _fail(f"optim.{name}.trainable", group.trainable, "must be True or False")
    scale = group.lr_scale
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 <= scale < 1e6:
      _fail(f"optim.{name}.lr_scale", scale, "must be a number >= 0 (a multiple of optim.lr)")
  if not any(optim[name].trainable for name in OPTIM_GROUPS):
    raise ValueError("config.optim.vision, merger and llm all have trainable=False: nothing "
                     "would train")
  if optim.moments_dtype not in MOMENTS_DTYPES:
    _fail("optim.moments_dtype", optim.moments_dtype, f"is not one of {MOMENTS_DTYPES}")


def _validate_train(c) -> None:
  t = c.train
  _number(t.steps, "train.steps", low=1, integer=True)
  _number(t.log_every, "train.log_every", low=1, integer=True)
  _number(t.logprob_chunk, "train.logprob_chunk", low=1, integer=True)
  if t.stop_after != -1:
    _number(t.stop_after, "train.stop_after", low=1, integer=True)
  if any(b % min(t.logprob_chunk, b) for b in c.data.length_buckets):
    _fail("train.logprob_chunk", t.logprob_chunk,
          f"must divide every length bucket {tuple(c.data.length_buckets)}")
  _number(c.checkpoint.every, "checkpoint.every", low=1, integer=True)
  _number(c.checkpoint.keep, "checkpoint.keep", low=1, integer=True)
  for axis in ("data", "tensor"):
    _number(c.mesh[axis], f"mesh.{axis}", low=1, integer=True)
  if c.mesh.fsdp != -1:
    _number(c.mesh.fsdp, "mesh.fsdp", low=1, integer=True)


def _validate_rl(c) -> None:
  rl, chunk = c.rl, c.train.logprob_chunk
  _number(rl.max_new_tokens, "rl.max_new_tokens", low=1, integer=True)
  if rl.max_new_tokens % min(chunk, rl.max_new_tokens):
    _fail("rl.max_new_tokens", rl.max_new_tokens,
          f"must be a multiple of train.logprob_chunk {chunk}")
  _number(rl.group_size, "rl.group_size", integer=True)
  if rl.group_size < 2:
    _fail("rl.group_size", rl.group_size, "must be >= 2 (advantages are relative to the "
          "group)")
  for name in ("prompts_per_step", "inner_updates", "eval_batch_size", "eval_prompts",
               "dynamic_sampling_max_draws"):
    _number(rl[name], f"rl.{name}", low=1, integer=True)
  for name in ("temperature", "top_p", "clip_low", "clip_high", "beta", "alpha", "tis_cap",
               "log_ratio_clamp", "overlong_penalty"):
    _number(rl[name], f"rl.{name}", low=0)
  if not 0 < rl.top_p <= 1:
    _fail("rl.top_p", rl.top_p, "must be in (0, 1]")
  _number(rl.top_k, "rl.top_k", low=0, integer=True)
  for field, allowed in (("kl_estimator", KL_ESTIMATORS), ("anchor", ANCHORS),
                         ("loss_agg", AGGREGATIONS), ("adv_std", ADV_STDS),
                         ("importance_level", IMPORTANCE_LEVELS)):
    _one_of(c, f"rl.{field}", allowed)
  if rl.clip_ratio_c != 0 and rl.clip_ratio_c <= 1:
    _fail("rl.clip_ratio_c", rl.clip_ratio_c, "must be > 1 (the dual-clip bound) or 0 (off)")
  if not 0 <= rl.overlong_buffer <= rl.max_new_tokens:
    _fail("rl.overlong_buffer", rl.overlong_buffer,
          f"must be in [0, rl.max_new_tokens {rl.max_new_tokens}]")
  if not isinstance(rl.shared_prefix, bool):
    _fail("rl.shared_prefix", rl.shared_prefix, "must be True or False")
  _number(rl.shared_prefix_parts, "rl.shared_prefix_parts", low=1, integer=True)
  if rl.group_size % rl.shared_prefix_parts:
    _fail("rl.shared_prefix_parts", rl.shared_prefix_parts,
          f"must divide rl.group_size {rl.group_size}")
  groups = rl.prompts_per_step * rl.shared_prefix_parts
  if rl.shared_prefix and groups % c.optim.grad_accum:
    _fail("optim.grad_accum", c.optim.grad_accum, "must divide rl.prompts_per_step x "
          f"rl.shared_prefix_parts = {groups} under rl.shared_prefix (micro-batches hold "
          "whole groups)")
  if not isinstance(rl.sequence_parallel, bool):
    _fail("rl.sequence_parallel", rl.sequence_parallel, "must be True or False")
  _number(rl.logprob_micro_batches, "rl.logprob_micro_batches", low=0, integer=True)
  count = logprob_micro_batches(c)
  rows = rl.prompts_per_step * (1 if rl.shared_prefix else rl.group_size)
  if rows % count:
    what = ("rl.prompts_per_step (whole groups under rl.shared_prefix)" if rl.shared_prefix
            else "rl.prompts_per_step x rl.group_size")
    _fail("rl.logprob_micro_batches", rl.logprob_micro_batches,
          f"resolves to {count}, which must divide {what} = {rows}")
  per_rollout = rl.inner_updates * c.optim.grad_accum  # optimizer micro-steps per rollout
  if c.train.steps % per_rollout:
    _fail("train.steps", c.train.steps, "must be a multiple of rl.inner_updates x "
          f"optim.grad_accum = {per_rollout}")


def _validate_eval(c) -> None:
  e = c.eval
  if not os.path.isfile(e.data):
    _fail("eval.data", e.data, "does not exist")
  _one_of(c, "eval.format", EVAL_FORMATS)
  _one_of(c, "eval.prompt", PROMPTS)
  for field in ("every", "max_rows", "max_new_tokens"):
    _number(e[field], f"eval.{field}", low=0, integer=True)
  _number(e.batch_size, "eval.batch_size", low=1, integer=True)
  try:
    mesh = sharding.resolve_mesh_shape(dict(c.mesh), jax.device_count())
  except ValueError:
    mesh = None  # the run's own mesh check names the problem
  if mesh:
    ways = math.lcm(mesh["data"] * mesh["fsdp"], jax.process_count())
    if e.batch_size % ways:
      _fail("eval.batch_size", e.batch_size, f"must be a multiple of {ways} (the mesh's "
            "data x fsdp batch shards and the processes)")
  name = e.keep_best.lstrip("-")
  if e.keep_best and not (name in EVAL_METRICS or name.startswith(("accuracy/", "pass@"))):
    _fail("eval.keep_best", e.keep_best, f"is not one of {EVAL_METRICS}, accuracy/<category> "
          "or pass@k (a leading '-' keeps the lowest)")


def _validate_ablate(a) -> None:
  seeds, variants = tuple(a.seeds), tuple(a.variants)
  if not seeds or len(set(seeds)) != len(seeds) or not all(
      isinstance(s, int) and not isinstance(s, bool) for s in seeds):
    _fail("ablate.seeds", seeds, "must be distinct integers, at least one")
  if not variants or len(set(variants)) != len(variants):
    _fail("ablate.variants", variants, f"must be distinct names from {VARIANTS}")
  for v in variants:
    if v not in VARIANTS:
      raise ValueError(f"config.ablate.variants has {v!r}; expected names from {VARIANTS}")
  alphas = tuple(a.alphas)
  if not alphas or len(set(alphas)) != len(alphas):
    _fail("ablate.alphas", alphas, "must be distinct numbers > 0, at least one (the LA-GRPO "
          "variants' anchor weights; grpo is alpha 0)")
  for alpha in alphas:
    _number(alpha, "ablate.alphas", positive=True)
  for name in ("token_rate", "wrong_token_rate"):
    _number(a.suite[name], f"ablate.suite.{name}", low=0)
    if a.suite[name] > 1:
      _fail(f"ablate.suite.{name}", a.suite[name], "must be in [0, 1]")
  _number(a.suite.filler_sentences, "ablate.suite.filler_sentences", low=0, integer=True)
