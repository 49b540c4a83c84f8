"""The step builders' rollout micro-batching (`steps.micro_batches`, RL with grad_accum)."""

import numpy as np
import pytest

from atlas_jax import sharding
from atlas_jax.train import steps


def test_micro_batches_take_every_kth_row_and_keep_the_batch_when_one():
  mesh = sharding.make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
  batch = {"input_ids": np.arange(8 * 3, dtype=np.int32).reshape(8, 3),
           "advantages": np.arange(8, dtype=np.float32)}
  assert steps.micro_batches(batch, 1, mesh) == [batch]
  micro = steps.micro_batches(batch, 4, mesh)
  assert len(micro) == 4
  for i, mb in enumerate(micro):
    np.testing.assert_array_equal(mb["input_ids"], batch["input_ids"][i::4])
    np.testing.assert_array_equal(mb["advantages"], batch["advantages"][i::4])
  with pytest.raises(ValueError, match="8 rows .* do not split into optim.grad_accum = 3"):
    steps.micro_batches(batch, 3, mesh)
