"""GRPO against LA-GRPO from one SFT checkpoint, over several seeds (configs/ablate.py).

One SFT run (the demo's SFT stage), then for every seed in `ablate.seeds` and every name in
`ablate.variants` an RL run from that checkpoint (the demo's RL stage):

  grpo             alpha = 0 (plain GRPO)
  la_grpo_pg       alpha = ablate.alpha, anchor pg (the advantage-weighted surrogate)
  la_grpo_nll_pos  alpha = ablate.alpha, anchor nll_pos (-log pi in positive-advantage rows)

A seed sets config.seed of the RL run only (rollout sampling and prompt order); every run
starts from the same SFT params and draws from the same prompt set, and the held-out split
is the same for all. Each run has its own sub-directory (<workdir>/sft,
<workdir>/rl/<variant>/seed<k>) and resumes from it; a run whose result.json is written is
finished and skipped on a rerun. Results, mean ± sample std across seeds:

  ablation.json   every run's held-out evaluation and training curves, and the summary
  ablation.txt    the table (columns: `COLUMNS`)
  ablation.png    held-out accuracy and reward per variant; dilution ratio, reward and
                  functional tokens per completion over RL training
"""

from __future__ import annotations

import json
import math
import os
import time

import jax
import numpy as np

from atlas_jax import config as config_lib
from atlas_jax import demo
from atlas_jax.config import VARIANTS
from atlas_jax.rl import loop as rl_loop
from atlas_jax.rl import rewards as rewards_lib
from atlas_jax.run import plots
from atlas_jax.run.steps import StepCache
from atlas_jax.sft import loop as sft_loop

_ANCHORS = {"grpo": "pg", "la_grpo_pg": "pg", "la_grpo_nll_pos": "nll_pos"}
# Reward components in the table: every registered reward except accuracy (its own column).
COMPONENTS = tuple(sorted(k for k in rewards_lib.REWARDS if k != "accuracy"))
# (key in the summary, table heading). Held-out evaluation, then RL training curves.
COLUMNS = (("accuracy", "accuracy"), ("reward", "reward"),
           *((k, k) for k in COMPONENTS),
           ("functional_per_completion", "func tok/compl"),
           ("dilution_ratio_mean", "dilution mean"), ("dilution_ratio_final", "dilution final"))
_CURVES = ("dilution_ratio", "reward", "functional_per_completion")


def variant_settings(name: str, alpha: float) -> dict:
  """{"alpha", "anchor"} of a variant name (one of VARIANTS)."""
  if name not in VARIANTS:
    raise ValueError(f"config.ablate.variants has {name!r}; expected names from {VARIANTS}")
  return {"alpha": 0.0 if name == "grpo" else float(alpha), "anchor": _ANCHORS[name]}


def run_dir(workdir: str, variant: str, seed: int) -> str:
  return os.path.join(workdir, "rl", variant, f"seed{seed}")


def rl_run_config(c, workdir: str, variant: str, seed: int):
  """The RL stage config of one run: the demo's RL stage from <workdir>/sft, with the
  variant's alpha and anchor and config.seed = seed."""
  s = demo.stage_config(c, "rl", workdir)
  settings = variant_settings(variant, c.ablate.alpha)
  with s.unlocked():
    s.seed = seed
    s.rl.alpha = settings["alpha"]
    s.rl.anchor = settings["anchor"]
  return s


def _read_json(path: str):
  if not os.path.isfile(path):
    return None
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _write_json(path: str, value) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(value, f, indent=2)
  os.replace(tmp, path)  # a result.json is whole or absent


def _check_same(path: str, recorded: dict, expected: dict) -> None:
  if recorded != expected:
    raise ValueError(f"{path} was written by a run with {recorded}; this ablation asks for "
                     f"{expected}; use a fresh --workdir")


def _settings(s, **extra) -> dict:
  """What identifies a stage run (a finished run with other settings is an error)."""
  return dict(seed=s.seed, steps=s.train.steps, lr=s.optim.lr, alpha=s.rl.alpha,
              anchor=s.rl.anchor, **extra)


def _run_sft(c, workdir: str, cache: StepCache) -> dict:
  out = os.path.join(workdir, "sft")
  s = demo.stage_config(c, "sft", workdir)
  path = os.path.join(out, "result.json")
  settings = _settings(s)
  done = _read_json(path)
  if done is not None:
    _check_same(path, done["settings"], settings)
    print(f"[ablate] SFT: finished earlier ({path}), skipped", flush=True)
    return done
  print(f"[ablate] SFT: {s.train.steps} steps at lr {s.optim.lr:g} -> {out}", flush=True)
  t0 = time.time()
  state, _, run = sft_loop.train_sft(s, out, cache=cache)
  result = {"settings": settings, "eval": rl_loop.evaluate_held_out(run, state.params, c),
            "seconds": time.time() - t0}
  print(f"[ablate] SFT: held-out accuracy {result['eval']['accuracy']:.3f} "
        f"({result['seconds']:.0f}s)", flush=True)
  _write_json(path, result)
  return result


def _curves(directory: str) -> dict:
  """{name: (steps, values)} of the RL series in `_CURVES` from a run's metrics.jsonl."""
  series = plots.read_metrics(os.path.join(directory, "metrics.jsonl"))
  return {k: list(series[f"rl/{k}"]) for k in _CURVES if f"rl/{k}" in series}


def _run_rl(c, workdir: str, variant: str, seed: int, label: str, cache: StepCache) -> dict:
  out = run_dir(workdir, variant, seed)
  s = rl_run_config(c, workdir, variant, seed)
  path = os.path.join(out, "result.json")
  settings = _settings(s, variant=variant)
  done = _read_json(path)
  if done is not None:
    _check_same(path, done["settings"], settings)
    print(f"[ablate] {label}: finished earlier ({path}), skipped", flush=True)
    return done
  print(f"[ablate] {label}: RL {variant} (alpha {s.rl.alpha:g}, anchor {s.rl.anchor}) seed "
        f"{seed}, {s.train.steps} steps -> {out}", flush=True)
  t0 = time.time()
  state, _, run = rl_loop.train_rl(s, out, cache=cache)
  evaluation = rl_loop.evaluate_held_out(run, state.params, c)
  curves = _curves(out)
  dilution = curves.get("dilution_ratio", ([], []))[1]
  result = {"settings": settings, "eval": evaluation, "curves": curves,
            "dilution_ratio_mean": float(np.mean(dilution)) if dilution else math.nan,
            "dilution_ratio_final": float(dilution[-1]) if dilution else math.nan,
            "seconds": time.time() - t0}
  print(f"[ablate] {label}: held-out accuracy {evaluation['accuracy']:.3f}, reward "
        f"{evaluation['reward']:.3f}, mean dilution ratio {result['dilution_ratio_mean']:.4g} "
        f"({result['seconds']:.0f}s)", flush=True)
  _write_json(path, result)
  return result


def _mean_std(values) -> dict:
  """Mean and sample std (ddof 1; 0 for one value) of the finite values, and their count."""
  x = np.asarray([v for v in values if v is not None and np.isfinite(v)], np.float64)
  if not x.size:
    return {"mean": math.nan, "std": math.nan, "n": 0}
  return {"mean": float(x.mean()), "std": float(x.std(ddof=1)) if x.size > 1 else 0.0,
          "n": int(x.size)}


def _value(run: dict, key: str) -> float:
  return run[key] if key.startswith("dilution_ratio") else run["eval"].get(key, math.nan)


def summarize(runs: dict[str, list[dict]]) -> dict[str, dict[str, dict]]:
  """{variant: {column key: {"mean", "std", "n"}}} from each variant's run results."""
  return {v: {k: _mean_std([_value(r, k) for r in rs]) for k, _ in COLUMNS}
          for v, rs in runs.items()}


def ablation_table(summary: dict, sft_eval: dict, settings: dict, wall: float) -> str:
  """The table: one row per variant (mean ± std across seeds), and the SFT start."""
  head = f"{'variant':<17}{'alpha':>6}{'anchor':>9}{'seeds':>6}"
  lines = [head + "".join(f"{name:>17}" for _, name in COLUMNS)]
  fmt = lambda m, s: "n/a" if math.isnan(m) else f"{m:.4f}±{s:.4f}"
  for v, cols in summary.items():
    st = settings[v]
    n = max(c["n"] for c in cols.values())
    lines.append(f"{v:<17}{st['alpha']:>6g}{st['anchor']:>9}{n:>6}" + "".join(
        f"{fmt(cols[k]['mean'], cols[k]['std']):>17}" for k, _ in COLUMNS))
  lines.append(f"{'sft (start)':<17}{'':>6}{'':>9}{1:>6}" + "".join(
      f"{fmt(sft_eval.get(k, math.nan), 0.0) if k in sft_eval else 'n/a':>17}"
      for k, _ in COLUMNS))
  lines.append("")
  lines.append("held-out evaluation (greedy) after training: accuracy, reward, its components, "
               "func tok/compl; dilution ratio (functional / other token rows' gradient norm) "
               "over RL training: mean over steps, last step. mean ± sample std across seeds.")
  lines.append(f"wall time of the runs (s): {wall:.1f}")
  return "\n".join(lines)


def plot_ablation(result: dict, path: str) -> str:
  """ablation.png: held-out accuracy and reward per variant (bars, std whiskers, the SFT
  start dashed), and dilution ratio, training reward and functional tokens per completion
  against RL step (mean across seeds, band from the lowest to the highest seed)."""
  from matplotlib.figure import Figure
  fig = Figure(figsize=(13, 8), dpi=100, layout="constrained")
  summary, sft_eval = result["summary"], result["sft"]["eval"]
  ax = fig.add_subplot(2, 2, 1)
  width = 0.38
  for j, (key, color) in enumerate((("accuracy", "tab:blue"), ("reward", "tab:orange"))):
    xs = [i + (j - 0.5) * width for i in range(len(summary))]
    bars = ax.bar(xs, [s[key]["mean"] for s in summary.values()], width,
                  yerr=[s[key]["std"] for s in summary.values()], capsize=3, color=color,
                  label=key)
    ax.bar_label(bars, fmt="%.3f", fontsize=7)
    ax.axhline(sft_eval.get(key, math.nan), color=color, linestyle="--", linewidth=1,
               label=f"{key}, SFT start")
  ax.set_xticks(range(len(summary)), list(summary), fontsize=8)
  ax.set_ylim(top=1.3 * max([s[k]["mean"] + s[k]["std"] for s in summary.values()
                             for k in ("accuracy", "reward")] + [0.1]))
  ax.set_title("held-out accuracy and reward (mean ± std across seeds)")
  ax.grid(axis="y", alpha=0.3)
  ax.legend(fontsize=7, ncol=2, loc="upper left")
  titles = {"dilution_ratio": "dilution ratio (functional / other row grad norm)",
            "reward": "training reward", "functional_per_completion":
            "functional tokens per completion (training)"}
  for i, name in enumerate(_CURVES):
    ax = fig.add_subplot(2, 2, i + 2)
    for variant, runs in result["runs"].items():
      curves = [r["curves"][name] for r in runs if name in r.get("curves", {})]
      if not curves:
        continue
      steps = sorted(set.intersection(*(set(c[0]) for c in curves)))
      if not steps:
        continue
      ys = np.asarray([[dict(zip(*c))[s] for s in steps] for c in curves])
      line, = ax.plot(steps, ys.mean(0), marker="." if len(steps) < 30 else None,
                      label=variant, linewidth=1.2)
      ax.fill_between(steps, ys.min(0), ys.max(0), color=line.get_color(), alpha=0.15)
    if name == "dilution_ratio" and ax.lines and all(
        np.all(line.get_ydata() > 0) for line in ax.lines):
      ax.set_yscale("log")
    ax.set_title(titles[name])
    ax.set_xlabel("RL step")
    ax.grid(alpha=0.3)
    if ax.lines:
      ax.legend(fontsize=7)
  fig.suptitle(f"GRPO vs LA-GRPO, {len(result['seeds'])} seeds (curves: mean, band: seed "
               "range)")
  fig.savefig(path)
  return path


def use_compilation_cache(workdir: str) -> None:
  """Persistent JAX compilation cache under <workdir>/jax_cache (unless one is set): the
  runs of one variant compile the same steps, and every run the same sampler."""
  if not jax.config.jax_compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir", os.path.join(workdir, "jax_cache"))


def run_ablation(c, workdir: str) -> dict:
  """The whole ablation (or what a previous call left unfinished). Returns what
  ablation.json holds: seeds, variants' settings, sft, runs {variant: [per seed]}, summary,
  table, wall_seconds (this call) and run_seconds (sum over the runs, skipped ones too)."""
  config_lib.validate(c)
  t0 = time.time()
  cache = StepCache()  # every variant's runs share their steps
  os.makedirs(workdir, exist_ok=True)
  seeds, variants = tuple(c.ablate.seeds), tuple(c.ablate.variants)
  sft = _run_sft(c, workdir, cache)
  runs: dict[str, list[dict]] = {v: [] for v in variants}
  total = len(seeds) * len(variants)
  for i, seed in enumerate(seeds):
    for j, variant in enumerate(variants):
      label = f"run {i * len(variants) + j + 1}/{total}"
      runs[variant].append(_run_rl(c, workdir, variant, seed, label, cache))
  summary = summarize(runs)
  settings = {v: variant_settings(v, c.ablate.alpha) for v in variants}
  run_seconds = sft["seconds"] + sum(r["seconds"] for rs in runs.values() for r in rs)
  table = ablation_table(summary, sft["eval"], settings, run_seconds)
  print("\n" + table, flush=True)
  result = {"seeds": list(seeds), "variants": settings, "sft": sft, "runs": runs,
            "summary": summary, "columns": [k for k, _ in COLUMNS], "table": table,
            "run_seconds": run_seconds, "wall_seconds": time.time() - t0}
  _write_json(os.path.join(workdir, "ablation.json"), result)
  with open(os.path.join(workdir, "ablation.txt"), "w", encoding="utf-8") as f:
    f.write(table + "\n")
  try:
    plot_ablation(result, os.path.join(workdir, "ablation.png"))
  except Exception as e:  # noqa: BLE001  (a picture must never fail the ablation)
    print(f"[plots] ablation.png not drawn: {type(e).__name__}: {e}", flush=True)
  return result
