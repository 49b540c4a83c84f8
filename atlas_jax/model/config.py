"""Model configuration: a frozen, hashable description of a Qwen2.5-VL model.

`ModelConfig` is static under `jax.jit` (it is hashable) and holds both the architecture
(read from a Hugging Face `config.json`, nested or flat form) and the run-time choices that
change the compiled graph (compute dtype, rematerialisation policy).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

_REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "attention_out")
_DTYPES = ("float32", "bfloat16", "float16")
_ATTENTION_IMPLS = ("xla", "cudnn", "splash")  # einsums | GPU cuDNN | TPU Pallas splash


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  """The vision tower (ViT with window attention and a 2x2 patch merger)."""

  depth: int = 32
  hidden_size: int = 1280
  intermediate_size: int = 3420
  num_heads: int = 16
  out_hidden_size: int = 3584
  in_channels: int = 3
  patch_size: int = 14
  temporal_patch_size: int = 2
  spatial_merge_size: int = 2
  window_size: int = 112
  fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
  hidden_act: str = "silu"
  rope_theta: float = 10000.0
  tokens_per_second: int = 2
  rms_norm_eps: float = 1e-6

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def patch_dim(self) -> int:
    """Length of one flattened patch row of `pixel_values`: C * T * p * p."""
    return self.in_channels * self.temporal_patch_size * self.patch_size**2

  @property
  def window_units(self) -> int:
    """Side of an attention window, in merged (2x2) units."""
    return self.window_size // self.spatial_merge_size // self.patch_size


@dataclasses.dataclass(frozen=True)
class TextConfig:
  """The language decoder (Qwen2 with M-RoPE)."""

  vocab_size: int = 152064
  hidden_size: int = 3584
  intermediate_size: int = 18944
  num_hidden_layers: int = 28
  num_attention_heads: int = 28
  num_key_value_heads: int = 4
  rms_norm_eps: float = 1e-6
  rope_theta: float = 1000000.0
  mrope_section: tuple[int, ...] = (16, 24, 24)
  hidden_act: str = "silu"
  max_position_embeddings: int = 128000
  tie_word_embeddings: bool = False

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture plus the graph-changing run-time options.

  `hf_extra` keeps every field of the original `config.json` that is not modelled here, as
  sorted JSON, so that an export writes it back unchanged.
  """

  vision: VisionConfig = VisionConfig()
  text: TextConfig = TextConfig()
  image_token_id: int = 151655
  video_token_id: int = 151656
  vision_start_token_id: int = 151652
  vision_end_token_id: int = 151653
  bos_token_id: int | None = 151643
  eos_token_id: int | tuple[int, ...] | None = 151645
  pad_token_id: int | None = None
  dtype: str = "float32"
  remat: str = "none"
  attention_chunk: int = 0  # >0: decoder queries attend this many at a time (long contexts)
  attention_impl: str = "xla"  # one of _ATTENTION_IMPLS (model/attention.py)
  # Layer scans and the attention's query-chunk loop emitted unrolled: the AOT report's
  # cost pass (XLA counts a loop body once). The same computation; never set for a run.
  unroll_loops: bool = False
  hf_extra: str = "{}"

  def __post_init__(self):
    validate(self)

  def replace(self, **changes) -> ModelConfig:
    return dataclasses.replace(self, **changes)

  def replace_text(self, **changes) -> ModelConfig:
    return dataclasses.replace(self, text=dataclasses.replace(self.text, **changes))


def validate(config: ModelConfig) -> None:
  """Checks the invariants the model code relies on; raises ValueError naming the field."""
  t, v = config.text, config.vision
  if config.dtype not in _DTYPES:
    raise ValueError(f"model dtype {config.dtype!r} is not one of {_DTYPES}")
  if config.attention_chunk < 0:
    raise ValueError(f"model attention_chunk {config.attention_chunk} must be >= 0 (0: off)")
  if config.attention_impl not in _ATTENTION_IMPLS:
    raise ValueError(f"model attention_impl {config.attention_impl!r} is not one of "
                     f"{_ATTENTION_IMPLS}")
  if config.attention_impl == "cudnn" and config.dtype == "float32":
    raise ValueError("model attention_impl 'cudnn' needs dtype bfloat16 or float16; got "
                     "float32")
  if config.remat not in _REMAT_POLICIES:
    raise ValueError(f"model remat {config.remat!r} is not one of {_REMAT_POLICIES}")
  if t.hidden_size % t.num_attention_heads:
    raise ValueError(
        f"text hidden_size {t.hidden_size} is not divisible by num_attention_heads "
        f"{t.num_attention_heads}")
  if t.num_attention_heads % t.num_key_value_heads:
    raise ValueError(
        f"text num_attention_heads {t.num_attention_heads} is not a multiple of "
        f"num_key_value_heads {t.num_key_value_heads}")
  if 2 * sum(t.mrope_section) != t.head_dim:
    raise ValueError(
        f"mrope_section {t.mrope_section} sums to {sum(t.mrope_section)}; expected head_dim/2 = "
        f"{t.head_dim // 2}")
  if v.hidden_size % v.num_heads or v.head_dim % 4:
    raise ValueError(
        f"vision hidden_size {v.hidden_size} / num_heads {v.num_heads} must give a head_dim "
        "divisible by 4 (2-D rotary embedding)")
  if v.window_units < 1:
    raise ValueError(
        f"vision window_size {v.window_size} is smaller than one merged unit "
        f"({v.spatial_merge_size * v.patch_size} pixels)")
  bad = [i for i in v.fullatt_block_indexes if not 0 <= i < v.depth]
  if bad:
    raise ValueError(f"fullatt_block_indexes {bad} are outside the {v.depth} vision blocks")


# ---------------------------------------------------------------------------------------
# Hugging Face config.json <-> ModelConfig

_TEXT_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "rms_norm_eps", "hidden_act",
                "max_position_embeddings")
_VISION_FIELDS = ("depth", "hidden_size", "intermediate_size", "num_heads", "out_hidden_size",
                  "in_channels", "patch_size", "temporal_patch_size", "spatial_merge_size",
                  "window_size", "hidden_act", "tokens_per_second")
_TOP_FIELDS = ("image_token_id", "video_token_id", "vision_start_token_id",
               "vision_end_token_id")
_TOKEN_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def _rope(d: dict[str, Any]) -> tuple[float | None, list[int] | None]:
  """(rope_theta, mrope_section) from any of the forms transformers has written."""
  theta = d.get("rope_theta")
  section = None
  for key in ("rope_parameters", "rope_scaling"):
    rp = d.get(key) or {}
    theta = rp.get("rope_theta", theta)
    section = rp.get("mrope_section", section)
  return theta, section


def from_hf_dict(d: dict[str, Any], **runtime) -> ModelConfig:
  """Builds a ModelConfig from a parsed Qwen2.5-VL `config.json`.

  Accepts the nested form (`text_config` / `vision_config`, transformers >= 4.5x) and the
  flat form of the published checkpoints (text fields at the top level). `runtime` sets
  `dtype` / `remat`.
  """
  if "vision_config" not in d:
    raise ValueError("config.json has no 'vision_config'; expected a Qwen2.5-VL config")
  text_d = dict(d.get("text_config") or {})
  # Flat form: text fields live at the top level. Top level wins only where text_config
  # does not define the field (transformers writes both in some versions).
  for k, val in d.items():
    if k not in ("text_config", "vision_config"):
      text_d.setdefault(k, val)
  vis_d = d["vision_config"]

  theta, section = _rope(text_d)
  text_kw = {k: text_d[k] for k in _TEXT_FIELDS if k in text_d}
  if text_kw.get("num_key_value_heads") is None:
    text_kw["num_key_value_heads"] = text_d.get("num_attention_heads",
                                                TextConfig.num_attention_heads)
  if theta is not None:
    text_kw["rope_theta"] = float(theta)
  if section is not None:
    text_kw["mrope_section"] = tuple(int(s) for s in section)
  text_kw["tie_word_embeddings"] = bool(
      d.get("tie_word_embeddings", False) or text_d.get("tie_word_embeddings", False))

  vis_kw = {k: vis_d[k] for k in _VISION_FIELDS if k in vis_d}
  if "fullatt_block_indexes" in vis_d:
    vis_kw["fullatt_block_indexes"] = tuple(int(i) for i in vis_d["fullatt_block_indexes"])
  vtheta, _ = _rope(vis_d)
  if vtheta is not None:
    vis_kw["rope_theta"] = float(vtheta)

  top = {k: d[k] for k in _TOP_FIELDS if k in d}
  for k in _TOKEN_FIELDS:
    if k in text_d:
      val = text_d[k]
      top[k] = tuple(val) if isinstance(val, list) else val
  known = set(_TOP_FIELDS) | {"text_config", "vision_config", "tie_word_embeddings"}
  known |= set(_TEXT_FIELDS) | set(_TOKEN_FIELDS) | {"rope_theta", "rope_scaling",
                                                    "rope_parameters"}
  extra = {k: val for k, val in d.items() if k not in known}
  return ModelConfig(vision=VisionConfig(**vis_kw), text=TextConfig(**text_kw),
                     hf_extra=json.dumps(extra, sort_keys=True), **top, **runtime)


def from_hf_dir(path: str, **runtime) -> ModelConfig:
  """Reads `<path>/config.json`; a missing file stops with its path."""
  cfg_path = os.path.join(path, "config.json")
  if not os.path.isfile(cfg_path):
    raise FileNotFoundError(f"{cfg_path} does not exist; expected a Hugging Face model directory")
  with open(cfg_path) as f:
    return from_hf_dict(json.load(f), **runtime)


def to_hf_dict(config: ModelConfig) -> dict[str, Any]:
  """The nested `config.json` a Qwen2_5_VLForConditionalGeneration loads."""
  t, v = config.text, config.vision
  text_d = {k: getattr(t, k) for k in _TEXT_FIELDS}
  text_d.update(
      model_type="qwen2_5_vl_text",
      rope_parameters={"rope_type": "default", "rope_theta": t.rope_theta,
                       "mrope_section": list(t.mrope_section)},
      tie_word_embeddings=t.tie_word_embeddings,
      bos_token_id=config.bos_token_id,
      eos_token_id=(list(config.eos_token_id) if isinstance(config.eos_token_id, tuple)
                    else config.eos_token_id),
      pad_token_id=config.pad_token_id)
  vis_d = {k: getattr(v, k) for k in _VISION_FIELDS}
  vis_d.update(model_type="qwen2_5_vl_vision",
               fullatt_block_indexes=list(v.fullatt_block_indexes),
               rope_parameters={"rope_type": "axial", "rope_theta": v.rope_theta})
  d = json.loads(config.hf_extra)
  d.update({k: getattr(config, k) for k in _TOP_FIELDS})
  d.update(model_type="qwen2_5_vl", architectures=["Qwen2_5_VLForConditionalGeneration"],
           tie_word_embeddings=t.tie_word_embeddings, text_config=text_d, vision_config=vis_d)
  return d


# ---------------------------------------------------------------------------------------
# Published sizes (Qwen2.5-VL-*-Instruct config.json), by name.

_VISION_3B_7B = VisionConfig(intermediate_size=3420)
_VISION_32B_72B = VisionConfig(intermediate_size=3456)

SIZES: dict[str, ModelConfig] = {
    "qwen2.5-vl-3b": ModelConfig(
        vision=dataclasses.replace(_VISION_3B_7B, out_hidden_size=2048),
        text=TextConfig(vocab_size=151936, hidden_size=2048, intermediate_size=11008,
                        num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2,
                        tie_word_embeddings=True)),
    "qwen2.5-vl-7b": ModelConfig(
        vision=dataclasses.replace(_VISION_3B_7B, out_hidden_size=3584),
        text=TextConfig(vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                        num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4)),
    "qwen2.5-vl-32b": ModelConfig(
        vision=dataclasses.replace(_VISION_32B_72B, out_hidden_size=5120),
        text=TextConfig(vocab_size=152064, hidden_size=5120, intermediate_size=27648,
                        num_hidden_layers=64, num_attention_heads=40, num_key_value_heads=8)),
    "qwen2.5-vl-72b": ModelConfig(
        vision=dataclasses.replace(_VISION_32B_72B, out_hidden_size=8192),
        text=TextConfig(vocab_size=152064, hidden_size=8192, intermediate_size=29568,
                        num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8)),
}


def from_size(name: str, **runtime) -> ModelConfig:
  """A published size by name (e.g. "qwen2.5-vl-7b"), with run-time fields set."""
  if name not in SIZES:
    raise ValueError(f"unknown model size {name!r}; expected one of {sorted(SIZES)}")
  return dataclasses.replace(SIZES[name], **runtime)


# A tiny model for CPU tests and the demo. Its vocab_size is refitted to the tokenizer when
# initialised from scratch.
SIZES["tiny"] = ModelConfig(
    vision=VisionConfig(depth=2, hidden_size=64, intermediate_size=128, num_heads=2,
                        out_hidden_size=128, window_size=56, fullatt_block_indexes=(1,)),
    text=TextConfig(vocab_size=1152, hidden_size=128, intermediate_size=384,
                    num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                    mrope_section=(4, 6, 6), tie_word_embeddings=True,
                    max_position_embeddings=4096))


def from_dict(d: dict[str, Any]) -> ModelConfig:
  """Inverse of `dataclasses.asdict(config)` (JSON turns tuples into lists)."""
  tup = lambda x: tuple(x) if isinstance(x, list) else x
  vision = VisionConfig(**{k: tup(v) for k, v in d["vision"].items()})
  text = TextConfig(**{k: tup(v) for k, v in d["text"].items()})
  rest = {k: tup(v) for k, v in d.items() if k not in ("vision", "text")}
  return ModelConfig(vision=vision, text=text, **rest)
