"""Metrics a person can read: a console line, JSONL and TensorBoard, written by process 0."""

from __future__ import annotations

import json
import os
import time

import jax
import numpy as np


def _scalar(v) -> float:
  return float(np.asarray(v))


class MetricWriter:
  """Writes `{prefix}/{name}` scalars to <workdir>/metrics.jsonl and <workdir>/tensorboard,
  and prints one line per call. Only process 0 writes; other processes ignore calls."""

  def __init__(self, workdir: str, total_steps: int | None = None):
    self.active = jax.process_index() == 0
    self.total_steps = total_steps
    self._start = time.time()
    self._jsonl = None
    self._tb = None
    if self.active:
      os.makedirs(workdir, exist_ok=True)
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, metrics: dict, prefix: str = "train", console: bool = True):
    if not self.active:
      return
    values = {k: _scalar(v) for k, v in metrics.items()}
    self._jsonl.write(json.dumps({"step": int(step), "prefix": prefix, "time": time.time(),
                                  **values}) + "\n")
    self._jsonl.flush()
    for k, v in values.items():
      self._tb.add_scalar(f"{prefix}/{k}", v, int(step))
    if console:
      print(self.format_line(step, values, prefix), flush=True)

  def format_line(self, step: int, values: dict, prefix: str) -> str:
    elapsed = time.time() - self._start
    head = f"[{prefix}] step {step}"
    if self.total_steps:
      head += f"/{self.total_steps}"
      if step > 0:
        eta = elapsed / step * max(self.total_steps - step, 0)
        head += f" ({elapsed:.0f}s, eta {eta:.0f}s)"
    body = " ".join(f"{k}={v:.4g}" for k, v in sorted(values.items()))
    return f"{head} {body}"

  def text(self, step: int, name: str, text: str, console: bool = True):
    """Free text (e.g. the skipped-record report) to TensorBoard, JSONL and the console."""
    if not self.active:
      return
    self._jsonl.write(json.dumps({"step": int(step), "text": name, "value": text}) + "\n")
    self._jsonl.flush()
    self._tb.add_text(name, text, int(step))
    if console:
      print(f"[{name}] {text}", flush=True)

  def close(self):
    if self.active:
      self._jsonl.close()
      self._tb.close()
