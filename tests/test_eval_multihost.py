"""launch.evaluate in two processes on localhost (jax.distributed, 2 CPU devices each) scores
the same rows, with the same completions, as one process: uneven shards (5 rows over 2
processes), a bad row on one of them, and a batch filled with invalid rows."""

import json
import os
import sys

import pytest

from tests import factories
from tests.test_eval_benchmarks import b64, write_tsv

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 600


def _run(processes: int, hf_dir: str, data: str, out: str, cache: str) -> None:
  # Two CPU devices per process, and the one-process run gets all four: the same global
  # mesh, so each device holds the same rows and greedy decoding of this random model (whose
  # logits are near ties) sees bitwise the same numbers.
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, JAX_COMPILATION_CACHE_DIR=cache,
             XLA_FLAGS=factories.xla_flags(4 if processes == 1 else 2))
  flags = [f"--checkpoint={hf_dir}", f"--data={data}", f"--output={out}",
           "--config.eval.batch_size=4", "--config.eval.max_new_tokens=8",
           "--config.data.max_length=128"]
  if processes > 1:
    flags += ["--config.distributed.initialize=true",
              f"--config.distributed.coordinator_address=localhost:{factories.free_port()}",
              f"--config.distributed.num_processes={processes}"]
  factories.run_processes(
      [[sys.executable, "-m", "launch.evaluate", *flags,
        *([f"--config.distributed.process_id={i}"] if processes > 1 else [])]
       for i in range(processes)],
      cwd=ROOT, env=env, timeout=TIMEOUT_S)


@pytest.mark.slow
def test_two_processes_score_like_one(tmp_path):
  hf_dir = str(tmp_path / "hf")
  factories.save_tiny_hf_with_tokenizer(hf_dir)
  colors = ["red", "blue", "green", "red", "blue", "green"]
  rows = [dict(index=i, image=b64(c), question=f"Colour {i}?", A="red", B="blue", C="green",
               answer="ABC"[i % 3], category=["Counting", "Jigsaw"][i % 2])
          for i, c in enumerate(colors)]
  rows[3]["image"] = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAAB" * 4  # corrupt: process 1 skips it
  write_tsv(tmp_path / "b.tsv", rows)
  cache = str(tmp_path / "jax_cache")
  _run(1, hf_dir, str(tmp_path / "b.tsv"), str(tmp_path / "one"), cache)
  _run(2, hf_dir, str(tmp_path / "b.tsv"), str(tmp_path / "two"), cache)
  read = lambda d, f: open(os.path.join(tmp_path, d, f)).read()
  one, two = (json.loads(read(d, "summary.json")) for d in ("one", "two"))
  assert one["rows"] == two["rows"] == 5 and two["skipped"] == {"corrupt_image": 1}
  for key in ("accuracy", "per_category", "extraction_failures", "mean_length"):
    assert one[key] == two[key], key
  assert read("one", "predictions.jsonl") == read("two", "predictions.jsonl")
