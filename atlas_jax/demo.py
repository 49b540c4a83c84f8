"""The end-to-end ATLAS recipe on the synthetic suite: SFT, then LA-GRPO, with held-out
evaluations before training, after SFT and after RL, and a summary table with its picture
(summary.png: accuracy and reward per stage, accuracy per task family).

The demo config (configs/demo.py) is a full base config plus a `demo` group giving each
stage's steps and learning rate; each stage runs in its own sub-directory of the workdir
and resumes from it like any run.
"""

from __future__ import annotations

import json
import os
import time

from atlas_jax.config import OPTIM_GROUPS
from atlas_jax.rl import loop as rl_loop
from atlas_jax.run import plots
from atlas_jax.sft import loop as sft_loop


class DidNotLearn(RuntimeError):
  """The demo's SFT stage ended below the accuracy bar of configs/demo.py."""


def stage_config(c, recipe: str, workdir: str):
  """The demo config turned into one stage's config."""
  s = c.copy_and_resolve_references()
  with s.unlocked():
    s.recipe = recipe
    stage = c.demo.sft if recipe == "sft" else c.demo.rl
    s.train.steps = stage.steps
    s.optim.lr = stage.lr
    s.optim.warmup_steps = stage.warmup_steps
    for group in OPTIM_GROUPS:  # per-module settings the stage gives
      for field, value in stage.get(group, {}).items():
        s.optim[group][field] = value
    s.train.log_every = stage.log_every
    s.checkpoint.every = stage.steps
    if recipe == "rl":
      sft_dir = os.path.join(workdir, "sft")
      s.model.init_checkpoint = os.path.join(sft_dir, "checkpoints")
      s.tokenizer.path = os.path.join(sft_dir, "tokenizer")
      s.data.dataset_dir = os.path.join(sft_dir, "data")
  return s


def _report(stage: str, result: dict) -> dict:
  print(f"[eval] {stage}: held-out accuracy {result['accuracy']:.3f}, reward "
        f"{result['reward']:.3f} ({result.get('rollout_tokens_per_s', 0):.0f} rollout "
        "tokens/s)", flush=True)
  return result


def summary_table(rows: dict[str, dict], throughput: dict[str, float], wall: float) -> str:
  cols = [("accuracy", "accuracy"), ("reward", "reward"),
          ("functional_per_completion", "func tok/compl"),
          ("completion_length", "length")]
  lines = [f"{'stage':<14}" + "".join(f"{name:>16}" for _, name in cols)]
  for stage, r in rows.items():
    lines.append(f"{stage:<14}" + "".join(f"{r.get(k, float('nan')):>16.3f}" for k, _ in cols))
  lines.append("")
  lines += [f"{k:<28}{v:>12.1f}" for k, v in throughput.items()]
  lines.append(f"{'wall time (s)':<28}{wall:>12.1f}")
  return "\n".join(lines)


def run_demo(c, workdir: str) -> dict:
  """SFT then LA-GRPO on the synthetic suite; returns the evaluations and prints a table."""
  t0 = time.time()
  rows: dict[str, dict] = {}
  sft_c = stage_config(c, "sft", workdir)

  def before(run, state):
    if "before training" not in rows:
      rows["before training"] = _report("before training", rl_loop.evaluate_held_out(run, state.params, c))

  sft_state, sft_metrics, sft_run = sft_loop.train_sft(sft_c, os.path.join(workdir, "sft"),
                                                       on_start=before)
  rows["after SFT"] = _report("after SFT", rl_loop.evaluate_held_out(sft_run, sft_state.params, c))
  accuracy, bar = rows["after SFT"]["accuracy"], c.demo.min_sft_accuracy
  if not accuracy >= bar:
    print("\n" + summary_table(rows, {}, time.time() - t0), flush=True)
    raise DidNotLearn(f"demo failed: held-out accuracy after SFT is {accuracy:.3f}, below "
                      f"demo.min_sft_accuracy {bar:.2f} (2x chance with four options); SFT did "
                      "not learn the suite")
  rl_c = stage_config(c, "rl", workdir)
  rl_state, rl_metrics, rl_run = rl_loop.train_rl(rl_c, os.path.join(workdir, "rl"))
  rows["after LA-GRPO"] = _report("after LA-GRPO", rl_loop.evaluate_held_out(rl_run, rl_state.params, c))
  throughput = {
      "SFT tokens/s": sft_metrics.get("tokens_per_s", float("nan")),
      "RL rollout tokens/s": rl_metrics.get("rollout_tokens_per_s", float("nan")),
      "eval rollout tokens/s": rows["after LA-GRPO"]["rollout_tokens_per_s"],
  }
  wall = time.time() - t0
  table = summary_table(rows, throughput, wall)
  print("\n" + table, flush=True)
  result = {"evaluations": rows, "throughput": throughput, "wall_seconds": wall}
  with open(os.path.join(workdir, "summary.json"), "w") as f:
    json.dump(result, f, indent=2)
  with open(os.path.join(workdir, "summary.txt"), "w") as f:
    f.write(table + "\n")
  try:
    plots.plot_demo(result, os.path.join(workdir, "summary.png"))
  except Exception as e:  # noqa: BLE001  (a picture must never fail the demo)
    print(f"[plots] summary.png not drawn: {type(e).__name__}: {e}", flush=True)
  return result
