"""Redraws a run's pictures from its files.

  python -m launch.plot /tmp/atlas_demo        # sft/curves.png, rl/curves.png, summary.png
  python -m launch.plot /tmp/eval_bench        # an evaluation's summary.png

curves.png wherever a metrics.jsonl is (the workdir and its sub-directories), summary.png
from a demo's or an evaluation's summary.json.
"""

import sys

from absl import app

from launch import cli


def main(argv):
  if len(argv) < 2:
    raise app.UsageError("usage: python -m launch.plot <workdir> [<workdir> ...]")
  from atlas_jax.run import plots
  drawn = []
  for workdir in argv[1:]:
    drawn += plots.redraw(workdir)
  if not drawn:
    sys.exit(f"nothing to draw in {' '.join(argv[1:])}: no metrics.jsonl or summary.json")
  print("\n".join(drawn))


if __name__ == "__main__":
  cli.run(main)
