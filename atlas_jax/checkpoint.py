"""Checkpoints: one orbax CheckpointManager holding everything needed to resume exactly, and
a checksum of every file each save wrote, checked before anything is restored.

Each step directory has three items: `state` (the TrainState pytree: params, optimizer
state, step, RNG, skip count; sharded arrays are written cooperatively by every process
and restored straight into the shardings asked for), `data` (the data iterator's state;
one per process in multi-host runs, where each process reads its own shard) and `extra`
(JSON: the functional-token table, the model config, the run config).
Saves are asynchronous by default; the last `keep` checkpoints are kept.

Checksums. Process 0 records the size and sha256 of every file a save wrote in
`<step>/atlas_checksums.json`, inside orbax's commit (its post-finalization callback: after
every process's writes, before the rename), so every committed step has one and its
`_CHECKPOINT_METADATA` says so. Cost: one more read of the checkpoint, sha256 at ~1.4 GB/s
a core, up to 8 files at once: 0.05-0.08 s for 96 MB on a 2-core VM (files in page cache),
so about a minute for a 7B run's ~90 GB, in the background for async saves; the same to
verify, split over all processes. `read_extra` hashes `extra` only, and sizes the rest.

Damage (a file missing, short or not matching its checksum, a missing commit marker,
metadata or manifest, an empty step directory) is never restored: `restore_latest` (the
resume path) skips such steps saying why, restores the newest that verifies and moves the
skipped ones aside to `<step>.damaged` (deleting nothing); when none restores it raises
`DamagedCheckpointError` naming the directory and moves nothing. A step asked for by number
that does not verify raises naming its directory. Steps written before checksums restore
unverified, with a warning. A save that fails for lack of space or permission raises
`CheckpointWriteError`, one line naming the directory, the reason and the free space; its
partial files are removed, older steps kept, and orbax's tracebacks of it not logged.
"""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import errno
import glob
import hashlib
import itertools
import json
import logging as pylogging
import os
import shutil
from typing import Any, Callable, NamedTuple

import jax
import orbax.checkpoint as ocp
from absl import logging

from atlas_jax import multihost

ITEMS = ("state", "data", "extra")
MANIFEST = "atlas_checksums.json"
# Written or rewritten by orbax's commit after the manifest: checked for presence only.
_WRITTEN_AFTER = ("_CHECKPOINT_METADATA", "commit_success.txt")
_TMP_SUFFIX = ".orbax-checkpoint-tmp"  # orbax's uncommitted step directories
_DISK_ERRORS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
                errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
                errno.EPERM: "operation not permitted"}


class DamagedCheckpointError(RuntimeError):
  """No step of a checkpoint directory restores, or the step asked for does not verify."""


class CheckpointWriteError(OSError):
  """A save failed for lack of space or permission; the message is one line."""


class Restored(NamedTuple):
  """What `Checkpointer.restore_latest` restored; `skipped`: [(step, why)], newest first."""
  step: int
  state: Any
  data_state: Any
  extra: dict
  skipped: list


def _manager(directory: str, *, keep: int | None = None, create: bool = True,
             on_commit: Callable[[], None] | None = None) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, save_interval_steps=1, create=create,
      enable_async_checkpointing=on_commit is not None,
      # Directories made first: a failure then stops the save before orbax's writer threads
      # start (they would wait minutes for the directory at exit).
      async_options=ocp.AsyncOptions(post_finalization_callback=on_commit,
                                     create_directories_asynchronously=False))
  return ocp.CheckpointManager(os.path.abspath(directory), options=options,
                               item_names=ITEMS)


def _encode_data_state(data_state) -> dict:
  if data_state is None:
    return {"kind": "none"}
  if isinstance(data_state, bytes):
    return {"kind": "bytes", "value": base64.b64encode(data_state).decode("ascii")}
  return {"kind": "json", "value": data_state}


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


def _sha256(path: str) -> str:
  with open(path, "rb") as f:
    return hashlib.file_digest(f, "sha256").hexdigest()


def _hash(step_dir: str, names: list[str]) -> dict[str, str]:
  """sha256 of each file (names relative to `step_dir`), up to 8 at once (reads and hashlib
  release the GIL)."""
  with concurrent.futures.ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
    return dict(zip(names, pool.map(lambda n: _sha256(os.path.join(step_dir, n)), names)))


def _write_manifest(step_dir: str) -> None:
  """Records the size and sha256 of every file under `step_dir` (but the manifest and the
  files orbax's commit writes after it) in `step_dir`/MANIFEST, atomically."""
  names = sorted(os.path.relpath(os.path.join(root, name), step_dir)
                 for root, _, files in os.walk(step_dir) for name in files)
  names = [n for n in names if n not in (MANIFEST, MANIFEST + ".tmp", *_WRITTEN_AFTER)]
  sizes, digests = {n: os.path.getsize(os.path.join(step_dir, n)) for n in names}, \
      _hash(step_dir, names)
  tmp = os.path.join(step_dir, MANIFEST + ".tmp")
  with open(tmp, "w") as f:
    json.dump({"algorithm": "sha256", "written_after": list(_WRITTEN_AFTER),
               "files": {n: [sizes[n], digests[n]] for n in names}}, f, indent=0)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, os.path.join(step_dir, MANIFEST))


def _read_json(path: str):
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def _verify(step_dir: str, *, items=ITEMS, hashes: bool = True,
            share: tuple[int, int] = (0, 1)) -> tuple[str | None, bool]:
  """(what is wrong with a step directory, or None; whether its checksums were checked).
  Every file's presence and size is checked; the files of `items` are hashed (when
  `hashes`), those of this `share` (index, count) of them when processes split the work."""
  if not os.path.isdir(step_dir) or not os.listdir(step_dir):
    return "the step directory is empty", False
  manifest = _read_json(os.path.join(step_dir, MANIFEST))
  if manifest is None:
    metadata = _read_json(os.path.join(step_dir, "_CHECKPOINT_METADATA"))
    if not isinstance(metadata, dict):
      return "_CHECKPOINT_METADATA is missing or unreadable (the save never finished)", False
    if (metadata.get("custom_metadata") or {}).get("checksums"):
      what = "unreadable" if os.path.exists(os.path.join(step_dir, MANIFEST)) else "missing"
      return f"its checksum manifest {MANIFEST} is {what}", False
    missing = [i for i in items if not os.path.isdir(os.path.join(step_dir, i))]
    return (f"{missing[0]}/ is missing" if missing else None), False  # no checksums yet
  try:
    files = {str(n): (int(size), str(digest))
             for n, (size, digest) in manifest["files"].items()}
    written_after = [str(n) for n in manifest["written_after"]]
  except (KeyError, TypeError, ValueError, AttributeError):
    return f"its checksum manifest {MANIFEST} is unreadable", False
  for name in written_after:
    if not os.path.isfile(os.path.join(step_dir, name)):
      return f"{name} is missing (written by orbax's commit)", False
  for name, (size, _) in sorted(files.items()):
    path = os.path.join(step_dir, name)
    if not os.path.isfile(path):
      return f"{name} is missing", False
    if (found := os.path.getsize(path)) != size:
      return f"{name} has {found} bytes where the save wrote {size} (truncated?)", False
  if not hashes:
    return None, False
  names = [n for n in sorted(files) if n.split("/")[0] in items][share[0]::share[1]]
  for name, digest in _hash(step_dir, names).items():
    if digest != files[name][1]:
      return (f"{name} differs from what the save wrote (sha256 mismatch: the file is "
              "corrupted)"), False
  return None, True


def _verify_everywhere(step_dir: str, *, items=ITEMS) -> tuple[str | None, bool]:
  """`_verify` with the hashing split over every process (a collective)."""
  if jax.process_count() == 1:
    return _verify(step_dir, items=items)
  share = (jax.process_index(), jax.process_count())
  results = multihost.gather_json(list(_verify(step_dir, items=items, share=share)))
  problems = [problem for problem, _ in results if problem]
  return (problems[0] if problems else None), all(verified for _, verified in results)


class _ReadError(Exception):
  """orbax could not read a step: the first line of why (the original error is the cause)."""


@contextlib.contextmanager
def _reading():
  try:
    yield
  except Exception as e:  # orbax and TensorStore raise many kinds
    first = (str(e).strip().splitlines() or [""])[0][:300]
    raise _ReadError(f"{type(e).__name__}: {first}") from e


def _step_dir(directory: str, step: int) -> str:
  return os.path.join(directory, str(step))


def _first_restorable(directory: str, steps, verify, read, *, asked: bool = False):
  """(step, read(step), skipped: [(step, why)]) for the newest of `steps` that verifies and
  reads; DamagedCheckpointError naming the directory (or, when the step was `asked` for,
  its step directory) when none does."""
  skipped = []
  for step in sorted(steps, reverse=True):
    path = _step_dir(directory, step)
    why, verified = verify(path)
    if why is None:
      try:
        value = read(step)
      except _ReadError as e:
        if verified:  # the files are the ones saved: not damage, so no fallback
          raise ValueError(f"checkpoint {path} does not restore into this run: {e}") from \
              e.__cause__
        why = f"orbax cannot read it ({e})"
      else:
        if not verified:
          logging.warning("checkpoint %s has no checksum manifest (written before checksums "
                          "were recorded): restored unverified", path)
        return step, value, skipped
    if asked:
      raise DamagedCheckpointError(f"checkpoint {path} cannot be restored: {why}")
    logging.warning("skipping checkpoint %s: %s", path, why)
    skipped.append((step, why))
  if not skipped:
    raise FileNotFoundError(f"no checkpoint in {directory}")
  reasons = "; ".join(f"{_step_dir(directory, step)}: {why}" for step, why in skipped)
  raise DamagedCheckpointError(f"no checkpoint in {directory} restores ({reasons}); fix or "
                               "remove those step directories, or use a new directory")


def _disk_error(e: BaseException | str | None) -> str | None:
  """'no space left on device' etc. when `e` (or what it was raised from) is one."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno in _DISK_ERRORS:
      return _DISK_ERRORS[e.errno]
    text = str(e)
    for code, what in _DISK_ERRORS.items():
      if os.strerror(code) in text or f"os_error_code='{code}'" in text:
        return what
    e = None if isinstance(e, str) else (e.__cause__ or e.__context__)
  return None


def _free_space(path: str) -> str:
  while not os.path.exists(path) and os.path.dirname(path) != path:
    path = os.path.dirname(path)
  usage = shutil.disk_usage(path)
  size = lambda n: next(f"{n / 1024**k:.1f} {unit}" for k, unit in enumerate(
      ("B", "KiB", "MiB", "GiB", "TiB")) if n < 1024**(k + 1) or unit == "TiB")
  return f"{size(usage.free)} free of {size(usage.total)}"


def _quiet_disk_errors(record) -> bool:
  """A logging filter dropping orbax's error logs of a full disk or a permission failure (a
  traceback per thread, hundreds of lines): the Checkpointer raises it as one line."""
  if record.levelno < pylogging.ERROR or f"{os.sep}orbax{os.sep}" not in record.pathname:
    return True
  exc = record.exc_info[1] if record.exc_info else None
  return _disk_error(exc) is None and _disk_error(record.getMessage()) is None


class Checkpointer:
  """Saves every `save_every` steps (and when forced), keeps the last `keep`, records each
  save's checksums and verifies them on restore. Use as a context manager or call `close()`;
  `wait()` blocks until async saves land (and raises a failed one's CheckpointWriteError)."""

  def __init__(self, directory: str, *, save_every: int, keep: int, async_save: bool = True):
    if save_every < 1 or keep < 1:
      raise ValueError(f"checkpoint save_every {save_every} and keep {keep} must be >= 1")
    self.directory = os.path.abspath(directory)
    self.save_every = save_every
    self._async = async_save
    self._saving, self._closed = None, False  # _saving: the step whose save is in flight
    logging.get_absl_logger().addFilter(_quiet_disk_errors)  # added once
    try:
      self._manager = _manager(self.directory, keep=keep, on_commit=self._seal)
    except OSError as e:
      if (what := _disk_error(e)) is None:
        raise
      raise CheckpointWriteError(f"checkpoint directory {self.directory} cannot be created: "
                                 f"{what} ({_free_space(self.directory)} there)") from None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def latest_step(self) -> int | None:
    """The newest step directory, damaged or not (`restore_latest` checks)."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state, *, data_state=None, extra: dict | None = None,
           force: bool = False) -> bool:
    """Saves when `step % save_every == 0` or `force`; returns whether it saved. A step
    directory already there that is incomplete (empty, no commit marker, files missing or
    short) is moved aside to `<step>.damaged` and saved again; a complete one is kept."""
    if not force and step % self.save_every:
      return False
    self.wait()
    if step in self._manager.all_steps():
      problem, _ = _verify(_step_dir(self.directory, step), hashes=False)
      if problem is None:
        return False
      self._set_aside([(step, problem)])
    data = _encode_data_state(data_state)
    if jax.process_count() > 1:  # orbax writes JSON items from process 0 only
      data = {"kind": "per_process", "value": multihost.gather_json(data)}
    args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                              data=ocp.args.JsonSave(data),
                              extra=ocp.args.JsonSave(extra or {}))
    self._saving = step
    saved = self._call(self._manager.save, step, args=args, force=True,
                       custom_metadata={"checksums": MANIFEST})
    if not self._async:
      self.wait()
    return saved

  def restore(self, step: int | None = None, *, abstract_state):
    """(state, data_state, extra) of `step` (default latest), restored into the shapes,
    dtypes and shardings of `abstract_state` (ShapeDtypeStructs with `.sharding`). Raises
    DamagedCheckpointError naming the step directory when it does not verify."""
    self.wait()
    step = _resolve_step(self._manager, self.directory, step)
    return _first_restorable(self.directory, [step], _verify_everywhere,
                             lambda s: self._read(s, abstract_state), asked=True)[1]

  def restore_latest(self, abstract_state, *,
                     check: Callable[[int, dict], None] | None = None) -> Restored | None:
    """The newest step that verifies and restores into `abstract_state`, as a `Restored`
    (step, state, data_state, extra, skipped: [(step, why)]); None when the directory holds
    no step. Skipped steps are logged and moved aside to `<step>.damaged`. `check(step,
    extra)` runs before the state is read (e.g. the optimizer layout); what it raises
    propagates. Raises DamagedCheckpointError naming the directory when no step restores."""
    self.wait()
    self._manager.reload()
    if not (steps := self._manager.all_steps()):
      return None
    read = lambda step: self._read(step, abstract_state, check)
    step, (state, data_state, extra), skipped = _first_restorable(
        self.directory, steps, _verify_everywhere, read)
    self._set_aside(skipped)
    return Restored(step, state, data_state, extra, skipped)

  def _read(self, step: int, abstract_state, check=None):
    with _reading():
      extra = dict(self._manager.restore(step, args=ocp.args.Composite(
          extra=ocp.args.JsonRestore()))["extra"])
    if check is not None:
      check(step, extra)
    with _reading():
      out = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    return out["state"], _decode_data_state(out["data"]), extra

  def _set_aside(self, skipped) -> None:
    """Renames damaged step directories to `<step>.damaged` (process 0; the others wait)."""
    if not skipped:
      return

    def rename():
      for step, why in skipped:
        path = _step_dir(self.directory, step)
        target = next(t for t in (f"{path}.damaged{k or ''}" for k in itertools.count())
                      if not os.path.exists(t))
        os.rename(path, target)
        logging.warning("moved damaged checkpoint %s aside to %s (%s); delete it once "
                        "inspected", path, target, why)

    multihost.process_0_first("checkpoint_set_aside", rename, lambda: None)
    self._manager.reload()

  def _seal(self) -> None:
    """orbax's post-finalization callback (process 0, after every process's writes, before
    the commit): the checksum manifest of the step being saved."""
    step_dir = _step_dir(self.directory, self._saving)
    candidates = sorted(self._uncommitted(self._saving), key=os.path.getmtime) or \
        [step_dir] * os.path.isdir(step_dir)  # orbax's commit-file mode writes in place
    if not candidates:
      raise FileNotFoundError(f"checkpoint step {self._saving}: found no directory orbax "
                              f"is writing under {self.directory}")
    _write_manifest(candidates[-1])

  def _call(self, fn, *args, **kwargs):
    """fn(...) with a failed save's disk errors raised as one CheckpointWriteError."""
    try:
      return fn(*args, **kwargs)
    except Exception as e:
      what, step = _disk_error(e), self._saving
      if what is None or step is None:
        raise
      self._saving = None
      free = _free_space(self.directory)
      if jax.process_index() == 0:  # uncommitted, so provably incomplete
        for partial in self._uncommitted(step):
          shutil.rmtree(partial, ignore_errors=True)
      self._manager.reload()
      kept = f"steps {self._manager.all_steps()} are kept" if self._manager.all_steps() else \
          "no earlier step was there"
      raise CheckpointWriteError(f"checkpoint step {step} could not be written to "
                                 f"{self.directory}: {what} ({free} there); its partial files "
                                 f"were removed and {kept}") from None

  def _uncommitted(self, step: int) -> list[str]:
    return glob.glob(os.path.join(glob.escape(self.directory), f"{step}{_TMP_SUFFIX}*"))

  def wait(self):
    self._call(self._manager.wait_until_finished)
    self._saving = None

  def close(self):
    if not self._closed:
      self._closed = True
      try:
        self.wait()
      finally:
        self._manager.close()


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


def _read_from(directory: str, step: int | None, verify, read):
  """read(manager, step) of `step`, or of the newest step that verifies and reads."""
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"checkpoint directory {directory} does not exist")
  directory, manager = os.path.abspath(directory), _manager(directory, create=False)
  try:
    steps = [_resolve_step(manager, directory, step)] if step is not None else \
        manager.all_steps()
    return _first_restorable(directory, steps, verify, lambda s: read(manager, s),
                             asked=step is not None)[1]
  finally:
    manager.close()


def read_extra(directory: str, step: int | None = None) -> dict:
  """The JSON metadata of a checkpoint (functional tokens, model config, run config), of
  `step` or else of the newest step whose `extra` verifies (the others' files are checked
  for presence and size only; no collective, so it may run before jax.distributed)."""

  def read(manager, s):
    with _reading():
      return dict(manager.restore(s, args=ocp.args.Composite(
          extra=ocp.args.JsonRestore()))["extra"])

  return _read_from(directory, step, lambda path: _verify(path, items=("extra",)), read)


def restore_params_only(directory: str, step: int | None, abstract_params):
  """Only the params of a checkpoint's state (e.g. RL from SFT, or an export), of `step` or
  else of the newest step whose state verifies, restored into `abstract_params`
  (ShapeDtypeStructs, with shardings where given). The optimizer state on disk is not read
  (but it is checksummed: it shares files with the params)."""
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = {"params": jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                     sharding=getattr(x, "sharding", None) or device),
      abstract_params)}

  def read(manager, s):
    with _reading():
      return manager.restore(s, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
          item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
          partial_restore=True)))["state"]["params"]

  return _read_from(directory, step, lambda path: _verify_everywhere(path, items=("state",)),
                    read)
