"""The memory audit (`launch.memory_audit`) at a 0.18B model in 2 processes x 4 devices:
importing the HF directory (read, placement, vocabulary extension), the first evaluation
batch (the sampler's prefill and decode), the first SFT step and the HF export each hold no
more than the process's share of what the phase must hold (1.25x its floor, plus a small
constant for the run's noise and one layer's gathered weights; the export also its largest
tensor and, on process 0, the file shard it fills)."""

import os

import pytest

from launch import memory_audit
from tests import factories as F

# Two identical runs of the tiny model differ by up to ~0.1 GiB in a phase's peak (compiles,
# the allocator's retention).
CONSTANT = 160 * 2**20
LOAD = ("read", "placement", "vocabulary extension")
STEPS = ("first evaluation batch", "first SFT step")
EXPORT = ("export",)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("audit")


@pytest.fixture(scope="module")
def result(model_dir):
  env = dict(os.environ, XLA_FLAGS=F.xla_flags())
  result = memory_audit.audit("test", processes=2, devices=4, tensor=2,
                              model_dir=str(model_dir), timeout=900, env=env,
                              export_dir=str(model_dir / "export"))
  print("\n" + result.table())
  return result


def _over(result, phases) -> list[str]:
  over = []
  for process in range(result.processes):
    for phase in phases:
      allowed = 1.25 * result.floor(phase) * result.model_bytes + CONSTANT
      if phase == "export":
        allowed += result.export_in_flight(process)
      if result.excess(process, phase) > allowed:
        over.append(f"process {process}, {phase}: {result.fraction(process, phase):.2f}x the "
                    f"model's float32 bytes, floor {result.floor(phase):.2f}x")
  return over


@pytest.mark.slow
def test_the_import_holds_only_each_process_share(result):
  assert result.parameters > 150e6
  assert not _over(result, LOAD), "\n".join(_over(result, LOAD)) + "\n" + result.table()


@pytest.mark.slow
def test_the_first_steps_hold_only_each_process_share(result):
  assert not _over(result, STEPS), "\n".join(_over(result, STEPS)) + "\n" + result.table()


@pytest.mark.slow
def test_the_export_holds_its_share_and_one_tensor(result):
  assert result.shard_bytes and result.largest_tensor
  assert not _over(result, EXPORT), "\n".join(_over(result, EXPORT)) + "\n" + result.table()


@pytest.mark.slow
def test_the_two_process_export_is_the_source_model(result, model_dir):
  """Every tensor the two processes exported (bfloat16, in shards of --shard_size) is the
  source file's, rounded to bfloat16; the functional tokens' embedding and LM-head rows
  are the extension's (new), every other row the source's."""
  import glob

  import ml_dtypes
  import numpy as np
  from safetensors.numpy import load_file

  from atlas_jax.functional_tokens import FUNCTIONAL_TOKENS
  from transformers import AutoTokenizer
  source_dir, export_dir = model_dir / "test_float32", model_dir / "export"
  load = lambda d: {k: v for f in sorted(glob.glob(str(d / "*.safetensors")))
                    for k, v in load_file(f).items()}
  source, exported = load(source_dir), load(export_dir)
  assert len(glob.glob(str(export_dir / "*.safetensors"))) > 1  # sharded
  assert set(source) == set(exported)
  new_rows = AutoTokenizer.from_pretrained(str(export_dir)).convert_tokens_to_ids(
      list(FUNCTIONAL_TOKENS))
  for key, want in source.items():
    want = want.astype(ml_dtypes.bfloat16)
    got = exported[key]
    assert got.dtype == want.dtype and got.shape == want.shape, key
    if key.endswith(("embed_tokens.weight", "lm_head.weight")):
      keep = np.ones(len(want), bool)
      keep[new_rows] = False
      got, want = got[keep], want[keep]
    np.testing.assert_array_equal(got.view(np.uint16), want.view(np.uint16), err_msg=key)
