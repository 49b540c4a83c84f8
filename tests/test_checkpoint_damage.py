"""Damaged checkpoints: a corrupted, truncated or missing file, a missing commit marker,
metadata or checksum manifest, an empty step directory, a full or read-only disk. A restore
falls back to the newest step that verifies and says why, or stops naming the directory;
nothing good is deleted."""

import errno
import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from atlas_jax import checkpoint as ckpt_lib
from tests import factories

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _state(step: int, width: int = 128):
  """A TrainState-like pytree whose values depend on `step`; the random matrix makes the
  largest data file incompressible."""
  rng = np.random.default_rng(step)
  return {"params": {"w": jnp.asarray(rng.standard_normal((width, width)), jnp.float32),
                     "b": jnp.asarray(rng.standard_normal(7), jnp.bfloat16)},
          "opt": {"mu": jnp.asarray(rng.standard_normal((width, 4)), jnp.float32)},
          "step": jnp.int32(step)}


def _abstract(state):
  dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=dev), state)


def _equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert np.asarray(x).dtype == np.asarray(y).dtype
    assert np.asarray(x).tobytes() == np.asarray(y).tobytes()


def _save(directory, steps, **kwargs):
  with ckpt_lib.Checkpointer(str(directory), save_every=1, keep=10, **kwargs) as ck:
    for step in steps:
      assert ck.save(step, _state(step), data_state={"pos": step}, extra={"step": step})


def _largest_file(step_dir):
  files = [os.path.join(root, n) for root, _, names in os.walk(os.path.join(step_dir, "state"))
           for n in names]
  return max(files, key=os.path.getsize)


def _flip(path, count=192):
  with open(path, "r+b") as f:
    data = bytearray(f.read())
    start = len(data) // 2
    for i in range(start, start + count):
      data[i] ^= 0xFF
    f.seek(0)
    f.write(data)


def _truncate(path):
  os.truncate(path, os.path.getsize(path) // 2)


def _empty(step_dir):
  shutil.rmtree(step_dir)
  os.mkdir(step_dir)


def _drop_checksum_flag(step_dir):
  """Makes a step look as if written before checksums were recorded."""
  path = os.path.join(step_dir, "_CHECKPOINT_METADATA")
  with open(path) as f:
    meta = json.load(f)
  meta["custom_metadata"] = {}
  with open(path, "w") as f:
    json.dump(meta, f)
  os.remove(os.path.join(step_dir, ckpt_lib.MANIFEST))


DAMAGE = {  # name: (damage(step_dir), what the reason says)
    "flipped_bytes": (lambda d: _flip(_largest_file(d)), "sha256 mismatch"),
    "truncated": (lambda d: _truncate(_largest_file(d)), "truncated"),
    "array_metadata_removed": (lambda d: os.remove(os.path.join(d, "state", "_METADATA")),
                               "state/_METADATA is missing"),
    "commit_marker_removed": (lambda d: os.remove(os.path.join(d, "commit_success.txt")),
                              "commit_success.txt is missing"),
    "item_marker_removed": (
        lambda d: os.remove(os.path.join(d, "state", "commit_success.txt")),
        "state/commit_success.txt is missing"),
    "step_metadata_removed": (lambda d: os.remove(os.path.join(d, "_CHECKPOINT_METADATA")),
                              "_CHECKPOINT_METADATA is missing"),
    "manifest_removed": (lambda d: os.remove(os.path.join(d, ckpt_lib.MANIFEST)),
                         f"{ckpt_lib.MANIFEST} is missing"),
    "manifest_garbled": (lambda d: open(os.path.join(d, ckpt_lib.MANIFEST), "w").write("{"),
                         f"{ckpt_lib.MANIFEST} is unreadable"),
    "extra_flipped": (lambda d: _flip(os.path.join(d, "extra", "metadata"), 2),
                      "extra/metadata differs"),
    "data_file_removed": (lambda d: os.remove(os.path.join(d, "data", "metadata")),
                          "data/metadata is missing"),
    "empty_step_dir": (_empty, "the step directory is empty"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_resume_falls_back_to_the_newest_good_step(tmp_path, damage, caplog):
  directory = tmp_path / "ckpt"
  _save(directory, [1, 2, 3])
  do, reason = DAMAGE[damage]
  do(str(directory / "3"))
  with ckpt_lib.Checkpointer(str(directory), save_every=1, keep=10) as ck:
    with caplog.at_level(logging.WARNING):
      restored = ck.restore_latest(_abstract(_state(3)))
    assert restored.step == 2
    [(step, why)] = restored.skipped
    assert step == 3 and reason in why, why
    assert any(f"skipping checkpoint {directory / '3'}" in r.getMessage()
               for r in caplog.records)
    _equal(restored.state, _state(2))
    assert restored.data_state == {"pos": 2} and restored.extra == {"step": 2}
    # Nothing deleted: the damaged step is set aside, so step 3 can be saved again.
    assert ck.all_steps() == [1, 2] and os.path.isdir(directory / "3.damaged")
    assert ck.save(3, _state(3), extra={"step": 3})
    again = ck.restore_latest(_abstract(_state(3)))
  assert again.step == 3 and again.skipped == []
  _equal(again.state, _state(3))


def test_a_mismatch_with_the_run_is_not_taken_for_damage(tmp_path):
  """What `check` raises, or a verified step that does not fit the abstract state, stops
  the restore (no fallback to an older step, nothing set aside)."""
  directory = tmp_path / "ckpt"
  _save(directory, [1, 2])

  def check(step, extra):
    raise ValueError(f"step {step} was trained with {extra}")

  with ckpt_lib.Checkpointer(str(directory), save_every=1, keep=10) as ck:
    with pytest.raises(ValueError, match=r"step 2 was trained with \{'step': 2\}"):
      ck.restore_latest(_abstract(_state(2)), check=check)
    with pytest.raises(ValueError, match=f"checkpoint {directory / '2'} does not restore "
                       "into this run: "):
      ck.restore_latest(_abstract(_state(2, width=64)))
  assert sorted(os.listdir(directory)) == ["1", "2"]


def test_an_unverified_restore_would_have_been_wrong(tmp_path):
  """The flipped bytes change what orbax reads: without the checksums the corrupted state
  would restore silently (this is what the test above guards against)."""
  directory = tmp_path / "ckpt"
  _save(directory, [1])
  _flip(_largest_file(str(directory / "1")))
  _drop_checksum_flag(str(directory / "1"))
  with ckpt_lib.Checkpointer(str(directory), save_every=1, keep=10) as ck:
    restored = ck.restore_latest(_abstract(_state(1)))
  assert restored.step == 1  # a step without checksums restores unverified
  w = np.asarray(restored.state["params"]["w"])
  assert w.tobytes() != np.asarray(_state(1)["params"]["w"]).tobytes()


def test_a_damaged_step_without_checksums_is_skipped_when_orbax_cannot_read_it(tmp_path):
  directory = tmp_path / "ckpt"
  _save(directory, [1, 2])
  _drop_checksum_flag(str(directory / "1"))
  _drop_checksum_flag(str(directory / "2"))
  _truncate(_largest_file(str(directory / "2")))
  with ckpt_lib.Checkpointer(str(directory), save_every=1, keep=10) as ck:
    restored = ck.restore_latest(_abstract(_state(2)))
  assert restored.step == 1 and "orbax cannot read it" in restored.skipped[0][1]
  assert len(restored.skipped[0][1].splitlines()) == 1
  _equal(restored.state, _state(1))


def test_no_good_step_stops_naming_the_directory_and_moves_nothing(tmp_path):
  directory = tmp_path / "ckpt"
  _save(directory, [1, 2])
  _truncate(_largest_file(str(directory / "2")))
  _empty(str(directory / "1"))
  before = sorted(os.listdir(directory))
  with ckpt_lib.Checkpointer(str(directory), save_every=1, keep=10) as ck:
    with pytest.raises(ckpt_lib.DamagedCheckpointError) as e:
      ck.restore_latest(_abstract(_state(2)))
  message = str(e.value)
  assert len(message.splitlines()) == 1
  assert f"no checkpoint in {directory} restores" in message
  assert f"{directory / '2'}: state/" in message and "truncated" in message
  assert f"{directory / '1'}: the step directory is empty" in message
  assert sorted(os.listdir(directory)) == before


def test_an_empty_directory_restores_nothing(tmp_path):
  with ckpt_lib.Checkpointer(str(tmp_path / "c"), save_every=1, keep=2) as ck:
    assert ck.restore_latest(_abstract(_state(1))) is None


def test_a_step_asked_for_by_number_must_verify(tmp_path):
  directory = tmp_path / "ckpt"
  _save(directory, [1, 2])
  _flip(_largest_file(str(directory / "2")))
  with ckpt_lib.Checkpointer(str(directory), save_every=1, keep=10) as ck:
    with pytest.raises(ckpt_lib.DamagedCheckpointError,
                       match=f"checkpoint {directory / '2'} cannot be restored: state/.*"
                             "sha256 mismatch"):
      ck.restore(2, abstract_state=_abstract(_state(2)))
    state, data_state, extra = ck.restore(1, abstract_state=_abstract(_state(1)))
  _equal(state, _state(1))
  assert sorted(os.listdir(directory)) == ["1", "2"]  # restore(step) moves nothing


def test_params_only_and_extra_fall_back_too(tmp_path):
  directory = tmp_path / "ckpt"
  _save(directory, [1, 2, 3])
  _flip(_largest_file(str(directory / "3")))
  abstract_params = jax.eval_shape(lambda: _state(0)["params"])
  params = ckpt_lib.restore_params_only(str(directory), None, abstract_params)
  _equal(params, _state(2)["params"])
  with pytest.raises(ckpt_lib.DamagedCheckpointError, match=f"checkpoint {directory / '3'} "
                     "cannot be restored: state/.*sha256 mismatch"):
    ckpt_lib.restore_params_only(str(directory), 3, abstract_params)
  # read_extra hashes only `extra` (step 3's is intact) and sizes the other files.
  assert ckpt_lib.read_extra(str(directory)) == {"step": 3}
  _truncate(str(directory / "3" / "extra" / "metadata"))
  assert ckpt_lib.read_extra(str(directory)) == {"step": 2}
  with pytest.raises(ckpt_lib.DamagedCheckpointError, match=f"checkpoint {directory / '3'} "
                     "cannot be restored: extra/metadata has"):
    ckpt_lib.read_extra(str(directory), 3)
  assert sorted(os.listdir(directory)) == ["1", "2", "3"]  # readers move nothing


def test_an_empty_step_directory_does_not_block_saving_that_step(tmp_path):
  directory = tmp_path / "ckpt"
  _save(directory, [1])
  os.mkdir(directory / "2")
  with ckpt_lib.Checkpointer(str(directory), save_every=1, keep=10) as ck:
    assert ck.latest_step() == 2
    assert ck.save(2, _state(2), extra={"step": 2})
    ck.wait()
    state, _, extra = ck.restore(2, abstract_state=_abstract(_state(2)))
    assert not ck.save(2, _state(5))  # a complete step is kept as it is
  _equal(state, _state(2))
  assert extra == {"step": 2} and os.path.isdir(directory / "2.damaged")


def test_every_save_records_its_checksums(tmp_path):
  _save(tmp_path, [4], async_save=False)
  step_dir = tmp_path / "4"
  with open(step_dir / ckpt_lib.MANIFEST) as f:
    manifest = json.load(f)
  on_disk = {os.path.relpath(os.path.join(r, n), step_dir)
             for r, _, names in os.walk(step_dir) for n in names}
  assert set(manifest["files"]) == on_disk - {ckpt_lib.MANIFEST, "_CHECKPOINT_METADATA",
                                              "commit_success.txt"}
  assert {n.split("/")[0] for n in manifest["files"]} == {"state", "data", "extra"}
  largest = _largest_file(str(step_dir))
  size, digest = manifest["files"][os.path.relpath(largest, step_dir)]
  assert size == os.path.getsize(largest) and digest == ckpt_lib._sha256(largest)
  with open(step_dir / "_CHECKPOINT_METADATA") as f:
    assert json.load(f)["custom_metadata"] == {"checksums": ckpt_lib.MANIFEST}


@pytest.mark.parametrize("async_save", [True, False])
def test_a_disk_full_during_the_commit_stops_with_one_line(tmp_path, async_save, caplog):
  """ENOSPC raised where the save's last file is written (the checksum manifest, inside
  orbax's commit thread); test_a_full_disk_... below fills a real one."""
  directory = tmp_path / "ckpt"
  _save(directory, [1])
  full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
  with ckpt_lib.Checkpointer(str(directory), save_every=1, keep=1,
                             async_save=async_save) as ck, \
       mock.patch.object(ckpt_lib, "_write_manifest", side_effect=full), \
       caplog.at_level(logging.ERROR):
    with pytest.raises(ckpt_lib.CheckpointWriteError) as e:
      ck.save(2, _state(2))
      ck.wait()
  _check_write_error(str(e.value), directory, 2, "no space left on device")
  assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
  assert sorted(os.listdir(directory)) == ["1"]  # keep=1 did not delete the good step
  _check_restores(directory, 1)


def _check_write_error(message, directory, step, what):
  assert len(message.splitlines()) == 1, message
  assert message.startswith(f"checkpoint step {step} could not be written to {directory}: "
                            f"{what} ("), message
  assert " free of " in message and "steps [1] are kept" in message, message


def _check_restores(directory, step):
  with ckpt_lib.Checkpointer(str(directory), save_every=1, keep=1) as ck:
    restored = ck.restore_latest(_abstract(_state(step)))
  assert restored.step == step and restored.skipped == []
  _equal(restored.state, _state(step))


@pytest.fixture
def small_disk(tmp_path):
  """mount(size_kib) -> a tmpfs of that size (skips where mounting is not allowed)."""
  where, mounted = tmp_path / "disk", []

  def mount(size_kib):
    where.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs",
                           str(where)], capture_output=True, text=True)
    if proc.returncode:
      pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    mounted.append(where)
    return where

  yield mount
  for path in mounted:
    subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.mark.parametrize("async_save", [True, False])
def test_a_full_disk_stops_with_one_line_and_keeps_the_last_step(small_disk, async_save,
                                                                 caplog):
  disk = small_disk(450)  # one step of this state (~0.3 MB) fits, two don't
  directory = disk / "ckpt"
  with ckpt_lib.Checkpointer(str(directory), save_every=1, keep=2,
                             async_save=async_save) as ck, caplog.at_level(logging.ERROR):
    assert ck.save(1, _state(1, width=256))
    ck.wait()
    with pytest.raises(ckpt_lib.CheckpointWriteError) as e:
      ck.save(2, _state(2, width=256))
      ck.wait()
  _check_write_error(str(e.value), directory, 2, "no space left on device")
  assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
  assert sorted(os.listdir(directory)) == ["1"]  # the partial step 2 was removed
  with ckpt_lib.Checkpointer(str(directory), save_every=1, keep=1) as ck:
    restored = ck.restore_latest(_abstract(_state(1, width=256)))
  assert restored.step == 1
  _equal(restored.state, _state(1, width=256))


def test_a_read_only_directory_stops_with_one_line(small_disk, tmp_path):
  if os.geteuid() == 0:
    directory = small_disk(4096) / "ckpt"
  else:
    directory = tmp_path / "ckpt"
  _save(directory, [1])
  if os.geteuid() == 0:
    subprocess.run(["mount", "-o", "remount,ro", str(directory.parent)], check=True)
    what = "read-only file system"
  else:
    os.chmod(directory, 0o555)
    what = "permission denied"
  try:
    with ckpt_lib.Checkpointer(str(directory), save_every=1, keep=1) as ck:
      with pytest.raises(ckpt_lib.CheckpointWriteError) as e:
        ck.save(2, _state(2))
        ck.wait()
  finally:
    os.chmod(directory, 0o755) if os.geteuid() else None
  _check_write_error(str(e.value), directory, 2, what)
  assert sorted(os.listdir(directory)) == ["1"]
  _check_restores(directory, 1)


def test_two_processes_agree_on_the_fallback(tmp_path):
  """Two processes (jax.distributed on CPU) save a sharded state cooperatively; process 0
  records the checksums; after damage both verify their half of the files, agree on the
  step to restore and restore it; process 0 sets the damaged one aside."""
  script = textwrap.dedent(f"""
      import json, os, sys, jax, jax.numpy as jnp, numpy as np
      pid = int(sys.argv[1])
      jax.distributed.initialize(sys.argv[2], num_processes=2, process_id=pid)
      from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
      from atlas_jax import checkpoint as ck
      mesh = Mesh(np.array(jax.devices()), ("fsdp",))
      sh = NamedSharding(mesh, P("fsdp", None))
      def state(step):
        x = np.random.default_rng(step).standard_normal((64, 256)).astype(np.float32)
        return {{"w": jax.make_array_from_callback(x.shape, sh, lambda i: x[i]),
                "step": jax.make_array_from_callback((), NamedSharding(mesh, P()),
                                                     lambda i: np.int32(step))}}
      directory = {str(tmp_path / "ckpt")!r}
      with ck.Checkpointer(directory, save_every=1, keep=5) as c:
        for step in (1, 2):
          c.save(step, state(step), data_state={{"pid": pid}})
      from jax.experimental import multihost_utils
      if pid == 0:
        step_dir = os.path.join(directory, "2")
        files = [os.path.join(r, n) for r, _, ns in os.walk(step_dir) for n in ns]
        largest = max(files, key=os.path.getsize)
        with open(largest, "r+b") as f:
          f.seek(os.path.getsize(largest) // 2)
          f.write(b"\\0" * 64)
      multihost_utils.sync_global_devices("damaged")
      target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                           sharding=x.sharding), state(0))
      with ck.Checkpointer(directory, save_every=1, keep=5) as c:
        r = c.restore_latest(target)
      w = np.asarray(multihost_utils.process_allgather(r.state["w"], tiled=True))
      print(json.dumps({{"step": r.step, "skipped": r.skipped, "data": r.data_state,
                        "equal": bool((w == np.asarray(
                            np.random.default_rng(1).standard_normal((64, 256)),
                            np.float32)).all()),
                        "listing": sorted(os.listdir(directory))}}))
  """)
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=factories.xla_flags(2),
             PYTHONPATH=ROOT)
  address = f"localhost:{factories.free_port()}"
  outs = factories.run_processes(
      [[sys.executable, "-c", script, str(i), address] for i in range(2)], cwd=ROOT, env=env,
      timeout=300)
  results = [json.loads(out.strip().splitlines()[-1]) for out in outs]
  for pid, out in enumerate(results):
    assert out["step"] == 1 and out["equal"] and out["data"] == {"pid": pid}
    [[step, why]] = out["skipped"]
    assert step == 2 and "sha256 mismatch" in why
    assert out["listing"] == ["1", "2.damaged"]
