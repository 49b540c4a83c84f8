"""GRPO against LA-GRPO: one SFT run, then RL runs per variant and seed (configs/ablate.py).

  python -m launch.ablate --workdir=/tmp/atlas_ablate
  python -m launch.ablate --workdir=/tmp/atlas_ablate --config.demo.rl.steps=20
  python -m launch.ablate --config=configs/ablate.py:sparse --workdir=/tmp/atlas_sparse
  python -m launch.ablate --config=configs/ablate.py:sparse_sweep --workdir=/tmp/atlas_sparse

Writes <workdir>/ablation.{json,txt,png}; a rerun of the same command skips finished runs.
"""

import os

from absl import app, flags, logging
from ml_collections import config_flags

from launch import cli

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(__file__), "..", "configs", "ablate.py"),
    "Ablation config file (configs/ablate.py[:dense|sparse|sparse_sweep]).", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for the runs and the ablation's results.")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from atlas_jax import ablate
  ablate.use_compilation_cache(FLAGS.workdir)
  ablate.run_ablation(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
  cli.run(main)
