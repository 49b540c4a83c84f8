"""What the SFT and RL step builders share: a cache of built steps their caller owns, the
non-finite-update guard, and the per-platform choices of the gradient steps.

The gradient steps take two choices by the mesh's platform (`skip_mode`,
`gradient_compiler_options`): what is cheap on XLA:CPU can cost an accelerator memory, so
the AOT report, which compiles for a TPU mesh, sees the TPU choices.
"""

from __future__ import annotations

import collections

import jax
import jax.numpy as jnp
import optax

from atlas_jax.run.state import TrainState


class StepCache:
  """Jitted steps by key, the newest `keep` kept (each holds its compiled executables).

  A caller that builds the same step several times in one process (an ablation's variants
  and seeds, a demo's stages) passes one cache to every builder, so each distinct step is
  traced and compiled once; a builder called without one builds afresh.
  """

  def __init__(self, keep: int = 8):
    self.keep = keep
    self._built: collections.OrderedDict = collections.OrderedDict()

  def get(self, key, build):
    """build(), or what it returned for an equal key before."""
    if key in self._built:
      self._built.move_to_end(key)
      return self._built[key]
    self._built[key] = fn = build()
    while len(self._built) > self.keep:
      self._built.popitem(last=False)
    return fn


def cached(cache: StepCache | None, key, build):
  """`cache.get(key, build)`, or build() without a cache."""
  return build() if cache is None else cache.get(key, build)


def sharding_key(tree):
  """A hashable key of a pytree of shardings."""
  leaves, treedef = jax.tree.flatten(tree)
  return treedef, tuple(leaves)


SKIPS = ("select", "branch")


def apply_if_finite(state: TrainState, grads, optimizer, finite, skip: str = "select"):
  """The optimizer update, or (when `finite` is False) the old params/opt_state.

  skip (static): how the old state is kept. "select": `jnp.where(finite, new, old)` over
  params and moments, which TPU and GPU fuse into the update (a branch costs them a copy
  of the whole state in memory). "branch": `lax.cond`, for XLA:CPU, where the select is a
  pass of its own over the state and the branch runs the update alone. `skip_mode` picks
  by platform.
  """
  if skip not in SKIPS:
    raise ValueError(f"skip {skip!r} is not one of {SKIPS}")

  def apply(state):
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                         opt_state=opt_state)

  def keep(state):
    return state.replace(step=state.step + 1, skipped=state.skipped + 1)
  if skip == "branch":
    return jax.lax.cond(finite, apply, keep, state)
  new, old = apply(state), keep(state)
  return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)


def platform(mesh) -> str:
  """The platform of the mesh's devices ("cpu", "gpu", "tpu")."""
  return mesh.devices.flat[0].platform


def skip_mode(platform: str) -> str:
  """How the gradient steps keep the old state on a non-finite update
  (`apply_if_finite`): a branch on CPU, a select elsewhere."""
  return "branch" if platform == "cpu" else "select"


def gradient_compiler_options(platform: str) -> dict | None:
  """XLA options for the steps with a backward pass, by platform ("cpu", "tpu", ...).

  CPU: YNNPACK fuses the dots only. Its default also fuses elementwise producers into
  them, and then the backward pass recomputes each weight gradient's elementwise producer
  a second time as a transposing copy; without it the SFT step runs faster (the same
  step compiled both ways, timed alternately in one process). Other platforms: none.
  """
  if platform != "cpu":
    return None
  return {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"}


