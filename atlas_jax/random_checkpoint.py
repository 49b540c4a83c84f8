"""A Qwen2.5-VL of a given shape with random weights, built by transformers and written as a
Hugging Face directory: the checkpoints the tests and `launch.bench` load with `hf.load`,
without a download.

  config = random_checkpoint.hf_config(
      dict(vocab_size=8192, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
           num_attention_heads=8, num_key_value_heads=2),
      dict(depth=4, hidden_size=256, intermediate_size=512, num_heads=4),
      image_token_id=8000, video_token_id=8001, vision_start_token_id=8002,
      vision_end_token_id=8003)
  model = random_checkpoint.write("/tmp/random_qwen", config, seed=0)

torch and transformers are imported when a function runs (the `torch` extra).
"""

from __future__ import annotations


def mrope_section(head_dim: int) -> list[int]:
  """M-RoPE's split of the head's rotary half over (time, height, width): a quarter to time,
  the rest halved, as Qwen2.5-VL's [16, 24, 24] of head_dim 128."""
  half = head_dim // 2
  time = half // 4
  height = (half - time) // 2
  return [time, height, half - time - height]


def hf_config(text: dict, vision: dict, *, image_token_id: int, video_token_id: int,
              vision_start_token_id: int, vision_end_token_id: int, bos_token_id: int = 0,
              eos_token_id: int = 1, pad_token_id: int = 2):
  """transformers' Qwen2_5_VLConfig of one shape, in its field names.

  text: vocab_size, hidden_size, intermediate_size, num_hidden_layers, num_attention_heads,
  num_key_value_heads; optionally mrope_section (default `mrope_section(head_dim)`) and
  tie_word_embeddings (default False). vision: depth, hidden_size, intermediate_size,
  num_heads; optionally window_size (default 56 px: 2 x 2 merged patches) and
  fullatt_block_indexes (default: the last block). Patches are 14 px, merged 2 x 2, with a
  temporal patch of 2 (Qwen2.5-VL's).
  """
  from transformers import Qwen2_5_VLConfig
  text, vision = dict(text), dict(vision)
  head_dim = text["hidden_size"] // text["num_attention_heads"]
  section = text.pop("mrope_section", None) or mrope_section(head_dim)
  tie = text.pop("tie_word_embeddings", False)
  vision.setdefault("window_size", 56)
  vision.setdefault("fullatt_block_indexes", [vision["depth"] - 1])
  return Qwen2_5_VLConfig(
      text_config=dict(
          **text, rms_norm_eps=1e-6, tie_word_embeddings=tie,
          rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                           "mrope_section": list(section)},
          bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id),
      vision_config=dict(**vision, out_hidden_size=text["hidden_size"], patch_size=14,
                         spatial_merge_size=2, temporal_patch_size=2),
      image_token_id=image_token_id, video_token_id=video_token_id,
      vision_start_token_id=vision_start_token_id, vision_end_token_id=vision_end_token_id,
      tie_word_embeddings=tie)


def random_model(config, *, seed: int = 0, attn_implementation: str = "eager",
                 norm_noise: float = 0.1):
  """transformers' Qwen2_5_VLForConditionalGeneration of `config` (`hf_config`) with its
  own random float32 init, torch seeded with `seed`, in eval mode. transformers initialises
  norm weights to one and biases to zero; `norm_noise` (a standard deviation) adds Gaussian
  noise to each so that a comparison sees them (0: left as initialised).
  attn_implementation: "eager" (returns attention weights), "sdpa" (faster)."""
  import torch
  from transformers import Qwen2_5_VLForConditionalGeneration
  torch.manual_seed(seed)
  model = Qwen2_5_VLForConditionalGeneration._from_config(  # noqa: SLF001 (random init)
      config, attn_implementation=attn_implementation, dtype=torch.float32).eval()
  if norm_noise:
    with torch.no_grad():
      for name, p in model.named_parameters():
        if name.endswith("bias") or "norm" in name or "ln_q" in name:
          p.add_(norm_noise * torch.randn_like(p))
  return model


def write(path: str, config, *, seed: int = 0, attn_implementation: str = "eager",
          norm_noise: float = 0.1, dtype: str = "float32", **save_kwargs):
  """`random_model(config, ...)` saved to `path` as a Hugging Face directory (config.json
  and safetensors of `dtype`, e.g. "bfloat16" as the published checkpoints; `save_kwargs`
  go to `save_pretrained`). Returns the torch model (in `dtype`)."""
  import torch
  model = random_model(config, seed=seed, attn_implementation=attn_implementation,
                       norm_noise=norm_noise)
  if dtype != "float32":
    model = model.to(getattr(torch, dtype))
  model.save_pretrained(path, **save_kwargs)
  return model
