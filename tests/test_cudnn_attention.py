"""cuDNN fused attention (`model.attention_impl="cudnn"`) against the einsum path, in
bfloat16 on a GPU: the model's logits and gradients. Skipped without a GPU (the CPU suite
checks the cudnn path's argument layout in test_attention.py)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from atlas_jax.model import forward, init_params
from tests import factories

pytestmark = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")


def _inputs():
  """Two rows of 64 tokens, the second left-padded by 9, with one 8x8-patch image each."""
  config = factories.tiny_model_config()
  rng = np.random.default_rng(0)
  ids = rng.integers(3, 240, (2, 64)).astype(np.int32)
  ids[:, 20:36] = config.image_token_id  # 8 x 8 patches -> 16 merged tokens
  mask = np.ones_like(ids)
  mask[1, :9] = 0
  pixels = rng.normal(size=(2, 64, config.vision.patch_dim)).astype(np.float32)
  grid = np.tile(np.asarray([[[1, 8, 8]]], np.int32), (2, 1, 1))
  return config, (jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(pixels), jnp.asarray(grid))


def _logits(config, params, batch, impl, dtype):
  config = dataclasses.replace(config, dtype=dtype, attention_impl=impl)
  return jax.jit(forward, static_argnums=0)(config, params, *batch)


def test_cudnn_logits_match_the_einsums_in_bf16():
  """cuDNN in bf16 is as close to the fp32 einsum logits as the bf16 einsums are."""
  config, batch = _inputs()
  params = init_params(config, jax.random.key(0))
  real = np.asarray(batch[1], bool)
  exact = np.asarray(_logits(config, params, batch, "xla", "float32"))[real]
  einsum = np.asarray(_logits(config, params, batch, "xla", "bfloat16"))[real]
  cudnn = np.asarray(_logits(config, params, batch, "cudnn", "bfloat16"))[real]
  err_einsum = float(np.abs(einsum - exact).max())
  err_cudnn = float(np.abs(cudnn - exact).max())
  print(f"\n[cudnn] bf16 max |logit - fp32 logit|: einsums {err_einsum:.2e}, "
        f"cudnn {err_cudnn:.2e} (logit scale {np.abs(exact).max():.2f})")
  assert np.isfinite(cudnn).all()
  assert err_cudnn <= 2 * err_einsum + 1e-2


def test_cudnn_gradients_match_the_einsums_in_bf16():
  """Parameter gradients of a next-token loss agree leaf by leaf (relative L2 error)."""
  config, batch = _inputs()
  params = init_params(config, jax.random.key(1))
  ids, mask = batch[0], batch[1]

  def loss(params, impl):
    logits = forward(dataclasses.replace(config, dtype="bfloat16", attention_impl=impl),
                     params, *batch)
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    nll = -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
    weight = (mask[:, 1:] * mask[:, :-1]).astype(jnp.float32)
    return jnp.sum(nll * weight) / jnp.sum(weight)

  grads = {impl: jax.jit(jax.grad(loss), static_argnums=1)(params, impl)
           for impl in ("xla", "cudnn")}
  def relative_error(path, a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    assert np.isfinite(b).all(), jax.tree_util.keystr(path)
    return float(np.linalg.norm(b - a) / max(np.linalg.norm(a), 1e-12))

  errors = jax.tree_util.tree_map_with_path(relative_error, grads["xla"], grads["cudnn"])
  worst_path, worst = max(jax.tree_util.tree_leaves_with_path(errors), key=lambda pe: pe[1])
  print(f"\n[cudnn] bf16 gradients: worst relative L2 error {worst:.2e} "
        f"({jax.tree_util.keystr(worst_path)})")
  assert worst <= 5e-2, f"{jax.tree_util.keystr(worst_path)}: relative gradient error {worst:.2e}"
