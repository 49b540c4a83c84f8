"""The evaluator end to end with a tiny random model: the same questions through every
format, pass@k, bad rows, and the command line on a Hugging Face directory."""

import json
import os

import pytest

from atlas_jax.data import synthetic
from atlas_jax.eval import benchmarks, evaluator, load, writers
from atlas_jax.run import setup
from configs import sft as sft_config
from tests import factories
from tests.test_eval_benchmarks import b64, write_tsv


@pytest.fixture(scope="module")
def model(tmp_path_factory):
  c = sft_config.get_config("tiny")
  c.data.batch_size = 4
  mesh = setup.make_mesh(c)
  tok = setup.load_tokenizer(c, str(tmp_path_factory.mktemp("tok")))
  model_config, params, table = setup.load_model(c, tok, mesh)
  return load.Model(c, mesh, tok, model_config, table), params


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
  """Five held-out synthetic questions, as JSONL, VLMEvalKit TSV and HF parquet."""
  d = tmp_path_factory.mktemp("suite")
  jsonl = synthetic.generate_suite(str(d), n_per_family=1, seed=3, split="test")
  items, _ = benchmarks.read(jsonl)
  writers.write_tsv(items, str(d / "suite.tsv"))
  paths = {"jsonl": jsonl, "tsv": str(d / "suite.tsv")}
  try:
    writers.write_parquet(items, str(d / "suite.parquet"))
    paths["parquet"] = str(d / "suite.parquet")
  except ImportError:
    pass
  return paths


def _settings(c, **kw):
  return evaluator.Settings.from_config(c, **dict(dict(batch_size=4, max_new_tokens=12), **kw))


def _predictions(out):
  with open(os.path.join(out, "predictions.jsonl")) as f:
    return [json.loads(l) for l in f]


def test_every_format_gives_the_same_completions(model, suite, tmp_path):
  m, params = model
  results = {}
  for kind, path in suite.items():
    items, skipped = benchmarks.read(path)
    assert len(items) == 5 and not skipped
    out = str(tmp_path / kind)
    summary = evaluator.evaluate(m, params, items, _settings(m.config, prompt="question"),
                                 output_dir=out, progress=False)
    preds = _predictions(out)
    assert len(preds) == summary["rows"] == 5  # 5 rows over two batches of 4
    assert sum(g["rows"] for g in summary["per_category"].values()) == 5
    assert os.path.getsize(os.path.join(out, "summary.png")) > 1000
    results[kind] = (summary["accuracy"], [(p["id"], p["prompt"], p["completion"])
                                           for p in preds])
  first = results.pop("jsonl")
  for kind, got in results.items():
    assert got == first, kind


def test_native_prompts_differ_by_format(model, suite, tmp_path):
  m, params = model
  items, _ = benchmarks.read(suite["tsv"], max_rows=2)
  evaluator.evaluate(m, params, items, _settings(m.config), output_dir=str(tmp_path),
                     progress=False, plot=False)
  [p, _] = _predictions(str(tmp_path))
  assert p["prompt"].startswith("Question: ") and "\nOptions:\nA. red\n" in p["prompt"]
  assert p["prompt"].endswith("Please select the correct answer from the options above.")


def test_samples_give_pass_at_k(model, suite, tmp_path):
  m, params = model
  items, _ = benchmarks.read(suite["jsonl"], max_rows=3)
  summary = evaluator.evaluate(m, params, items, _settings(m.config, samples=2, seed=1),
                               output_dir=str(tmp_path), progress=False, plot=False)
  assert "pass@2" in summary and summary["completions"] == 6 and not summary["greedy"]
  preds = _predictions(str(tmp_path))
  assert all(len(p["completion"]) == 2 and "pass_at_k" in p for p in preds)


def test_bad_rows_are_skipped_and_counted(model, tmp_path):
  m, params = model
  rows = [dict(index=i, image=b64("red"), question="Colour?", A="red", B="blue", answer="A",
               category="c") for i in range(3)]
  rows[1]["image"] = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAAB" * 4  # base64 of a broken PNG
  rows[2]["question"] = "word " * 400                         # longer than max_length
  write_tsv(tmp_path / "bad.tsv", rows)
  items, skipped = benchmarks.read(str(tmp_path / "bad.tsv"))
  summary = evaluator.evaluate(m, params, items, _settings(m.config), skipped=skipped,
                               progress=False)
  assert summary["rows"] == 1 and summary["skipped"] == {"corrupt_image": 1, "too_long": 1}


def test_settings_are_checked(model):
  m, _ = model
  with pytest.raises(ValueError, match="eval batch_size 0 must be a positive multiple"):
    _settings(m.config, batch_size=0).check(m.mesh)
  with pytest.raises(ValueError, match="eval prompt 'odd' is not one of"):
    _settings(m.config, prompt="odd").check(m.mesh)


@pytest.mark.slow
def test_command_line_on_a_hugging_face_directory(tmp_path, capsys):
  from absl import flags

  from launch import checkpoint_config
  from launch import evaluate as launch_evaluate
  hf_dir = str(tmp_path / "hf")
  factories.save_tiny_hf_with_tokenizer(hf_dir)
  rows = [dict(index=i, image=b64(color), question="Colour?", A="red", B="blue",
               answer="AB"[i % 2], category=["Counting", "Jigsaw"][i % 2])
          for i, color in enumerate(["red", "blue", "red"])]
  write_tsv(tmp_path / "b.tsv", rows)
  out = str(tmp_path / "out")
  flags.FLAGS.unparse_flags()
  argv = checkpoint_config.parse_flags(
      ["evaluate", f"--checkpoint={hf_dir}", f"--data={tmp_path / 'b.tsv'}", f"--output={out}",
       "--config.eval.max_new_tokens=8", "--config.eval.batch_size=2", "--prompt=boxed",
       "--subtasks=blink_atlas"])
  try:
    launch_evaluate.main(argv)
  finally:
    flags.FLAGS.unparse_flags()
  summary = json.loads(open(os.path.join(out, "summary.json")).read())
  assert summary["rows"] == 3 and set(summary["per_category"]) == {"Counting", "Jigsaw"}
  assert summary["subtasks"] == ["Counting", "Jigsaw"] and "subtask_mean" in summary
  assert summary["prompt"] == "boxed" and summary["checkpoint"] == hf_dir
  assert len(_predictions(out)) == 3 and os.path.isfile(os.path.join(out, "summary.png"))
  assert "rows=3" in capsys.readouterr().out


def test_checkpoint_kind_is_named(tmp_path):
  with pytest.raises(ValueError, match="is not a training workdir"):
    load.kind_of(str(tmp_path))
