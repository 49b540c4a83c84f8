"""How every launcher starts and ends: `run(main)` is `absl.app.run(main)` where a user's
mistake (a bad or misspelt config field, a missing file or directory, a data file that
yields nothing, a damaged checkpoint) ends the command with one line on stderr and exit
status 2 instead of a traceback. `--verbose_errors` brings the traceback back.
"""

import re
import sys

from absl import app

VERBOSE = "--verbose_errors"
# What the library raises for a user's input: its errors name the field, file or value.
USER_ERRORS = (ValueError, OSError, AttributeError, KeyError)
_MISSPELT = re.compile(r"(\w+)'\s*(?:Did you mean \"(\w+)\")?")


def one_line(error: BaseException) -> str:
  """The error as one line: a misspelt config override becomes 'config has no field ...'."""
  text = str(error).replace("\\n", "\n").replace("\\'", "'").strip()
  if isinstance(error, (AttributeError, KeyError)):
    m = _MISSPELT.match(text.strip("\"").lstrip("'"))
    if m:
      hint = f"; did you mean {m.group(2)!r}?" if m.group(2) else ""
      return f"the config has no field {m.group(1)!r}{hint} (check the --config.* overrides)"
  return " ".join(text.strip("'\"").split()) or type(error).__name__


def run(main, flags_parser=None) -> None:
  """`app.run(main)` (with `flags_parser` if given); a user error ends with one line and
  exit status 2."""
  verbose = VERBOSE in sys.argv
  argv = [a for a in sys.argv if a != VERBOSE]
  try:
    if flags_parser is None:
      app.run(main, argv=argv)
    else:
      app.run(main, argv=argv, flags_parser=flags_parser)
  except USER_ERRORS as e:
    if verbose:
      raise
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    name = spec.name if spec else argv[0].rsplit("/", 1)[-1]
    print(f"{name}: {one_line(e)} ({VERBOSE} shows the traceback)", file=sys.stderr)
    sys.exit(2)
