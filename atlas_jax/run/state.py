"""The training state: one pytree that a checkpoint saves and a step consumes."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class TrainState:
  """Everything a step changes.

  step: int32[] number of updates applied. params: the model pytree (fp32 master weights).
  opt_state: the optax state. rng: uint32[2] raw PRNG key data; a step derives its keys
  with `fold_in(rng, step)` and never advances it, so resuming reproduces them.
  skipped: int32[] updates skipped because the loss or gradient was not finite.
  """

  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array
  skipped: jax.Array

  @classmethod
  def create(cls, params, optimizer, seed: int) -> TrainState:
    return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
               rng=jax.random.key_data(jax.random.key(seed)), skipped=jnp.zeros((), jnp.int32))

  def step_key(self) -> jax.Array:
    """The typed PRNG key of this step."""
    return jax.random.fold_in(jax.random.wrap_key_data(self.rng), self.step)
