"""The step builders: rollout micro-batching (`rl.update.micro_batches`, RL with
grad_accum), and one jitted step per distinct setting within a caller's `StepCache`."""

import numpy as np
import pytest

from atlas_jax import sharding
from atlas_jax.rl.update import micro_batches, old_logps_fn, rl_update_fn
from atlas_jax.run.steps import StepCache
from atlas_jax.sft.update import sft_step_fn


def test_micro_batches_take_every_kth_row_and_keep_the_batch_when_one():
  mesh = sharding.make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
  batch = {"input_ids": np.arange(8 * 3, dtype=np.int32).reshape(8, 3),
           "advantages": np.arange(8, dtype=np.float32)}
  assert micro_batches(batch, 1, mesh) == [batch]
  micro = micro_batches(batch, 4, mesh)
  assert len(micro) == 4
  for i, mb in enumerate(micro):
    np.testing.assert_array_equal(mb["input_ids"], batch["input_ids"][i::4])
    np.testing.assert_array_equal(mb["advantages"], batch["advantages"][i::4])
  with pytest.raises(ValueError, match="8 rows .* do not split into optim.grad_accum = 3"):
    micro_batches(batch, 3, mesh)


def test_equal_settings_share_one_jitted_step_in_a_cache_and_other_settings_get_their_own():
  from atlas_jax.model import from_size
  from atlas_jax.run import optimizer as optimizer_lib
  from atlas_jax.run import setup
  from configs import rl as rl_config
  c = rl_config.get_config("tiny")
  mesh = sharding.make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
  model_config = from_size("tiny")
  optimizer = optimizer_lib.make_optimizer(setup.resolve_optim(c))
  state_sh = {"params": sharding.replicated(mesh)}
  ids = np.asarray([5, 6], np.int32)
  cache = StepCache()
  build = lambda c, ids=ids, cache=cache: (
      sft_step_fn(c, model_config, mesh, optimizer, state_sh, ids, cache=cache),
      rl_update_fn(c, model_config, mesh, optimizer, state_sh, ids, cache=cache),
      old_logps_fn(c, model_config, cache=cache))
  first = build(c)
  assert all(a is b for a, b in zip(first, build(c.copy_and_resolve_references())))
  # Without a cache, or with another one, every call builds afresh.
  assert not any(a is b for a, b in zip(first, build(c, cache=None)))
  assert not any(a is b for a, b in zip(first, build(c, cache=StepCache())))
  other = c.copy_and_resolve_references()
  other.train.logprob_chunk = c.train.logprob_chunk // 2
  assert not any(a is b for a, b in zip(first, build(other)))
  alpha = c.copy_and_resolve_references()
  alpha.rl.alpha = c.rl.alpha + 0.5
  assert build(alpha)[1] is not first[1] and build(alpha)[2] is first[2]
  assert build(c, np.asarray([5, 7], np.int32))[0] is not first[0]
  lr = c.copy_and_resolve_references()
  lr.optim.lr = c.optim.lr * 2
  assert build(lr)[0] is not first[0] and build(lr)[1] is not first[1]


def test_a_cache_keeps_the_newest_steps():
  cache = StepCache(keep=2)
  built = [cache.get(k, object) for k in ("a", "b")]
  assert cache.get("a", object) is built[0]  # "a" is now the newest
  cache.get("c", object)                     # evicts "b"
  assert cache.get("a", object) is built[0] and cache.get("b", object) is not built[1]
