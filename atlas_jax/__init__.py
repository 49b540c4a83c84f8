"""atlas_jax: ATLAS functional-token visual reasoning for Qwen2.5-VL in JAX/Flax."""

import os

# transformers warns at import that PyTorch is missing; atlas_jax uses only its tokenizers,
# configs and image processors, which need no PyTorch.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

__version__ = "0.1.0"
