"""Pictures of a run, drawn with matplotlib's Agg canvas (no display, no pyplot state).

  curves.png   from <workdir>/metrics.jsonl, against step: loss, reward and its components,
               accuracy, functional tokens per completion, learning rate, throughput (one
               panel each, one line per logged series; panels with no series are left out)
  summary.png  the demo's accuracy and reward per stage, and accuracy per task family
               (`plot_demo`), or a benchmark's accuracy per category (`plot_benchmark`)

`refresh(workdir)` redraws curves.png at most every `min_interval` seconds (the trainers
call it at each log, forced at the end); drawing never stops a run: a failure is printed
once and the run goes on. `redraw(workdir)` redraws every picture a workdir's files allow.
"""

from __future__ import annotations

import json
import math
import os
import time

_PANELS = (
    ("loss", lambda p, n: n == "loss" or n.endswith("_loss")),
    ("reward", lambda p, n: n == "reward" or n.startswith("reward_")),
    ("accuracy", lambda p, n: ("accuracy" in n and "/" not in n
                               and not n.startswith("reward_"))
     or n in ("category_mean", "subtask_mean") or n.startswith("pass@")),
    ("functional tokens per completion",
     lambda p, n: n in ("functional_per_completion", "functional_per_answer")),
    ("learning rate", lambda p, n: n in ("learning_rate", "lr")),
    ("throughput (per s)", lambda p, n: n.endswith("_per_s")),
)
_last_draw: dict[str, float] = {}
_warned = set()


def _figure(width: float, height: float):
  from matplotlib.figure import Figure
  return Figure(figsize=(width, height), dpi=100, layout="constrained")


def read_metrics(path: str) -> dict[str, tuple[list[int], list[float]]]:
  """{"prefix/name": (steps, values)} from a metrics.jsonl, steps ascending; a step logged
  twice (a resumed run) keeps its last value. Unreadable lines are skipped."""
  series: dict[str, dict[int, float]] = {}
  if not os.path.isfile(path):
    return {}
  with open(path, encoding="utf-8", errors="replace") as f:
    for line in f:
      try:
        row = json.loads(line)
      except json.JSONDecodeError:
        continue
      if not isinstance(row, dict) or "prefix" not in row or "step" not in row:
        continue
      for k, v in row.items():
        if k in ("step", "prefix", "time") or not isinstance(v, (int, float)):
          continue
        series.setdefault(f"{row['prefix']}/{k}", {})[int(row["step"])] = float(v)
  return {k: (sorted(d), [d[s] for s in sorted(d)]) for k, d in sorted(series.items())}


def plot_curves(workdir: str, path: str | None = None) -> str | None:
  """Draws <workdir>/curves.png (or `path`) from <workdir>/metrics.jsonl; returns the path,
  or None when there is nothing to draw."""
  series = read_metrics(os.path.join(workdir, "metrics.jsonl"))
  panels = []
  for title, wanted in _PANELS:
    lines = {k: v for k, v in series.items() if wanted(*k.split("/", 1))}
    if lines:
      panels.append((title, lines))
  if not panels:
    return None
  cols = min(3, len(panels))
  rows = math.ceil(len(panels) / cols)
  fig = _figure(5.0 * cols, 3.4 * rows)
  for i, (title, lines) in enumerate(panels):
    ax = fig.add_subplot(rows, cols, i + 1)
    for name, (steps, values) in lines.items():
      ax.plot(steps, values, marker="." if len(steps) < 30 else None, label=name,
              linewidth=1.2)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
  fig.suptitle(os.path.basename(os.path.abspath(workdir)))
  path = path or os.path.join(workdir, "curves.png")
  fig.savefig(path)
  return path


def refresh(workdir: str, *, force: bool = False, min_interval: float = 10.0) -> None:
  """Redraws curves.png on process 0, at most every `min_interval` s unless forced; a
  drawing failure is printed once and ignored."""
  import jax
  if jax.process_index() != 0:
    return
  now = time.monotonic()
  if not force and now - _last_draw.get(workdir, -math.inf) < min_interval:
    return
  _last_draw[workdir] = now
  try:
    plot_curves(workdir)
  except Exception as e:  # noqa: BLE001  (a picture must never end a run)
    if workdir not in _warned:
      _warned.add(workdir)
      print(f"[plots] curves.png not drawn: {type(e).__name__}: {e}", flush=True)


def _bars(ax, groups: dict[str, dict[str, float]], title: str, ylabel: str):
  """Grouped bars: groups {x label: {series: value}}."""
  names = list(dict.fromkeys(s for g in groups.values() for s in g))
  width = 0.8 / max(len(names), 1)
  for j, name in enumerate(names):
    xs = [i + (j - (len(names) - 1) / 2) * width for i in range(len(groups))]
    ys = [g.get(name, float("nan")) for g in groups.values()]
    bars = ax.bar(xs, ys, width, label=name)
    ax.bar_label(bars, fmt="%.2f", fontsize=7)
  ax.set_xticks(range(len(groups)), list(groups), rotation=20, ha="right", fontsize=8)
  ax.set_title(title)
  ax.set_ylabel(ylabel)
  ax.grid(axis="y", alpha=0.3)
  if len(names) > 1:
    ax.legend(fontsize=7)


def plot_demo(result: dict, path: str) -> str:
  """The demo summary: accuracy and reward per stage; accuracy per task family per stage.
  `result` is what `demo.run_demo` returns (or its summary.json)."""
  rows = result["evaluations"]
  fig = _figure(12, 4)
  _bars(fig.add_subplot(1, 2, 1),
        {stage: {k: r[k] for k in ("accuracy", "reward") if k in r} for stage, r in rows.items()},
        "held-out accuracy and reward per stage", "value")
  families = sorted({k.split("/", 1)[1] for r in rows.values() for k in r
                     if k.startswith("accuracy/")})
  _bars(fig.add_subplot(1, 2, 2),
        {f: {stage: r.get(f"accuracy/{f}", float("nan")) for stage, r in rows.items()}
         for f in families}, "accuracy per task family", "accuracy")
  fig.savefig(path)
  return path


def plot_benchmark(summary: dict, path: str) -> str:
  """A benchmark evaluation: accuracy per category (and per l2-category when present)."""
  tables = [("category", summary.get("per_category") or {}),
            ("l2-category", summary.get("per_l2_category") or {})]
  tables = [(t, g) for t, g in tables if g] or [("all", {"all": {
      "accuracy": summary.get("accuracy", float("nan")), "rows": summary.get("rows", 0)}})]
  height = max(2.5, 0.3 * max(len(g) for _, g in tables) + 1.5)
  fig = _figure(6.5 * len(tables), height)
  for i, (title, groups) in enumerate(tables):
    ax = fig.add_subplot(1, len(tables), i + 1)
    names = list(groups)
    values = [groups[n]["accuracy"] for n in names]
    bars = ax.barh(range(len(names)), values, color="tab:blue")
    ax.bar_label(bars, labels=[f"{v:.2f} ({groups[n]['rows']})" for n, v in
                               zip(names, values)], fontsize=7, padding=2)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.invert_yaxis()
    ax.axvline(summary.get("accuracy", float("nan")), color="k", linestyle="--",
               linewidth=1, label="overall")
    ax.set_xlim(0, 1.15)
    ax.set_xlabel("accuracy")
    ax.set_title(f"per {title}")
    ax.legend(fontsize=7, loc="lower right")
  fig.suptitle(f"accuracy {summary.get('accuracy', float('nan')):.3f} over "
               f"{summary.get('rows', 0)} rows; extraction failures "
               f"{summary.get('extraction_failures', 0)}")
  fig.savefig(path)
  return path


def redraw(workdir: str) -> list[str]:
  """Every picture `workdir`'s files allow: curves.png where a metrics.jsonl is (the
  workdir and its sub-directories, e.g. the demo's sft/ and rl/), summary.png from a demo's
  or an evaluation's summary.json. Returns the paths drawn."""
  if not os.path.isdir(workdir):
    raise FileNotFoundError(f"workdir {workdir} does not exist")
  drawn = []
  for root, dirs, files in os.walk(workdir):
    dirs[:] = sorted(d for d in dirs if d not in ("checkpoints", "tensorboard", "data",
                                                    "tokenizer", "base_tokenizer"))
    if "metrics.jsonl" in files:
      path = plot_curves(root)
      if path:
        drawn.append(path)
    if "summary.json" in files:
      with open(os.path.join(root, "summary.json"), encoding="utf-8") as f:
        summary = json.load(f)
      out = os.path.join(root, "summary.png")
      if "evaluations" in summary:
        drawn.append(plot_demo(summary, out))
      elif "per_category" in summary:
        drawn.append(plot_benchmark(summary, out))
  return drawn
