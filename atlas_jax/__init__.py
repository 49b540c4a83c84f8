"""atlas_jax: ATLAS functional-token visual reasoning for Qwen2.5-VL in JAX/Flax."""

__version__ = "0.1.0"
