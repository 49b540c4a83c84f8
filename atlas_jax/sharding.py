"""Meshes and the logical-axis rules that map model axis names to mesh axes.

The mesh has three axes, in this order: `data` (pure data parallelism: each group holds a
full copy of the sharded state), `fsdp` (data parallelism whose params, gradients and
optimizer state are sharded: ZeRO-3), `tensor` (Megatron-style model parallelism over
heads, MLP width and vocab). Model code names only logical axes; `RULES` maps them, for
training and rollout alike:

  logical                     mesh axes
  embed                       fsdp
  mlp, heads, kv_heads, vocab tensor
  layers, head_dim, norm      replicated
  activation_batch            (data, fsdp)
  activation_length           replicated
  activation_embed            replicated
  activation_mlp              tensor
  cache_batch                 (data, fsdp)

`SEQUENCE_PARALLEL_RULES` is the same table with the residual stream's length over
`tensor` as well (Megatron-style sequence parallelism, for steps with a backward pass): a
layer's input, which remat saves, is then a tensor-th per chip, and the all-reduce after
the attention output and the MLP becomes a reduce-scatter plus an all-gather before the
next matmul. Rules listed first win a mesh axis, so the MLP width keeps `tensor` where a
spec names both (`activation_mlp` before `activation_length`); attention's heads are
sharded by the params.

Sampling keeps the training layout for params (rollouts use the live training params, no
resharding) and shards the KV cache's batch (`cache_batch`, also the sampler state's rows)
over (data, fsdp) and its kv heads over tensor (`CACHE_AXES` in sampler.py). The decode's
token loop traces under `DECODE_RULES`: the same table with the activations' rows over
`data` alone and their width (`activation_embed`) over `fsdp`, as the weights' embed dim
is, so a token's matmuls contract each chip's weight shard where it lies and all-reduce
their small outputs: no weight is gathered at any token. The params' shardings are
`model.param_shardings`.
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

AXES = ("data", "fsdp", "tensor")

RULES = (
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("vocab", "tensor"),
    ("layers", None),
    ("head_dim", None),
    ("norm", None),
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_mlp", "tensor"),
    ("cache_batch", ("data", "fsdp")),
)

SEQUENCE_PARALLEL_RULES = tuple(r for r in RULES if r[0] != "activation_length") + (
    ("activation_length", "tensor"),)


# The decode step: weights stay where they lie. A token's activations are small, the
# weights are not: the residual stream's width goes over fsdp as the weights' embed dim
# does (its rows over data alone), so each matmul contracts the local weight shard and
# all-reduces its small output, instead of all-gathering every weight at every token.
DECODE_RULES = tuple(r for r in RULES if r[0] not in ("activation_batch", "activation_embed")
                     ) + (("activation_batch", "data"), ("activation_embed", "fsdp"))


def training_rules(sequence_parallel: bool):
  """The rules a gradient or log-prob step is traced under: `SEQUENCE_PARALLEL_RULES`
  or `RULES`."""
  return SEQUENCE_PARALLEL_RULES if sequence_parallel else RULES


def traced_under(fn, rules):
  """`fn` that traces its body under the logical `rules` (inside a jit: the mesh stays the
  active `with_rules` one), whatever rules its caller has active."""
  @functools.wraps(fn)
  def traced(*args, **kwargs):
    with nn.logical_axis_rules(rules):
      return fn(*args, **kwargs)
  return traced


def resolve_mesh_shape(shape, num_devices: int) -> dict[str, int]:
  """{data, fsdp, tensor} with the one -1 replaced by the rest of the devices."""
  shape = {k: int(shape[k]) for k in AXES}
  free = [k for k, v in shape.items() if v == -1]
  if len(free) > 1 or any(v == 0 or v < -1 for v in shape.values()):
    raise ValueError(f"mesh {shape}: each axis must be a positive size, and at most one -1")
  fixed = math.prod(v for v in shape.values() if v != -1)
  if free:
    if num_devices % fixed:
      raise ValueError(f"mesh {_describe(shape)} cannot fill {num_devices} devices: "
                       f"{num_devices} is not divisible by {fixed}")
    shape[free[0]] = num_devices // fixed
  if math.prod(shape.values()) != num_devices:
    raise ValueError(f"mesh {_describe(shape)} needs {math.prod(shape.values())} devices, "
                     f"found {num_devices}")
  return shape


def _describe(shape) -> str:
  return " x ".join(f"{k}={v}" for k, v in shape.items())


def make_mesh(shape, devices=None) -> Mesh:
  """A (data, fsdp, tensor) mesh over `devices` (default: all), topology-aware on TPU."""
  devices = list(jax.devices() if devices is None else devices)
  dims = resolve_mesh_shape(shape, len(devices))
  sizes = tuple(dims[k] for k in AXES)
  try:
    from jax.experimental import mesh_utils
    grid = mesh_utils.create_device_mesh(sizes, devices=devices)
  except (ValueError, NotImplementedError, AssertionError):
    grid = np.asarray(devices).reshape(sizes)
  return Mesh(grid, AXES)


def spec_axes(mesh_axes) -> tuple[str, ...]:
  """The mesh axes of one PartitionSpec entry (None, a name, or a tuple of names)."""
  if mesh_axes is None:
    return ()
  return (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)


def logical_to_shardings(mesh: Mesh, logical_specs, rules=RULES, shapes=None):
  """NamedShardings for a pytree of logical PartitionSpecs. With `shapes` (a matching pytree
  of arrays / ShapeDtypeStructs), every sharded dim must divide evenly."""
  mesh_specs = nn.logical_to_mesh(logical_specs, rules)
  is_spec = lambda x: isinstance(x, PartitionSpec)
  if shapes is not None:
    flat_specs, _ = jax.tree_util.tree_flatten_with_path(mesh_specs, is_leaf=is_spec)
    flat_shapes = jax.tree.leaves(shapes)
    for (path, spec), leaf in zip(flat_specs, flat_shapes):
      for dim, (size, axes) in enumerate(zip(leaf.shape, spec)):
        ways = math.prod(mesh.shape[a] for a in spec_axes(axes))
        if size % ways:
          name = "/".join(str(getattr(p, "key", p)) for p in path)
          raise ValueError(f"{name} dim {dim} (size {size}) is not divisible by mesh axes "
                           f"{spec_axes(axes)} = {ways}")
  return jax.tree.map(lambda spec: NamedSharding(mesh, spec), mesh_specs, is_leaf=is_spec)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  """Leading (batch) dim over data x fsdp, the rest replicated."""
  return NamedSharding(mesh, PartitionSpec(("data", "fsdp"), *([None] * (ndim - 1))))


def state_shardings(mesh: Mesh, abstract_state, param_sh):
  """Shardings for a TrainState: every subtree shaped like the params (optimizer moments,
  gradient accumulators) takes the params' shardings, also where a per-group optimizer
  (optax.multi_transform / masked) left holes (`optax.MaskedNode`) for the other groups;
  everything else is replicated."""
  import optax  # noqa: PLC0415  (only states need it)
  masked = lambda x: isinstance(x, optax.MaskedNode)
  params_struct = jax.tree.structure(abstract_state.params)
  param_shapes = [x.shape for x in jax.tree.leaves(abstract_state.params)]
  param_sh_leaves = jax.tree.leaves(param_sh, is_leaf=lambda x: isinstance(x, NamedSharding))

  def like_params(tree) -> bool:
    try:
      leaves, struct = jax.tree.flatten(tree, is_leaf=masked)
      if len(leaves) != len(param_shapes) or not all(
          masked(x) or getattr(x, "shape", None) == s for x, s in zip(leaves, param_shapes)):
        return False
      return jax.tree.structure(jax.tree.unflatten(params_struct, leaves),
                                is_leaf=masked) == struct
    except Exception:  # noqa: BLE001  (optax states hold non-tree leaves)
      return False

  def assign(tree):
    if like_params(tree):
      leaves, struct = jax.tree.flatten(tree, is_leaf=masked)
      return jax.tree.unflatten(struct, [x if masked(x) else s
                                         for x, s in zip(leaves, param_sh_leaves)])
    if hasattr(tree, "shape"):
      return replicated(mesh)
    return None

  def walk(tree):
    if like_params(tree):
      return assign(tree)
    if hasattr(tree, "shape") or tree is None:
      return assign(tree) if tree is not None else None
    children, treedef = jax.tree_util.tree_flatten(tree, is_leaf=lambda x: x is not tree)
    return jax.tree.unflatten(treedef, [walk(c) for c in children])

  return walk(abstract_state)


_ACTIVE = threading.local()  # the mesh of the innermost `with_rules`


@contextlib.contextmanager
def with_rules(mesh: Mesh, rules=RULES):
  """Activates the mesh and the logical rules for `constrain`.

  flax's own `with_logical_constraint` acts only under an abstract mesh (`jax.set_mesh`),
  which the mesh context does not set: without the explicit mesh `constrain` passes, every
  activation constraint is silently dropped. (`jax.set_mesh` itself would also make flax
  constrain each parameter as it is created, and cannot be entered inside a jit.)"""
  previous = getattr(_ACTIVE, "mesh", None)
  _ACTIVE.mesh = mesh
  try:
    with mesh, nn.logical_axis_rules(rules):
      yield
  finally:
    _ACTIVE.mesh = previous


def active_mesh() -> Mesh | None:
  """The mesh of the innermost `with_rules`, or None outside one."""
  return getattr(_ACTIVE, "mesh", None)


def constrain(x, logical_axes):
  """`x` (an array or a pytree) constrained to the sharding its logical axis names map to
  under the active `with_rules`; unchanged outside one."""
  mesh = getattr(_ACTIVE, "mesh", None)
  if mesh is None:
    return x
  return nn.with_logical_constraint(x, logical_axes, mesh=mesh)
