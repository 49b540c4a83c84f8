"""Trains ATLAS: SFT or LA-GRPO, as the config's `recipe` says.

  python -m launch.train --config=configs/sft.py:tiny --workdir=/tmp/atlas_sft
  python -m launch.train --config=configs/sft.py:tiny --workdir=/tmp/atlas_sft \
      --config.train.steps=20 --config.optim.lr=1e-3

Overrides are checked against the config (a typo in a field name stops the launch);
the workdir resumes by itself from its latest checkpoint.
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from launch import cli

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Recipe config file (configs/*.py[:arg]).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the dataset.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  c = FLAGS.config
  from atlas_jax import config as config_lib
  config_lib.validate(c)
  if os.path.exists(FLAGS.workdir) and not os.path.isdir(FLAGS.workdir):
    raise NotADirectoryError(f"--workdir {FLAGS.workdir} is a file, not a directory")
  if c.recipe == "sft":
    from atlas_jax.sft.loop import train_sft
    train_sft(c, FLAGS.workdir)
  elif c.recipe == "rl":
    from atlas_jax.rl.loop import train_rl
    train_rl(c, FLAGS.workdir)
  elif c.recipe == "demo":
    from atlas_jax.demo import DidNotLearn, run_demo
    try:
      run_demo(c, FLAGS.workdir)
    except DidNotLearn as e:
      sys.exit(str(e))  # one line on stderr, exit status 1
  else:
    raise app.UsageError(f"config.recipe {c.recipe!r} is not 'sft', 'rl' or 'demo'")


if __name__ == "__main__":
  cli.run(main)
