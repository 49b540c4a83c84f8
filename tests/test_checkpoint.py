"""orbax checkpoints: exact round trips, retention, async, shardings, clear errors."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from atlas_jax import checkpoint as ckpt_lib
from atlas_jax.model import abstract_params, init_params
from tests import factories
from atlas_jax.run.state import TrainState

CONFIG = factories.tiny_model_config()


def _state(accumulate: bool, seed=3):
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
  if accumulate:
    tx = optax.MultiSteps(tx, every_k_schedule=2)
  params = init_params(CONFIG, jax.random.key(0))
  state = TrainState.create(params, tx, seed)
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.01), params)  # make moments non-zero
  updates, opt_state = tx.update(grads, state.opt_state, params)
  return state.replace(params=optax.apply_updates(params, updates), opt_state=opt_state,
                       step=jnp.int32(5), skipped=jnp.int32(2))


def _abstract(state):
  dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=dev), state)


def _equal(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert jax.tree.structure(a) == jax.tree.structure(b) and len(la) == len(lb)
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("accumulate", [False, True])
def test_round_trip_is_bitwise(tmp_path, accumulate):
  state = _state(accumulate)
  extra = {"functional_tokens": {"<|Shape|>": 640}, "note": "x"}
  with ckpt_lib.Checkpointer(str(tmp_path), save_every=1, keep=3) as ck:
    assert ck.save(5, state, data_state=b'{"pos": 17}', extra=extra)
    ck.wait()
    restored, data_state, got_extra = ck.restore(abstract_state=_abstract(state))
  _equal(restored, state)
  assert data_state == b'{"pos": 17}' and got_extra == extra
  assert isinstance(jax.tree.leaves(restored)[0], jax.Array)


def test_save_every_keep_and_force(tmp_path):
  state = _state(False)
  ck = ckpt_lib.Checkpointer(str(tmp_path), save_every=2, keep=2)
  saved = [s for s in range(1, 8) if ck.save(s, state.replace(step=jnp.int32(s)))]
  assert saved == [2, 4, 6]
  assert ck.save(7, state.replace(step=jnp.int32(7)), force=True)
  ck.wait()
  assert ck.all_steps() == [6, 7] and ck.latest_step() == 7
  restored, data_state, _ = ck.restore(6, abstract_state=_abstract(state))
  assert int(restored.step) == 6 and data_state is None
  ck.close()
  ck.close()  # harmless


def test_missing_directory_and_step_are_clear(tmp_path):
  with pytest.raises(FileNotFoundError, match="checkpoint directory .*nowhere does not exist"):
    ckpt_lib.read_extra(str(tmp_path / "nowhere"))
  state = _state(False)
  with ckpt_lib.Checkpointer(str(tmp_path / "c"), save_every=1, keep=2) as ck:
    with pytest.raises(FileNotFoundError, match="no checkpoint in"):
      ck.restore(abstract_state=_abstract(state))
    ck.save(3, state)
    ck.wait()
    with pytest.raises(FileNotFoundError, match=r"no checkpoint for step 9 .*available steps: "
                       r"\[3\]"):
      ck.restore(9, abstract_state=_abstract(state))


def test_restore_params_only_and_read_extra(tmp_path):
  state = _state(True)
  with ckpt_lib.Checkpointer(str(tmp_path), save_every=1, keep=1) as ck:
    ck.save(1, state, extra={"model_config": {"a": 1}})
  params = ckpt_lib.restore_params_only(str(tmp_path), None, abstract_params(CONFIG))
  _equal(params, state.params)
  assert ckpt_lib.read_extra(str(tmp_path)) == {"model_config": {"a": 1}}


def test_restore_onto_a_different_mesh(tmp_path):
  """Saved sharded over fsdp=8, restored onto a (2, 4) mesh with new shardings."""
  script = textwrap.dedent(f"""
      import json, jax, jax.numpy as jnp, numpy as np
      from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
      from atlas_jax import checkpoint as ck
      devs = np.array(jax.devices())
      m8 = Mesh(devs.reshape(8), ("fsdp",))
      x = jax.device_put(jnp.arange(64 * 16, dtype=jnp.float32).reshape(64, 16),
                         NamedSharding(m8, P("fsdp", None)))
      state = {{"w": x, "step": jnp.int32(4)}}
      with ck.Checkpointer({str(tmp_path)!r}, save_every=1, keep=1) as c:
        c.save(4, state, data_state={{"epoch": 1}})
      m24 = Mesh(devs.reshape(2, 4), ("data", "tensor"))
      target = {{"w": jax.ShapeDtypeStruct((64, 16), jnp.float32,
                                         sharding=NamedSharding(m24, P("data", "tensor"))),
                "step": jax.ShapeDtypeStruct((), jnp.int32,
                                             sharding=NamedSharding(m24, P()))}}
      with ck.Checkpointer({str(tmp_path)!r}, save_every=1, keep=1) as c:
        r, data, _ = c.restore(abstract_state=target)
      print(json.dumps({{"equal": bool((np.asarray(r["w"]) == np.asarray(x)).all()),
                        "spec": str(r["w"].sharding.spec), "data": data,
                        "shards": len(r["w"].addressable_shards)}}))
  """)
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=factories.xla_flags(8),
             PYTHONPATH=os.path.dirname(os.path.dirname(__file__)))
  proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert out == {"equal": True, "spec": "P('data', 'tensor')", "data": {"epoch": 1},
                 "shards": 8}
