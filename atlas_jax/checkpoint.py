"""Checkpoints: one orbax CheckpointManager holding everything needed to resume exactly.

Each step directory has three items: `state` (the TrainState pytree: params, optimizer
state, step, RNG, skip count; sharded arrays are written cooperatively by every process
and restored straight into the shardings asked for), `data` (the data iterator's state;
one per process in multi-host runs, where each process reads its own shard) and `extra`
(JSON: the functional-token table, the model config, the run config).
Saves are asynchronous by default; the last `keep` checkpoints are kept.
"""

from __future__ import annotations

import base64
import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils


def _manager(directory: str, *, save_every: int = 1, keep: int | None = None,
             async_save: bool = False, create: bool = True) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, save_interval_steps=1, enable_async_checkpointing=async_save,
      create=create)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options,
                               item_names=("state", "data", "extra"))


def _encode_data_state(data_state) -> dict:
  if data_state is None:
    return {"kind": "none"}
  if isinstance(data_state, bytes):
    return {"kind": "bytes", "value": base64.b64encode(data_state).decode("ascii")}
  return {"kind": "json", "value": data_state}


def _gather_data_states(encoded: dict) -> dict:
  """Every process's encoded iterator state, in process order (a collective: every process
  calls it). orbax writes JSON items from process 0 only, so the states travel there."""
  blob = np.frombuffer(json.dumps(encoded).encode("utf-8"), np.uint8)
  sizes = np.asarray(multihost_utils.process_allgather(np.int32(blob.size))).reshape(-1)
  padded = np.zeros(int(sizes.max()), np.uint8)
  padded[:blob.size] = blob
  blobs = np.asarray(multihost_utils.process_allgather(padded))
  return {"kind": "per_process",
          "value": [json.loads(b[:n].tobytes()) for b, n in zip(blobs, sizes)]}


def _decode_data_state(d: dict):
  if d["kind"] == "per_process":
    states, count = d["value"], jax.process_count()
    if len(states) != count:
      logging.warning("checkpoint holds data iterator states of %d processes, this run has "
                      "%d: every process resumes from process 0's state", len(states), count)
    d = states[jax.process_index() if len(states) == count else 0]
  if d["kind"] == "bytes":
    return base64.b64decode(d["value"])
  return d.get("value")


class Checkpointer:
  """Saves every `save_every` steps (and when forced), keeps the last `keep`.

  Use as a context manager or call `close()`; `wait()` blocks until async saves land.
  """

  def __init__(self, directory: str, *, save_every: int, keep: int, async_save: bool = True):
    if save_every < 1 or keep < 1:
      raise ValueError(f"checkpoint save_every {save_every} and keep {keep} must be >= 1")
    self.directory = os.path.abspath(directory)
    self.save_every = save_every
    self._manager = _manager(self.directory, keep=keep, async_save=async_save)
    self._closed = False

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state, *, data_state=None, extra: dict | None = None,
           force: bool = False) -> bool:
    """Saves when `step % save_every == 0` or `force`; returns whether it saved."""
    if not force and step % self.save_every:
      return False
    if step in self._manager.all_steps():
      return False
    data = _encode_data_state(data_state)
    if jax.process_count() > 1:
      data = _gather_data_states(data)
    args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                              data=ocp.args.JsonSave(data),
                              extra=ocp.args.JsonSave(extra or {}))
    return self._manager.save(step, args=args, force=True)

  def restore(self, step: int | None = None, *, abstract_state):
    """(state, data_state, extra) of `step` (default latest), restored into the shapes,
    dtypes and shardings of `abstract_state` (ShapeDtypeStructs with `.sharding`)."""
    step = _resolve_step(self._manager, self.directory, step)
    out = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
        extra=ocp.args.JsonRestore()))
    return out["state"], _decode_data_state(out["data"]), dict(out["extra"])

  def wait(self):
    self._manager.wait_until_finished()

  def close(self):
    if not self._closed:
      self._manager.wait_until_finished()
      self._manager.close()
      self._closed = True


def _resolve_step(manager, directory: str, step: int | None) -> int:
  steps = sorted(manager.all_steps())
  if not steps:
    raise FileNotFoundError(f"no checkpoint in {directory}")
  if step is None:
    return steps[-1]
  if step not in steps:
    raise FileNotFoundError(f"no checkpoint for step {step} in {directory}; available steps: "
                            f"{steps}")
  return step


def _reader(directory: str) -> ocp.CheckpointManager:
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"checkpoint directory {directory} does not exist")
  return _manager(directory, create=False)


def read_extra(directory: str, step: int | None = None) -> dict:
  """The JSON metadata of a checkpoint (functional tokens, model config, run config)."""
  manager = _reader(directory)
  try:
    step = _resolve_step(manager, directory, step)
    return dict(manager.restore(step, args=ocp.args.Composite(
        extra=ocp.args.JsonRestore()))["extra"])
  finally:
    manager.close()


def restore_params_only(directory: str, step: int | None, abstract_params):
  """Only the params of a checkpoint's state (e.g. RL from SFT, or an export), restored into
  `abstract_params` (ShapeDtypeStructs, with shardings where given). The optimizer state on
  disk is not read."""
  manager = _reader(directory)
  try:
    step = _resolve_step(manager, directory, step)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = {"params": jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                       sharding=getattr(x, "sharding", None) or device),
        abstract_params)}
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(
            item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
            partial_restore=True)))
    return restored["state"]["params"]
  finally:
    manager.close()
