"""GRPO against LA-GRPO from one SFT checkpoint, over several seeds (configs/ablate.py).

One SFT run (the demo's SFT stage), then for every seed in `ablate.seeds` and every row (a
name in `ablate.variants`, and for the LA-GRPO ones every alpha in `ablate.alphas`) an RL
run from that checkpoint (the demo's RL stage):

  grpo                  alpha = 0 (plain GRPO)
  la_grpo_pg_a<alpha>   anchor pg (the advantage-weighted surrogate)
  la_grpo_nll_pos_a<a>  anchor nll_pos (-log pi in positive-advantage rows)

A seed sets config.seed of the RL run only (rollout sampling and prompt order); every run
starts from the same SFT params and draws from the same prompt set, and the held-out split
is the same for all. `ablate.suite` other than the default writes the synthetic suite in
that style (data.synthetic.SuiteStyle: the sparse regime) under <workdir>/suite and trains
on it. Each run has its own sub-directory (<workdir>/sft, <workdir>/rl/<row>/seed<k>) and
resumes from it; a run whose result.json is written is finished and skipped on a rerun.

Functional tokens are counted, and their correctness judged, by the token the task family
needs (functional_tokens.TASK_TOKENS): while the ablation runs, one more reward component,
`functional_correct` (the completion's uses of its task's token; weight 0, so the reward is
unchanged), is registered (rewards.register), so that the held-out evaluation and every RL
step report it next to functional_per_completion. Results, mean ± sample std across seeds:

  ablation.json   every run's held-out evaluation and training curves, and the summary
  ablation.txt    the table (columns: `COLUMNS`)
  ablation.png    held-out accuracy and reward per row; dilution ratio, reward, functional
                  tokens and right ones per completion over RL training; with several
                  alphas, the figures against alpha
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time

import jax
import numpy as np

from atlas_jax import config as config_lib
from atlas_jax import demo
from atlas_jax.config import VARIANTS
from atlas_jax.data import synthetic
from atlas_jax.rl import loop as rl_loop
from atlas_jax.rl import rewards as rewards_lib
from atlas_jax.run import plots
from atlas_jax.run.steps import StepCache
from atlas_jax.sft import loop as sft_loop

_ANCHORS = {"grpo": "pg", "la_grpo_pg": "pg", "la_grpo_nll_pos": "nll_pos"}
CORRECT = "functional_correct"  # the reward component registered while the ablation runs
# Reward components in the table: every registered reward except accuracy (its own column).
COMPONENTS = tuple(sorted(k for k in rewards_lib.REWARDS if k not in ("accuracy", CORRECT)))
# (key in the summary, table heading). Held-out evaluation (greedy), then figures of the RL
# rollouts (sampled): step 1 (still the SFT params), the last step, the whole run.
COLUMNS = (("accuracy", "accuracy"), ("reward", "reward"),
           *((k, k) for k in COMPONENTS),
           ("functional_per_completion", "func/compl"), ("functional_right_share", "func right"),
           ("train_functional_first", "train func@1"), ("train_functional_last", "train func@end"),
           ("train_right_share", "train right"),
           ("dilution_ratio_mean", "dilution mean"), ("dilution_ratio_final", "dilution final"))
_CURVES = ("dilution_ratio", "reward", "functional_per_completion", f"reward_{CORRECT}")


def correct_token_uses(completion: str, sample, cfg) -> float:
  """The reward component `functional_correct`: how often the completion uses the token its
  task needs (sample.expected_tokens; any functional token when it expects none)."""
  tokens = tuple(sample.expected_tokens or cfg.functional_tokens)
  return float(sum(completion.count(t) for t in tokens))


@contextlib.contextmanager
def counting_correct_tokens():
  """`functional_correct` registered as a reward component (weight 0) inside the block."""
  before = rewards_lib.REWARDS.get(CORRECT)
  rewards_lib.register(CORRECT)(correct_token_uses)
  try:
    yield
  finally:
    if before is None:
      del rewards_lib.REWARDS[CORRECT]
    else:
      rewards_lib.REWARDS[CORRECT] = before


def variant_settings(name: str, alpha: float) -> dict:
  """{"alpha", "anchor"} of a variant name (one of VARIANTS) at an LA-GRPO alpha."""
  if name not in VARIANTS:
    raise ValueError(f"config.ablate.variants has {name!r}; expected names from {VARIANTS}")
  return {"alpha": 0.0 if name == "grpo" else float(alpha), "anchor": _ANCHORS[name]}


def row_name(variant: str, alpha: float) -> str:
  return variant if variant == "grpo" else f"{variant}_a{alpha:g}"


def rows(c) -> dict[str, dict]:
  """{row name: {"variant", "alpha", "anchor"}}: grpo once, each LA-GRPO variant at every
  alpha in ablate.alphas, in config order."""
  out = {}
  for variant in c.ablate.variants:
    for alpha in (0.0,) if variant == "grpo" else c.ablate.alphas:
      out[row_name(variant, alpha)] = dict(variant=variant, **variant_settings(variant, alpha))
  return out


def run_dir(workdir: str, row: str, seed: int) -> str:
  return os.path.join(workdir, "rl", row, f"seed{seed}")


def suite_style(c) -> synthetic.SuiteStyle:
  s = c.ablate.suite
  return synthetic.SuiteStyle(token_rate=float(s.token_rate),
                              wrong_token_rate=float(s.wrong_token_rate),
                              filler_sentences=int(s.filler_sentences))


def with_suite(c, workdir: str):
  """c itself for the default suite style; otherwise a copy training on the suite written
  in ablate.suite's style under <workdir>/suite (sizes and seeds as the default suite's:
  data.synthetic_*; written once, again when those change)."""
  style = suite_style(c)
  if style.plain:
    return c
  out = os.path.join(workdir, "suite")
  spec = dict(style=vars(style), per_family=c.data.synthetic_per_family,
              test_per_family=c.data.synthetic_test_per_family, seed=c.data.synthetic_seed)
  paths = {split: os.path.join(out, f"{split}.jsonl") for split in ("train", "test")}
  if _read_json(os.path.join(out, "suite.json")) != spec or not all(
      map(os.path.isfile, paths.values())):
    for split, n, seed in (("train", spec["per_family"], spec["seed"]),
                           ("test", spec["test_per_family"], spec["seed"] + 1)):
      synthetic.generate_suite(out, n_per_family=n, seed=seed, split=split, style=style)
    _write_json(os.path.join(out, "suite.json"), spec)
  c = c.copy_and_resolve_references()
  with c.unlocked():
    c.data.train_jsonl, c.data.test_jsonl = paths["train"], paths["test"]
    c.data.format = "atlas"
  return c


def rl_run_config(c, workdir: str, row: dict, seed: int):
  """The RL stage config of one run: the demo's RL stage from <workdir>/sft, with the row's
  alpha and anchor and config.seed = seed."""
  s = demo.stage_config(c, "rl", workdir)
  with s.unlocked():
    s.seed = seed
    s.rl.alpha = row["alpha"]
    s.rl.anchor = row["anchor"]
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
              anchor=s.rl.anchor, suite=dict(s.ablate.suite), **extra)


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
  e = result["eval"]
  print(f"[ablate] SFT: held-out accuracy {e['accuracy']:.3f}, functional tokens per "
        f"completion {e['functional_per_completion']:.3f}, right ones "
        f"{e.get(CORRECT, math.nan):.3f} ({result['seconds']:.0f}s)", flush=True)
  _write_json(path, result)
  return result


def _curves(directory: str) -> dict:
  """{name: (steps, values)} of the RL series in `_CURVES` from a run's metrics.jsonl."""
  series = plots.read_metrics(os.path.join(directory, "metrics.jsonl"))
  return {k: list(series[f"rl/{k}"]) for k in _CURVES if f"rl/{k}" in series}


def _ratio(numerator: float, denominator: float) -> float:
  return numerator / denominator if denominator > 0 else math.nan


def run_figures(evaluation: dict, curves: dict) -> dict:
  """The table's figures of one RL run beyond its held-out evaluation: the right tokens'
  share of the functional tokens (held out; over the RL rollouts, all steps pooled),
  functional tokens per completion at step 1 and at the last step, and the dilution
  ratio's mean and last value."""
  func = curves.get("functional_per_completion", ([], []))[1]
  right = curves.get(f"reward_{CORRECT}", ([], []))[1]
  dilution = curves.get("dilution_ratio", ([], []))[1]
  last = lambda xs: float(xs[-1]) if xs else math.nan
  return {"functional_right_share": _ratio(evaluation.get(CORRECT, math.nan),
                                           evaluation.get("functional_per_completion", 0.0)),
          "train_functional_first": float(func[0]) if func else math.nan,
          "train_functional_last": last(func),
          "train_right_share": _ratio(float(np.sum(right)), float(np.sum(func))),
          "dilution_ratio_mean": float(np.mean(dilution)) if dilution else math.nan,
          "dilution_ratio_final": last(dilution)}


def _run_rl(c, workdir: str, name: str, row: dict, seed: int, label: str,
            cache: StepCache) -> dict:
  out = run_dir(workdir, name, seed)
  s = rl_run_config(c, workdir, row, seed)
  path = os.path.join(out, "result.json")
  settings = _settings(s, variant=row["variant"])
  done = _read_json(path)
  if done is not None:
    _check_same(path, done["settings"], settings)
    print(f"[ablate] {label}: finished earlier ({path}), skipped", flush=True)
    return done
  print(f"[ablate] {label}: RL {row['variant']} (alpha {s.rl.alpha:g}, anchor {s.rl.anchor}) "
        f"seed {seed}, {s.train.steps} steps -> {out}", flush=True)
  t0 = time.time()
  state, _, run = rl_loop.train_rl(s, out, cache=cache)
  evaluation = rl_loop.evaluate_held_out(run, state.params, c)
  curves = _curves(out)
  result = {"settings": settings, "eval": evaluation, "curves": curves,
            **run_figures(evaluation, curves), "seconds": time.time() - t0}
  print(f"[ablate] {label}: held-out accuracy {evaluation['accuracy']:.3f}, reward "
        f"{evaluation['reward']:.3f}, functional tokens per completion "
        f"{evaluation['functional_per_completion']:.3f} (sampled: "
        f"{result['train_functional_first']:.3f} -> {result['train_functional_last']:.3f}), "
        f"mean dilution ratio {result['dilution_ratio_mean']:.4g} ({result['seconds']:.0f}s)",
        flush=True)
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
  return run[key] if key in run else run["eval"].get(key, math.nan)


def summarize(runs: dict[str, list[dict]]) -> dict[str, dict[str, dict]]:
  """{row: {column key: {"mean", "std", "n"}}} from each row's run results."""
  return {v: {k: _mean_std([_value(r, k) for r in rs]) for k, _ in COLUMNS}
          for v, rs in runs.items()}


def sft_figures(sft_eval: dict, runs: dict[str, list[dict]]) -> dict[str, dict]:
  """The SFT start's row: its held-out evaluation, and the sampled figures of the RL runs'
  first step (taken from the SFT params; one value per seed)."""
  row = {k: _mean_std([sft_eval.get(k, math.nan)]) for k, _ in COLUMNS}
  row["functional_right_share"] = _mean_std([_ratio(
      sft_eval.get(CORRECT, math.nan), sft_eval.get("functional_per_completion", 0.0))])
  first = {}
  for rs in runs.values():
    for r in rs:
      steps, func = r["curves"].get("functional_per_completion", ([], []))
      _, right = r["curves"].get(f"reward_{CORRECT}", ([], []))
      if steps and steps[0] == 1 and right:
        first.setdefault(r["settings"]["seed"], (func[0], right[0]))
  row["train_functional_first"] = _mean_std([f for f, _ in first.values()])
  row["train_right_share"] = _mean_std([_ratio(sum(r for _, r in first.values()),
                                               sum(f for f, _ in first.values()))])
  return row


def ablation_table(summary: dict, sft_row: dict, settings: dict, wall: float) -> str:
  """The table: one row per variant and alpha (mean ± std across seeds), and the SFT start."""
  def fmt(c, n):
    if math.isnan(c["mean"]):
      return "n/a"
    return f"{c['mean']:.3f}±{c['std']:.3f}" + (f"({c['n']})" if 0 < c["n"] < n else "")

  head = f"{'variant':<22}{'alpha':>6}{'anchor':>9}{'seeds':>6}"
  lines = [head + "".join(f"{name:>15}" for _, name in COLUMNS)]
  for v, cols in summary.items():
    st = settings[v]
    n = max(c["n"] for c in cols.values())
    lines.append(f"{v:<22}{st['alpha']:>6g}{st['anchor']:>9}{n:>6}" + "".join(
        f"{fmt(cols[k], n):>15}" for k, _ in COLUMNS))
  n = max(c["n"] for c in sft_row.values())
  lines.append(f"{'sft (start)':<22}{'':>6}{'':>9}{n:>6}" + "".join(
      f"{fmt(sft_row[k], 1):>15}" for k, _ in COLUMNS))
  lines.append("")
  lines.append("held-out evaluation (greedy) after training: accuracy, reward, its components, "
               "functional tokens per completion (func/compl) and the share of them that is the "
               "token the task family needs (func right). RL rollouts (sampled, 8 per prompt): "
               "functional tokens per completion at step 1 (from the SFT params) and at the "
               "last step, the right share over all steps; dilution ratio (functional / other "
               "token rows' gradient norm): mean over steps, last step. mean ± sample std "
               "across seeds (the SFT row: across the seeds' step-1 rollouts); (k): only k seeds "
               "have a value (the others used no functional token).")
  lines.append(f"wall time of the runs (s): {wall:.1f}")
  return "\n".join(lines)


def _plot_alphas(fig, position, result: dict) -> None:
  """Held-out accuracy and functional tokens per completion (held out, and sampled at the
  last RL step) against alpha, per anchor swept (grpo at alpha 0)."""
  summary, settings = result["summary"], result["variants"]
  swept = sorted({s["variant"] for s in settings.values() if s["variant"] != "grpo"
                  and sum(t["variant"] == s["variant"] for t in settings.values()) > 1})
  if not swept:
    return
  ax = fig.add_subplot(*position)
  for variant in swept:
    names = ([n for n, s in settings.items() if s["variant"] == "grpo"]
             + sorted((n for n, s in settings.items() if s["variant"] == variant),
                      key=lambda n: settings[n]["alpha"]))
    alphas = [settings[n]["alpha"] for n in names]
    xs = range(len(names))
    for key, style in (("accuracy", "-o"), ("functional_per_completion", "--s"),
                       ("train_functional_last", ":^")):
      ax.errorbar(xs, [summary[n][key]["mean"] for n in names],
                  yerr=[summary[n][key]["std"] for n in names], fmt=style, capsize=3,
                  label=f"{_ANCHORS[variant]}: {key}")
    ax.set_xticks(list(xs), [f"{a:g}" for a in alphas])
  ax.set_xlabel("alpha (0: grpo)")
  ax.set_title("alpha sweep (mean ± std across seeds)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)


def plot_ablation(result: dict, path: str) -> str:
  """ablation.png: held-out accuracy and reward per row (bars, std whiskers, the SFT start
  dashed); dilution ratio, training reward, functional tokens and right ones per completion
  against RL step (mean across seeds, band from the lowest to the highest seed); with
  several alphas for an anchor, the figures against alpha."""
  from matplotlib.figure import Figure
  fig = Figure(figsize=(18, 9), dpi=100, layout="constrained")
  summary, sft_eval = result["summary"], result["sft"]["eval"]
  ax = fig.add_subplot(2, 3, 1)
  width = 0.38
  for j, (key, color) in enumerate((("accuracy", "tab:blue"), ("reward", "tab:orange"))):
    xs = [i + (j - 0.5) * width for i in range(len(summary))]
    bars = ax.bar(xs, [s[key]["mean"] for s in summary.values()], width,
                  yerr=[s[key]["std"] for s in summary.values()], capsize=3, color=color,
                  label=key)
    ax.bar_label(bars, fmt="%.3f", fontsize=7)
    ax.axhline(sft_eval.get(key, math.nan), color=color, linestyle="--", linewidth=1,
               label=f"{key}, SFT start")
  ax.set_xticks(range(len(summary)), list(summary), fontsize=7, rotation=20)
  ax.set_ylim(top=1.3 * max([s[k]["mean"] + s[k]["std"] for s in summary.values()
                             for k in ("accuracy", "reward")] + [0.1]))
  ax.set_title("held-out accuracy and reward (mean ± std across seeds)")
  ax.grid(axis="y", alpha=0.3)
  ax.legend(fontsize=7, ncol=2, loc="upper left")
  titles = {"dilution_ratio": "dilution ratio (functional / other row grad norm)",
            "reward": "training reward", "functional_per_completion":
            "functional tokens per completion (training, sampled)",
            f"reward_{CORRECT}": "right functional tokens per completion (training, sampled)"}
  for i, name in enumerate(_CURVES):
    ax = fig.add_subplot(2, 3, i + 2)
    for row, runs in result["runs"].items():
      curves = [r["curves"][name] for r in runs if name in r.get("curves", {})]
      if not curves:
        continue
      steps = sorted(set.intersection(*(set(c[0]) for c in curves)))
      if not steps:
        continue
      ys = np.asarray([[dict(zip(*c))[s] for s in steps] for c in curves])
      line, = ax.plot(steps, ys.mean(0), marker="." if len(steps) < 30 else None,
                      label=row, linewidth=1.2)
      ax.fill_between(steps, ys.min(0), ys.max(0), color=line.get_color(), alpha=0.15)
    if name == "dilution_ratio" and ax.lines and all(
        np.all(line.get_ydata() > 0) for line in ax.lines):
      ax.set_yscale("log")
    ax.set_title(titles[name])
    ax.set_xlabel("RL step")
    ax.grid(alpha=0.3)
    if ax.lines:
      ax.legend(fontsize=7)
  _plot_alphas(fig, (2, 3, 6), result)
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
  ablation.json holds: seeds, rows' settings (variants), sft (its run and its table row),
  runs {row: [per seed]}, summary, table, wall_seconds (this call) and run_seconds (sum over
  the runs, skipped ones too)."""
  config_lib.validate(c)
  t0 = time.time()
  cache = StepCache()  # every variant's runs share their steps
  os.makedirs(workdir, exist_ok=True)
  c = with_suite(c, workdir)
  seeds, settings = tuple(c.ablate.seeds), rows(c)
  with counting_correct_tokens():
    sft = _run_sft(c, workdir, cache)
    runs: dict[str, list[dict]] = {name: [] for name in settings}
    total = len(seeds) * len(settings)
    for i, seed in enumerate(seeds):
      for j, (name, row) in enumerate(settings.items()):
        label = f"run {i * len(settings) + j + 1}/{total}"
        runs[name].append(_run_rl(c, workdir, name, row, seed, label, cache))
  summary = summarize(runs)
  sft["row"] = sft_figures(sft["eval"], runs)
  run_seconds = sft["seconds"] + sum(r["seconds"] for rs in runs.values() for r in rs)
  table = ablation_table(summary, sft["row"], settings, run_seconds)
  print("\n" + table, flush=True)
  result = {"seeds": list(seeds), "variants": settings, "suite": dict(c.ablate.suite),
            "sft": sft, "runs": runs, "summary": summary, "columns": [k for k, _ in COLUMNS],
            "table": table, "run_seconds": run_seconds, "wall_seconds": time.time() - t0}
  _write_json(os.path.join(workdir, "ablation.json"), result)
  with open(os.path.join(workdir, "ablation.txt"), "w", encoding="utf-8") as f:
    f.write(table + "\n")
  try:
    plot_ablation(result, os.path.join(workdir, "ablation.png"))
  except Exception as e:  # noqa: BLE001  (a picture must never fail the ablation)
    print(f"[plots] ablation.png not drawn: {type(e).__name__}: {e}", flush=True)
  return result
