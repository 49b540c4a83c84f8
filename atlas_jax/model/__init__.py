"""Qwen2.5-VL as pure functions over a parameter pytree."""

from atlas_jax.model.config import SIZES, ModelConfig, TextConfig, VisionConfig, from_hf_dict, \
    from_hf_dir, from_size, to_hf_dict
from atlas_jax.model.rope import get_rope_index
from atlas_jax.model.vlm import Qwen25VL, abstract_params, causal_mask, forward, init_params, \
    param_axes, param_shardings

__all__ = ["SIZES", "from_size", "ModelConfig", "TextConfig", "VisionConfig", "from_hf_dict", "from_hf_dir",
           "to_hf_dict", "get_rope_index", "Qwen25VL", "abstract_params", "causal_mask",
           "forward", "init_params", "param_axes", "param_shardings"]
