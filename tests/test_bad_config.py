"""A user's mistake on the command line stops `launch.train` before any work with one line
naming the field and what was expected, exit status 2, no traceback (`--verbose_errors`
brings it back); the validation itself never crashes on the values it checks."""

import os
import subprocess
import sys

import pytest

from atlas_jax import config as config_lib
from configs import rl as rl_config
from configs import sft as sft_config
from launch import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _launch(tmp_path, *args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "launch.train", "--config=configs/sft.py:tiny",
                         f"--workdir={tmp_path / 'w'}", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)


def test_a_bad_override_is_one_line_and_no_work(tmp_path):
  out = _launch(tmp_path, "--config.optim.lr=-1")
  assert out.returncode == 2, out.stderr
  lines = out.stderr.strip().splitlines()
  assert lines == ["launch.train: config.optim.lr -1.0 must be >= 0 (--verbose_errors shows "
                   "the traceback)"], out.stderr
  assert not (tmp_path / "w").exists()  # stopped before any work
  misspelt = _launch(tmp_path, "--config.optim.lrr=1")
  assert misspelt.returncode == 2 and "Traceback" not in misspelt.stderr
  assert "the config has no field 'lrr'; did you mean 'lr'?" in misspelt.stderr
  verbose = _launch(tmp_path, "--config.optim.lr=-1", "--verbose_errors")
  assert verbose.returncode != 0 and "Traceback" in verbose.stderr


def _config(recipe, **changes):
  c = (rl_config if recipe == "rl" else sft_config).get_config("tiny")
  for path, value in changes.items():
    *groups, field = path.split(".")
    node = c
    for g in groups:
      node = node[g]
    with node.ignore_type():
      node[field] = value
  return c


@pytest.mark.parametrize("recipe, field, value, message", [
    ("sft", "optim.lr", -1.0, "config.optim.lr -1.0 must be >= 0"),
    ("sft", "optim.lr", float("nan"), "config.optim.lr nan must be a finite number"),
    ("sft", "optim.lr", "fast", "config.optim.lr 'fast' must be a finite number"),
    ("sft", "optim.warmup_steps", -5, "config.optim.warmup_steps -5 must be >= 0"),
    ("sft", "optim.b2", 1.0, r"config.optim.b2 1.0 must be in \[0, 1\)"),
    ("sft", "train.logprob_chunk", 0, "config.train.logprob_chunk 0 must be >= 1"),
    ("sft", "train.steps", 0, "config.train.steps 0 must be >= 1"),
    ("sft", "data.batch_size", 0, "config.data.batch_size 0 must be > 0"),
    ("sft", "data.max_length", 2.5, "config.data.max_length 2.5 must be a finite integer"),
    ("sft", "data.length_buckets", (0,), "config.data.length_buckets"),
    ("sft", "model.dtype", "float8", "config.model.dtype 'float8' is not one of"),
    ("sft", "model.remat", "some", "config.model.remat 'some' is not one of"),
    ("sft", "mesh.tensor", 0, "config.mesh.tensor 0 must be >= 1"),
    ("sft", "checkpoint.keep", 0, "config.checkpoint.keep 0 must be >= 1"),
    ("sft", "tokenizer.path", "/no/such/tokenizer", "config.tokenizer.path '/no/such/tok"),
    ("sft", "model.init_checkpoint", "/no/such/ckpt", "config.model.init_checkpoint"),
    ("sft", "data.train_jsonl", "/no/such.jsonl", "config.data.train_jsonl '/no/such.jsonl'"),
    ("rl", "rl.max_new_tokens", 0, "config.rl.max_new_tokens 0 must be >= 1"),
    ("rl", "rl.group_size", 1, "config.rl.group_size 1 must be >= 2"),
    ("rl", "rl.top_p", 0.0, r"config.rl.top_p 0.0 must be in \(0, 1\]"),
    ("rl", "rl.loss_agg", "mean", "config.rl.loss_agg 'mean' is not one of"),
    ("rl", "rl.temperature", float("inf"), "config.rl.temperature inf must be a finite"),
])
def test_validation_names_the_field_and_never_crashes(recipe, field, value, message):
  with pytest.raises(ValueError, match=message):
    config_lib.validate(_config(recipe, **{field: value}))


def test_the_published_recipes_validate():
  for size in ("tiny", "qwen2.5-vl-7b"):
    config_lib.validate(sft_config.get_config(size))
    config_lib.validate(rl_config.get_config(size))


def test_one_line_reads_a_misspelt_field():
  error = AttributeError("'\\'lrr\\'\\nDid you mean \"lr\" instead of \"lrr\"?'")
  assert cli.one_line(error) == ("the config has no field 'lrr'; did you mean 'lr'? (check "
                                 "the --config.* overrides)")
  assert cli.one_line(ValueError("a\n  b")) == "a b"
