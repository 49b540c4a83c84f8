"""Shared test kit: tiny random Hugging Face Qwen2.5-VL models built and saved locally.

Every compiled executable of a test session goes to one persistent JAX compilation cache
(a fresh temporary directory per session, or $ATLAS_TEST_JAX_CACHE to keep it between
sessions), shared by the pytest workers and the subprocesses the tests start: the suite
compiles many identical steps (resume checks run the same loop three times), and each is
compiled once. LLVM runs at -O0 (`factories.TEST_XLA_FLAGS`) unless XLA_FLAGS is set.
"""

import atexit
import os
import shutil
import tempfile

from tests import factories  # numpy only: nothing has read XLA_FLAGS yet

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# libtpu (the AOT tests' TPU topologies) takes a machine-wide lock by default: another
# process using it (an AOT report, a second suite) would fail the suite's AOT tests.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("XLA_FLAGS", factories.xla_flags())
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _cache = os.environ.get("ATLAS_TEST_JAX_CACHE")
  if not _cache:
    _cache = tempfile.mkdtemp(prefix="atlas_jax_test_cache_")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache  # inherited by workers and subprocesses
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")


# The longest files (by a full run's --durations), started first so that the parallel
# workers finish together.
_LONGEST_FIRST = ("test_device_check.py", "test_distributed_rl.py", "test_sft_loop.py",
                  "test_multidevice.py",
                  "test_ablate.py", "test_rl_loop.py", "test_aot.py", "test_hf_export.py",
                  "test_distributed.py", "test_eval_training.py", "test_multi_image.py",
                  "test_bench.py",
                  "test_eval_multihost.py", "test_bad_data.py", "test_rl_update.py",
                  "test_sft_step.py")


def pytest_collection_modifyitems(config, items):
  del config
  rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: keeps file order


@pytest.fixture(scope="session", params=sorted(factories.TINY_CONFIGS))
def tiny_hf(request, tmp_path_factory):
  """(name, path, torch model) of a saved tiny random HF model, one per TINY_CONFIGS entry."""
  name = request.param
  path = str(tmp_path_factory.mktemp(f"hf_{name}"))
  model = factories.save_tiny_hf(name, path)
  return name, path, model
