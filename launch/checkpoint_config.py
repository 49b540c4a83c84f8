"""The config launch.evaluate and launch.attention_maps run with: the checkpoint's
(`atlas_jax.eval.load.config_for`), changed by `--config.<group>.<field>=<value>`
overrides that ml_collections checks against it (a misspelt field or a value of the wrong
type stops the launch), e.g. --config.data.max_length=8192 --config.rl.temperature=0.7.

The config comes from --checkpoint, so the overrides cannot be absl flags declared at
import: `parse_flags` (the launchers' `flags_parser`) parses the launcher's own flags and
leaves every --config.* argument to `load`.
"""

import sys

from absl import app, flags
from ml_collections import config_flags

from atlas_jax.config import base_config
from atlas_jax.eval import load as load_lib
from launch import cli

FLAGS = flags.FLAGS
# A saved run's values of these fields describe that run's own benchmark, not the file
# given to the launcher: they start at their defaults (as launch.evaluate's flags did).
BENCHMARK_FIELDS = ("eval.format", "eval.prompt", "eval.max_rows", "eval.subtasks",
                    "data.image_root")


def parse_flags(argv: list[str]) -> list[str]:
  """absl.app.run's flags_parser: the launcher's flags; returns argv without them. A bad or
  missing flag exits as absl's own parser does."""
  try:
    return FLAGS(argv, known_only=True)
  except flags.Error as error:
    sys.stderr.write(f"FATAL Flags parsing error: {error}\n  Pass --helpshort or --helpfull "
                     "to see help on flags.\n")
    sys.exit(1)


def load(checkpoint: str, argv: list[str], *, tokenizer: str = "",
         aliases: dict | None = None):
  """(config, {overridden field: value}): the config of `checkpoint` with BENCHMARK_FIELDS
  at their defaults, then argv's --config.* overrides and `aliases` ({field: value} from
  the launcher's own flags that set a config field; None values are unset) applied.
  Another argument in argv, or a field set twice, is a usage error."""
  c = load_lib.config_for(checkpoint, tokenizer=tokenizer)
  defaults = base_config()
  for field in BENCHMARK_FIELDS:
    group, name = field.split(".")
    c[group][name] = defaults[group][name]
  values = flags.FlagValues()
  try:
    config_flags.DEFINE_config_dict("config", c, flag_values=values, sys_argv=argv)
    rest = values(argv)
  except flags.Error as error:  # an unknown flag or a bad value
    raise app.UsageError(str(error)) from error
  except (AttributeError, KeyError) as error:  # a field the config lacks
    raise app.UsageError(cli.one_line(error)) from error
  if len(rest) > 1:
    raise app.UsageError(f"unexpected arguments: {rest[1:]}")
  overridden = dict(values["config"].override_values)
  for field, value in (aliases or {}).items():
    if value is None:
      continue
    if field in overridden:
      raise app.UsageError(f"config.{field} is set twice (by --config.{field} and its alias)")
    group, name = field.split(".")
    c[group][name] = tuple(value) if isinstance(value, list) else value
    overridden[field] = c[group][name]
  return c, overridden
