"""Building blocks shared by the vision tower and the text decoder.

Einsum letters: B batch, T query length, S key/value length, D width, N query heads,
K kv heads, G query heads per kv head (N = K*G), H head dim, F MLP width.
"""

from __future__ import annotations

import functools
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from atlas_jax import sharding

Array = jax.Array


def dtype_of(name: str) -> jnp.dtype:
  return jnp.dtype(name)


def logical_init(init: Callable, axes: tuple[str | None, ...]) -> Callable:
  return nn.with_logical_partitioning(init, axes)


DEFAULT_INIT = nn.initializers.normal(stddev=0.02)


def dense(features, axis, kernel_axes, *, bias_axes=None, dtype, name) -> nn.DenseGeneral:
  """A DenseGeneral with logical axis names on its kernel (and bias, if any)."""
  return nn.DenseGeneral(
      features=features, axis=axis, use_bias=bias_axes is not None, dtype=dtype,
      param_dtype=jnp.float32, kernel_init=logical_init(DEFAULT_INIT, kernel_axes),
      bias_init=logical_init(nn.initializers.zeros_init(), bias_axes or ()), name=name)


class RMSNorm(nn.Module):
  """RMSNorm computed in fp32, scaled after casting back (transformers' order)."""

  eps: float
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = self.param("scale", logical_init(nn.initializers.ones_init(), ("norm",)),
                       (x.shape[-1],), jnp.float32)
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    scale = jnp.broadcast_to(scale.astype(self.dtype), x.shape)
    return scale * x32.astype(self.dtype)


ACTIVATIONS = {"silu": jax.nn.silu, "gelu": functools.partial(jax.nn.gelu, approximate=False),
               "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True)}


class SwiGLU(nn.Module):
  """down(act(gate(x)) * up(x))."""

  hidden: int
  activation: str = "silu"
  use_bias: bool = False
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    bias = ("mlp",) if self.use_bias else None
    gate = dense(self.hidden, -1, ("embed", "mlp"), bias_axes=bias, dtype=self.dtype,
                 name="gate")(x)
    up = dense(self.hidden, -1, ("embed", "mlp"), bias_axes=bias, dtype=self.dtype,
               name="up")(x)
    h = ACTIVATIONS[self.activation](gate) * up
    if h.ndim == 3:  # the text decoder's [B, T, F] (the vision tower's rows are [P, F])
      h = sharding.constrain(h, ("activation_batch", "activation_length", "activation_mlp"))
    return dense(x.shape[-1], -1, ("mlp", "embed"), bias_axes=("embed",) if self.use_bias
                 else None, dtype=self.dtype, name="down")(h)


def rotate_half(x: Array) -> Array:
  x1, x2 = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([-x2, x1], axis=-1)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
  """x: [..., T, heads, H]; cos/sin: [..., T, H] (fp32). Rotation in fp32."""
  out = x.astype(jnp.float32) * cos[..., None, :] + rotate_half(
      x.astype(jnp.float32)) * sin[..., None, :]
  return out.astype(x.dtype)


REMAT_POLICIES = {
    "full": None,  # save nothing, recompute the whole layer
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    "attention_out": jax.checkpoint_policies.save_only_these_names("attention_out"),
}


def maybe_remat(block_cls: type[nn.Module], remat: str, static_argnums=()) -> type[nn.Module]:
  """Wraps a layer class in nn.remat according to the config's policy name."""
  if remat == "none":
    return block_cls
  return nn.remat(block_cls, policy=REMAT_POLICIES[remat], prevent_cse=False,
                  static_argnums=static_argnums)


# The collection a layer sows its attention weights into when the caller makes it mutable
# (`apply(..., mutable=[ATTENTION_COLLECTION])`); a scanned stack stacks them over layers.
ATTENTION_COLLECTION = "attention_weights"


def scan_layers(block_cls: type[nn.Module], length: int, in_axes,
                unroll: bool = False) -> type[nn.Module]:
  """nn.scan over `length` copies of a layer; stacked params get the `layers` axis (and
  sown attention weights a leading [L] axis). unroll (static): every layer emitted in the
  graph, for cost counts (`ModelConfig.unroll_loops`)."""
  return nn.scan(block_cls, variable_axes={"params": 0, ATTENTION_COLLECTION: 0},
                 split_rngs={"params": True},
                 in_axes=in_axes, length=length, unroll=length if unroll else 1,
                 metadata_params={nn.PARTITION_NAME: "layers"})
