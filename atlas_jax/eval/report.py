"""What an evaluation reports, and the files it writes.

  summary.json       accuracy overall (the mean over every completion; with k samples also
                     pass@k, the share of rows with a correct one), per category and per
                     l2-category (rows, correct, accuracy, extraction failures), the mean of
                     the category accuracies (category_mean) and of named subtasks
                     (subtask_mean, as ATLAS reports BLINK), extraction failures, functional
                     tokens per answer (each token and in all), the share of answers using
                     one, mean length in tokens, rows skipped by reason
  predictions.jsonl  one line per row: id, category, l2_category, answer (gold), prompt,
                     completion, extracted, method, correct, length (with k samples,
                     completion ... length are lists of k, and pass_at_k is added)
  summary.png        accuracy per category (and per l2-category) as bars
"""

from __future__ import annotations

import json
import os

import numpy as np

from atlas_jax.run import plots

# ATLAS's BLINK score: the mean over these subtasks (VLMEvalKit's / the HF dataset's names).
BLINK_ATLAS = ("Art_Style", "Counting", "Forensic_Detection", "IQ_Test", "Jigsaw",
               "Multi-view_Reasoning", "Spatial_Relation")
SUBTASK_PRESETS = {"blink_atlas": BLINK_ATLAS}


def _key(name: str) -> str:
  return "".join(ch for ch in name.lower() if ch.isalnum())


def resolve_subtasks(names) -> tuple[str, ...]:
  """A preset name ("blink_atlas") or category names."""
  names = tuple(names)
  if len(names) == 1 and names[0] in SUBTASK_PRESETS:
    return SUBTASK_PRESETS[names[0]]
  return names


def _groups(rows: list[dict], field: str) -> dict:
  out = {}
  for r in rows:
    name = r[field]
    if not name:
      continue
    g = out.setdefault(name, {"rows": 0, "correct": 0, "completions": 0,
                              "extraction_failures": 0})
    g["rows"] += 1
    g["correct"] += sum(r["correct"])
    g["completions"] += len(r["correct"])
    g["extraction_failures"] += sum(e is None for e in r["extracted"])
  for g in out.values():
    g["accuracy"] = g["correct"] / g["completions"]
  return dict(sorted(out.items()))


def summarize(rows: list[dict], *, samples: int, subtasks=(), functional_tokens=(),
              skipped=None) -> dict:
  """The summary of scored rows (`evaluator._scored_row`), the same on every process."""
  correct = np.asarray([c for r in rows for c in r["correct"]], np.float64)
  failures = sum(e is None for r in rows for e in r["extracted"])
  n = max(correct.size, 1)
  per_category = _groups(rows, "category")
  out = {"rows": len(rows), "samples": samples, "completions": int(correct.size),
         "accuracy": float(correct.mean()) if correct.size else float("nan"),
         "correct": int(correct.sum()), "extraction_failures": failures,
         "extraction_failure_rate": failures / n}
  if samples > 1:
    out[f"pass@{samples}"] = float(np.mean([any(r["correct"]) for r in rows])) if rows \
        else float("nan")
  out["per_category"] = per_category
  out["per_l2_category"] = _groups(rows, "l2_category")
  if per_category:
    out["category_mean"] = float(np.mean([g["accuracy"] for g in per_category.values()]))
  subtasks = resolve_subtasks(subtasks)
  if subtasks:
    by_key = {_key(k): g for k, g in per_category.items()}
    found = [s for s in subtasks if _key(s) in by_key]
    out["subtasks"] = found
    out["subtasks_missing"] = [s for s in subtasks if _key(s) not in by_key]
    if found:
      out["subtask_mean"] = float(np.mean([by_key[_key(s)]["accuracy"] for s in found]))
  funcs = [f for r in rows for f in r["functional"]]
  per_token = {t: sum(f.get(t, 0) for f in funcs) / n for t in functional_tokens}
  out["functional_tokens_per_answer"] = dict(per_token, total=sum(per_token.values()))
  out["answers_with_functional_tokens"] = sum(bool(f) for f in funcs) / n
  out["mean_length"] = float(np.mean([x for r in rows for x in r["lengths"]])) if rows \
      else float("nan")
  out["skipped"] = dict(skipped or {})
  return out


def flat_metrics(summary: dict) -> dict:
  """The scalars worth logging during training: accuracy, pass@k, category and subtask
  means, extraction failure rate, functional tokens per answer, mean length, and
  accuracy/<category>."""
  keys = ("accuracy", "category_mean", "subtask_mean", "extraction_failure_rate",
          "answers_with_functional_tokens", "mean_length", "rows")
  out = {k: float(summary[k]) for k in keys if k in summary}
  out.update({k: float(v) for k, v in summary.items() if k.startswith("pass@")})
  out["functional_per_answer"] = float(summary["functional_tokens_per_answer"]["total"])
  for name, g in summary["per_category"].items():
    out[f"accuracy/{name}"] = float(g["accuracy"])
  return out


def prediction_lines(rows: list[dict], samples: int):
  for r in rows:
    line = {"id": r["id"], "category": r["category"], "l2_category": r["l2_category"],
            "answer": r["answer"], "prompt": r["prompt"]}
    fields = {"completion": r["completions"], "extracted": r["extracted"],
              "method": r["method"], "correct": r["correct"], "length": r["lengths"]}
    if samples == 1:
      line.update({k: v[0] for k, v in fields.items()})
    else:
      line.update(fields, pass_at_k=any(r["correct"]))
    yield line


def write(output_dir: str, rows: list[dict], summary: dict, *, plot: bool = True) -> None:
  """predictions.jsonl, summary.json and (with `plot`) summary.png under `output_dir`."""
  os.makedirs(output_dir, exist_ok=True)
  with open(os.path.join(output_dir, "predictions.jsonl"), "w", encoding="utf-8") as f:
    for line in prediction_lines(rows, summary["samples"]):
      f.write(json.dumps(line, ensure_ascii=False) + "\n")
  with open(os.path.join(output_dir, "summary.json"), "w", encoding="utf-8") as f:
    json.dump(summary, f, indent=2, ensure_ascii=False)
  if plot:
    plots.plot_benchmark(summary, os.path.join(output_dir, "summary.png"))
