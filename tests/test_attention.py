"""Query-chunked attention is exact: same outputs and gradients as the one-block version."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from atlas_jax.model import forward, init_params, layers
from tests import factories


def _inputs(t=16, s=16):
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.normal(size=(2, t, 4, 8)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(2, s, 2, 8)), jnp.float32)
  v = jnp.asarray(rng.normal(size=(2, s, 2, 8)), jnp.float32)
  mask = np.tril(np.ones((t, s), bool))[None].repeat(2, 0)
  mask[1, :, :3] = False  # left padding in row 1 (its first query rows see nothing)
  return q, k, v, jnp.asarray(mask)


@pytest.mark.parametrize("chunk", [4, 8])
def test_chunked_attention_matches_outputs_and_gradients(chunk):
  q, k, v, mask = _inputs()
  full = layers.attention(q, k, v, mask)
  part = layers.attention(q, k, v, mask, chunk=chunk)
  np.testing.assert_allclose(part, full, atol=1e-6)
  loss = lambda c: lambda q, k, v: jnp.sum(jnp.sin(layers.attention(q, k, v, mask, chunk=c)))
  g_full = jax.grad(loss(0), argnums=(0, 1, 2))(q, k, v)
  g_part = jax.grad(loss(chunk), argnums=(0, 1, 2))(q, k, v)
  for a, b in zip(g_part, g_full):
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_chunk_that_does_not_divide_falls_back_to_one_block():
  q, k, v, mask = _inputs(t=12, s=12)
  np.testing.assert_allclose(layers.attention(q, k, v, mask, chunk=5),
                             layers.attention(q, k, v, mask), atol=1e-6)


def test_model_forward_with_attention_chunk_matches():
  config = factories.tiny_model_config()
  params = init_params(config, jax.random.key(0))
  ids = jnp.asarray(np.random.default_rng(1).integers(3, 240, (2, 16)), jnp.int32)
  mask = jnp.ones((2, 16), jnp.int32).at[1, :5].set(0)
  ref = forward(config, params, ids, mask) * mask[..., None]
  chunked = dataclasses.replace(config, attention_chunk=4)
  out = forward(chunked, params, ids, mask) * mask[..., None]
  np.testing.assert_allclose(out, ref, atol=1e-5)
  with pytest.raises(ValueError, match="attention_chunk"):
    dataclasses.replace(config, attention_chunk=-1)
