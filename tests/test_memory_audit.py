"""The memory audit (`launch.memory_audit`) at a 0.17B model in 2 processes x 4 devices:
importing the HF directory (read, placement, vocabulary extension) holds no more than each
process's share of the params (1.25x, plus a small constant for the run's noise); the
first evaluation batch and SFT step are held to the same bound, and do not meet it yet."""

import os

import pytest

from launch import memory_audit
from tests import factories as F

# Two identical runs of the tiny model differ by up to ~0.1 GiB in a phase's peak (compiles,
# the allocator's retention).
CONSTANT = 160 * 2**20
LOAD = ("read", "placement", "vocabulary extension")
STEPS = ("first evaluation batch", "first SFT step")


@pytest.fixture(scope="module")
def result(tmp_path_factory):
  env = dict(os.environ, XLA_FLAGS=F.xla_flags())
  result = memory_audit.audit("test", processes=2, devices=4, tensor=2,
                              model_dir=str(tmp_path_factory.mktemp("audit")), timeout=900,
                              env=env)
  print("\n" + result.table())
  return result


def _over(result, phases) -> list[str]:
  over = []
  for process in range(result.processes):
    for phase in phases:
      allowed = 1.25 * result.floor(phase) * result.model_bytes + CONSTANT
      if result.excess(process, phase) > allowed:
        over.append(f"process {process}, {phase}: {result.fraction(process, phase):.2f}x the "
                    f"model's float32 bytes, floor {result.floor(phase):.2f}x")
  return over


@pytest.mark.slow
def test_the_import_holds_only_each_process_share(result):
  assert result.parameters > 150e6
  assert not _over(result, LOAD), "\n".join(_over(result, LOAD)) + "\n" + result.table()


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="issue 25: the sampler's compiled decode holds ~3x "
                   "each device's params in temporaries (most of its all-gathers sit outside "
                   "the token loop), the SFT step ~0.4x the model above its floor")
def test_the_first_steps_hold_only_each_process_share(result):
  assert not _over(result, STEPS), "\n".join(_over(result, STEPS)) + "\n" + result.table()
