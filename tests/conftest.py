"""Shared test kit: tiny random Hugging Face Qwen2.5-VL models built and saved locally."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")

from tests import factories  # noqa: E402


@pytest.fixture(scope="session", params=sorted(factories.TINY_CONFIGS))
def tiny_hf(request, tmp_path_factory):
  """(name, path, torch model) of a saved tiny random HF model, one per TINY_CONFIGS entry."""
  name = request.param
  path = str(tmp_path_factory.mktemp(f"hf_{name}"))
  model = factories.save_tiny_hf(name, path)
  return name, path, model
