"""The AOT report's import line (`aot.import_memory`): what the born-sharded HF import holds
per chip and, in flight, per host, from the shardings alone."""

import math

import jax

from atlas_jax import aot, hf, sharding
from atlas_jax.model import abstract_params, from_size


def test_one_device_holds_the_params_and_the_grown_vocabulary_matrix():
  config = from_size("tiny")
  mesh = sharding.make_mesh(dict(data=1, fsdp=1, tensor=1))
  got = aot.import_memory(config, mesh)
  params = abstract_params(config)
  total = sum(4 * math.prod(x.shape) for x in jax.tree.leaves(params))
  vocab, width = params["embed"]["embedding"].shape
  assert math.isclose(got["chip"] * aot.GIB, total + 2 * 4 * vocab * width)
  largest = max(4 * math.prod(x.shape) for x in jax.tree.leaves(params))
  assert got["host"] * aot.GIB > largest + hf._CHUNK_BYTES  # noqa: SLF001


def test_the_line_is_printed_once_per_recipe_and_slice():
  row = dict(size="qwen2.5-vl-7b", topology="v5e:4x4", mesh="fsdp=4xtensor=4", rows=4,
             argument_gib=1.0, temp_gib=1.0, output_gib=0.0, alias_gib=0.0, total_gib=2.0,
             hbm_gib=16, tflops=1.0, compile_s=1.0, recipe="sft.py:qwen2.5-vl-7b",
             import_gib=2.59, import_host_gib=0.47)
  table = aot.format_table([aot.Report(step="sft", **row), aot.Report(step="x", **row)])
  lines = [l for l in table.splitlines() if l.startswith("import ")]
  assert lines == ["import sft.py:qwen2.5-vl-7b on v5e:4x4 (fsdp=4xtensor=4): 2.59 GiB per "
                   "chip of 16 (float32 params' shards, vocabulary growth), 0.47 GiB host "
                   "memory in flight per host"]
