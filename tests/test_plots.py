"""Pictures of a run: curves.png from metrics.jsonl, the demo's and a benchmark's summary.png."""

import json
import os

import pytest

pytest.importorskip("matplotlib")

from atlas_jax.run import plots  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"


def _is_png(path) -> bool:
  with open(path, "rb") as f:
    return os.path.getsize(path) > 1000 and f.read(8) == PNG


def _metrics(workdir, rows):
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
    for r in rows:
      f.write(json.dumps(r) + "\n")


def _sft_rl_rows():
  rows = [{"step": s, "prefix": "train", "time": 0.0, "loss": 5.0 / s, "token_accuracy": 0.1 * s,
           "learning_rate": 1e-3, "tokens_per_s": 100.0 + s} for s in range(1, 6)]
  rows.append({"step": 3, "text": "resume", "value": "restored step 3"})
  rows.append({"step": 4, "prefix": "train", "time": 0.0, "loss": 0.5})  # resumed: kept
  rows += [{"step": s, "prefix": "rl", "time": 0.0, "reward": 0.2 * s, "reward_format": 0.1,
            "reward_accuracy": 0.5, "functional_per_completion": 1.0, "loss": 0.1,
            "rollout_tokens_per_s": 50.0} for s in range(1, 4)]
  rows.append({"step": 5, "prefix": "eval", "time": 0.0, "accuracy": 0.4,
               "accuracy/count": 0.5, "functional_per_answer": 0.8})
  return rows


def test_curves_from_metrics(tmp_path):
  _metrics(str(tmp_path), _sft_rl_rows() + ["not json"])
  series = plots.read_metrics(str(tmp_path / "metrics.jsonl"))
  assert series["train/loss"][0] == [1, 2, 3, 4, 5]
  assert series["train/loss"][1][3] == 0.5  # the later write of step 4 wins
  assert plots.plot_curves(str(tmp_path)) == str(tmp_path / "curves.png")
  assert _is_png(tmp_path / "curves.png")


def test_curves_with_nothing_to_draw(tmp_path):
  assert plots.plot_curves(str(tmp_path)) is None
  _metrics(str(tmp_path), [{"step": 0, "text": "data", "value": "x"}])
  assert plots.plot_curves(str(tmp_path)) is None


def test_refresh_is_throttled_and_never_raises(tmp_path, capsys):
  _metrics(str(tmp_path), _sft_rl_rows())
  plots.refresh(str(tmp_path), force=True)
  first = os.path.getmtime(tmp_path / "curves.png")
  os.remove(tmp_path / "curves.png")
  plots.refresh(str(tmp_path), min_interval=3600)  # too soon: not redrawn
  assert not (tmp_path / "curves.png").exists()
  plots.refresh(str(tmp_path), force=True)
  assert os.path.getmtime(tmp_path / "curves.png") >= first
  os.remove(tmp_path / "curves.png")
  os.mkdir(tmp_path / "curves.png")  # cannot be written: printed, not raised
  plots.refresh(str(tmp_path), force=True)
  assert "curves.png not drawn" in capsys.readouterr().out


def _demo_result():
  stage = lambda a: {"accuracy": a, "reward": a + 0.3, "accuracy/count": a,
                     "accuracy/mirror": a / 2, "functional_per_completion": 1.0}
  return {"evaluations": {"before training": stage(0.1), "after SFT": stage(0.6),
                          "after LA-GRPO": stage(0.7)}, "throughput": {}, "wall_seconds": 1}


def _benchmark_summary():
  return {"rows": 3, "accuracy": 0.5, "extraction_failures": 1,
          "per_category": {"Counting": {"rows": 2, "accuracy": 0.5},
                           "IQ_Test": {"rows": 1, "accuracy": 1.0}},
          "per_l2_category": {"perception": {"rows": 3, "accuracy": 0.66}}}


def test_demo_and_benchmark_pictures(tmp_path):
  assert _is_png(plots.plot_demo(_demo_result(), str(tmp_path / "demo.png")))
  assert _is_png(plots.plot_benchmark(_benchmark_summary(), str(tmp_path / "bench.png")))
  assert _is_png(plots.plot_benchmark({"rows": 0, "accuracy": float("nan"),
                                       "per_category": {}}, str(tmp_path / "empty.png")))


def test_launch_plot_redraws_a_demo_workdir(tmp_path, capsys):
  from launch import plot as launch_plot
  _metrics(str(tmp_path / "sft"), _sft_rl_rows()[:5])
  _metrics(str(tmp_path / "rl"), _sft_rl_rows()[7:])
  (tmp_path / "summary.json").write_text(json.dumps(_demo_result()))
  (tmp_path / "eval").mkdir()
  (tmp_path / "eval" / "summary.json").write_text(json.dumps(_benchmark_summary()))
  launch_plot.main(["plot", str(tmp_path)])
  for path in ("sft/curves.png", "rl/curves.png", "summary.png", "eval/summary.png"):
    assert _is_png(tmp_path / path), path
  assert "sft/curves.png" in capsys.readouterr().out
  (tmp_path / "empty").mkdir()
  with pytest.raises(SystemExit, match="nothing to draw"):
    launch_plot.main(["plot", str(tmp_path / "empty")])
