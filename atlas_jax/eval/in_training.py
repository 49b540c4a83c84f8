"""config.eval inside the SFT and RL loops: the benchmark evaluator every `eval.every` steps
and at the last step of the job, its metrics logged under the `eval` prefix, its files under
<workdir>/eval/step_<N>/, and (with `eval.keep_best`) the best checkpoint kept.

The best checkpoint is a full training checkpoint (params, optimizer state, metadata) in
<workdir>/best, with <workdir>/best.json naming its step and metric value; a resumed run
reads best.json and keeps comparing against it. `launch.evaluate --checkpoint=<workdir>/best`
scores it, and `model.init_checkpoint=<workdir>/best` starts RL from it.
"""

from __future__ import annotations

import json
import os

import jax

from atlas_jax import checkpoint as checkpoint_lib
from atlas_jax.eval import benchmarks, evaluator, report
from atlas_jax.run import setup

class TrainingEval:
  """Built once before training (`create`); `maybe_run` after each step."""

  def __init__(self, c, items, skipped):
    self.config, self.items, self.skipped = c, items, skipped
    self.settings = evaluator.Settings.from_config(c)
    self.best = None  # {"step", "metric", "value"} once known

  @classmethod
  def create(cls, c) -> TrainingEval | None:
    """None when config.eval.data is empty; reads the benchmark file (so a bad one stops
    the run before it starts)."""
    if "eval" not in c or not c.eval.data:
      return None
    items, skipped = benchmarks.read(c.eval.data, format=c.eval.format,
                                     image_root=c.data.image_root, max_rows=c.eval.max_rows,
                                     allowed_tokens=tuple(c.functional_tokens.tokens))
    if not items:
      raise ValueError(f"config.eval.data {c.eval.data!r} has no usable rows (skipped: "
                       f"{dict(skipped)})")
    return cls(c, items, skipped)

  def due(self, step: int, end: int, stride: int = 1) -> bool:
    every = self.config.eval.every
    return step >= end or bool(every and step % every < stride)

  def maybe_run(self, run, state, step: int, end: int, *, stride: int = 1) -> dict | None:
    """Evaluates `state.params` when `step` is due (every `eval.every` steps, counting
    `stride` steps per call, and at `end`); logs and returns the metrics."""
    if not self.due(step, end, stride):
      return None
    out = os.path.join(run.workdir, "eval", f"step_{step:06d}")
    summary = evaluator.evaluate(run, state.params, self.items, self.settings,
                                 output_dir=out, skipped=self.skipped, progress=False,
                                 plot=False, info={"step": step, "data": self.config.eval.data})
    metrics = report.flat_metrics(summary)
    run.writer.write(step, metrics, prefix="eval")
    if self.config.eval.keep_best:
      self._keep_best(run, state, step, metrics)
    return metrics

  def _keep_best(self, run, state, step: int, metrics: dict) -> None:
    key = self.config.eval.keep_best
    name, sign = key.lstrip("-"), -1.0 if key.startswith("-") else 1.0
    if name not in metrics:
      return
    record = os.path.join(run.workdir, "best.json")
    if self.best is None and os.path.isfile(record):
      with open(record) as f:
        self.best = json.load(f)
    value = metrics[name]
    if self.best is not None and self.best.get("metric") == name and \
        not sign * value > sign * self.best["value"]:
      return
    directory = os.path.join(run.workdir, "best")
    with checkpoint_lib.Checkpointer(directory, save_every=1, keep=1,
                                     async_save=False) as ckpt:
      ckpt.save(step, state, extra=setup.checkpoint_extra(run), force=True)
    self.best = {"step": step, "metric": name, "value": value}
    if jax.process_index() == 0:
      with open(record + ".tmp", "w") as f:
        json.dump(self.best, f)
      os.replace(record + ".tmp", record)
    run.writer.text(step, "best_checkpoint", f"{name}={value:.4g} at step {step} -> "
                    f"{directory}")
