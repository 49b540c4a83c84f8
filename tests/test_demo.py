"""The main job's pass/fail contract: the demo stops with one clear line, and a non-zero
exit, when SFT did not learn. The stages are replaced by stubs here (the real demo runs in
CI as the main job); what is tested is the gate, the table and the launcher's exit."""

import pytest

from atlas_jax import demo
from configs import demo as demo_config


def _fake_stages(monkeypatch, sft_accuracy):
  calls = []

  class Run:
    data_report = None

  def train_sft(c, workdir, on_start=None):
    calls.append(("sft", c.train.steps, c.optim.lr))
    on_start(Run(), type("S", (), {"params": None})())
    return type("S", (), {"params": "sft"})(), {"tokens_per_s": 1.0}, Run()

  def train_rl(c, workdir):
    calls.append(("rl", c.train.steps, c.model.init_checkpoint))
    return type("S", (), {"params": "rl"})(), {"rollout_tokens_per_s": 2.0}, Run()

  accuracy = {None: 0.0, "sft": sft_accuracy, "rl": sft_accuracy + 0.05}
  monkeypatch.setattr(demo.sft_loop, "train_sft", train_sft)
  monkeypatch.setattr(demo.rl_loop, "train_rl", train_rl)
  monkeypatch.setattr(demo.rl_loop, "evaluate_held_out", lambda run, params, c: dict(
      accuracy=accuracy[params], reward=accuracy[params], functional_per_completion=1.0,
      completion_length=40.0, rollout_tokens_per_s=3.0))
  monkeypatch.setattr(demo.plots, "plot_demo", lambda result, path: None)
  return calls


def test_demo_below_the_bar_stops_after_sft_with_one_line(monkeypatch, tmp_path, capsys):
  c = demo_config.get_config()
  calls = _fake_stages(monkeypatch, sft_accuracy=0.3)
  with pytest.raises(demo.DidNotLearn, match=r"held-out accuracy after SFT is 0\.300, below "
                     r"demo\.min_sft_accuracy 0\.50"):
    demo.run_demo(c, str(tmp_path))
  assert [name for name, *_ in calls] == ["sft"]  # no RL after a failed SFT
  assert "after SFT" in capsys.readouterr().out  # the table so far is still printed


def test_demo_above_the_bar_runs_both_stages_and_writes_the_summary(monkeypatch, tmp_path):
  c = demo_config.get_config()
  calls = _fake_stages(monkeypatch, sft_accuracy=0.6)
  result = demo.run_demo(c, str(tmp_path))
  assert calls[0] == ("sft", c.demo.sft.steps, c.demo.sft.lr)
  assert calls[1][:2] == ("rl", c.demo.rl.steps)
  assert calls[1][2].endswith("sft/checkpoints")  # RL starts from the SFT checkpoint
  assert result["evaluations"]["after LA-GRPO"]["accuracy"] == pytest.approx(0.65)
  assert (tmp_path / "summary.txt").read_text().startswith("stage")


def test_launcher_exits_non_zero_with_the_reason(monkeypatch, tmp_path, capsys):
  from launch import train
  monkeypatch.setattr(demo, "run_demo", lambda c, workdir: (_ for _ in ()).throw(
      demo.DidNotLearn("demo failed: held-out accuracy after SFT is 0.100")))
  c = demo_config.get_config()
  monkeypatch.setattr(train, "FLAGS", type("F", (), {"config": c, "workdir": str(tmp_path)}))
  with pytest.raises(SystemExit) as exit_info:
    train.main(["train"])
  assert exit_info.value.code == "demo failed: held-out accuracy after SFT is 0.100"
