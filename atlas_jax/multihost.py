"""What a multi-process run does across processes, in one place.

Every process feeds its own rows of a batch-sharded array (`host_rows_to_device`,
`to_global_rows`) and reads back only its own (`local_rows`); host-side figures are
averaged (`global_mean`), agreed on (`all_processes`) or gathered (`gather_json`) with
collectives every process calls in the same order; files a run makes once are written by
process 0 while the others wait (`process_0_first`). With one process each is a plain
local operation.
"""

from __future__ import annotations

import json

import jax
import numpy as np
from jax.experimental import multihost_utils

from atlas_jax import sharding


def local_rows(x: jax.Array) -> np.ndarray:
  """This process's rows of a batch-sharded global array, in global row order: the rows of
  the prompts this process fed in (all rows in a single-process run)."""
  if x.is_fully_addressable:
    return np.asarray(jax.device_get(x))
  shards = {}
  for shard in x.addressable_shards:  # replicas (tensor axis) share a start row
    shards.setdefault(shard.index[0].start or 0, shard.data)
  return np.concatenate([np.asarray(shards[k]) for k in sorted(shards)])


def to_global_rows(local: np.ndarray, mesh) -> jax.Array:
  """Inverse of `local_rows`: each process's rows into one batch-sharded global array."""
  return jax.make_array_from_process_local_data(sharding.batch_sharding(mesh, local.ndim),
                                                local)


def host_batch_to_device(batch: dict, mesh) -> dict:
  """Process-local numpy batch -> global arrays sharded over the batch axes. Host-only
  fields (strings) stay behind."""
  return {k: to_global_rows(v, mesh) for k, v in batch.items()
          if isinstance(v, np.ndarray) and v.dtype != object}


def global_mean(x) -> float:
  """Mean over every process's values (a host-side scalar for logging)."""
  x = np.asarray(x, np.float64).reshape(-1)
  sums = np.array([x.sum(), x.size])
  if jax.process_count() > 1:  # every process calls this, in the same order
    sums = multihost_utils.process_allgather(sums).sum(0)
  return float(sums[0] / sums[1]) if sums[1] else float("nan")


def all_processes(flag: bool) -> bool:
  """True when `flag` holds on every process (a collective)."""
  if jax.process_count() == 1:
    return bool(flag)
  return bool(multihost_utils.process_allgather(np.array([bool(flag)])).all())


def gather_json(obj) -> list:
  """Every process's JSON-able `obj`, as a list in process order (a collective)."""
  if jax.process_count() == 1:
    return [obj]
  blob = np.frombuffer(json.dumps(obj).encode("utf-8"), np.uint8)
  sizes = np.asarray(multihost_utils.process_allgather(np.int32(blob.size))).reshape(-1)
  padded = np.zeros(int(sizes.max()), np.uint8)
  padded[:blob.size] = blob
  blobs = np.asarray(multihost_utils.process_allgather(padded))
  return [json.loads(b[:n].tobytes()) for b, n in zip(blobs, sizes)]


def process_0_first(name: str, build, read):
  """`build()` on process 0 while the others wait at a barrier, then `read()` on the others:
  files a run makes once (tokenizer, dataset) are written by one process into the shared
  workdir, never by several at once. Every process must call it (it holds a barrier), so
  whether there is anything to build is `build`'s decision. When `build()` fails on process
0, every process raises (the others naming process 0's error) instead of waiting. One
process: just `build()`."""
  if jax.process_count() == 1:
    return build()
  out, error = None, None
  if jax.process_index() == 0:
    try:
      out = build()
    except Exception as e:  # noqa: BLE001  (passed on to every process below)
      error = e
  message = gather_json(f"{type(error).__name__}: {error}" if error else "")[0]
  if error is not None:
    raise error
  if message:  # process 0 failed: every process stops, saying why
    raise ValueError(f"process 0 could not build {name}: {message}")
  return out if jax.process_index() == 0 else read()
