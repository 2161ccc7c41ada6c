"""Command-line plumbing shared by the scripts in experiments/: flag parsing and exit codes.

User errors (bad flags, config values, missing data) print one line on stderr and exit with code 2; a diverged
loss prints one line and exits with code 1. Never a traceback for user error.
"""
from __future__ import annotations

import sys
from typing import Callable

from absl import app, flags

from s2f_jax.errors import TrainingDiverged, UserError  # noqa: F401 (UserError re-exported for scripts)


def _fail(message: str, code: int) -> None:
  print(f'error: {" ".join(str(message).split())}', file=sys.stderr)
  sys.exit(code)


def _parse_flags(argv: list[str]) -> list[str]:
  try:
    return flags.FLAGS(argv)
  except (flags.Error, UserError, ValueError, TypeError, KeyError, AttributeError, OSError, SyntaxError) as e:
    _fail(e, 2)


def run_app(main: Callable[[list[str]], None]) -> None:
  """`absl.app.run(main)` with one-line errors: exit 2 for user errors, 1 for a diverged loss."""
  def guarded(argv):
    try:
      main(argv)
    except UserError as e:
      _fail(e, 2)
    except TrainingDiverged as e:
      _fail(e, 1)
  app.run(guarded, flags_parser=_parse_flags)
