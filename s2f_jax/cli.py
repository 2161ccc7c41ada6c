"""Command-line plumbing shared by the scripts in experiments/: flag parsing, exit codes and the studies' `main`.

User errors (bad flags, config values, missing data) print one line on stderr and exit with code 2; a diverged
loss prints one line and exits with code 1. Never a traceback for user error.
"""
from __future__ import annotations

import logging
import os
import runpy
import sys
import traceback
from typing import Callable

from absl import app, flags
from absl import logging as absl_logging

from s2f_jax import compile_cache
from s2f_jax.errors import TrainingDiverged, UserError  # noqa: F401 (UserError re-exported for scripts)


def _fail(message: str, code: int) -> None:
  print(f'error: {" ".join(str(message).split())}', file=sys.stderr)
  sys.exit(code)


_default_config: list[str] = []  # the default --config of define_config


def _parse_flags(argv: list[str]) -> list[str]:
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # noqa: BLE001 — sorted below; anything else is a bug and keeps its traceback
    bug = _config_file_bug(e, argv)
    if bug:
      _fail(bug, 2)
    if isinstance(e, (KeyError, AttributeError)):
      _fail(_unknown_override(argv) or e, 2)
    if isinstance(e, (flags.Error, UserError, ValueError, TypeError, OSError, SyntaxError)):
      _fail(e, 2)
    raise


def _config_flag(argv: list[str]) -> str | None:
  """The --config value ('FILE' or 'FILE:ARG') in `argv`, else define_config's default."""
  value = next((a.split('=', 1)[1] for a in argv[1:] if a.startswith('--config=')), None)
  return value or (_default_config[0] if _default_config else None)


def _config_file_bug(e: BaseException, argv: list[str]) -> str | None:
  """'config file FILE, line N: ErrorType: message' when `e` was raised while running the --config file (or a file
  beside it that it imports, such as configs/default.py), at the deepest such line; None otherwise."""
  value = _config_flag(argv)
  if not value:
    return None
  folder = os.path.join(os.path.dirname(os.path.abspath(value.partition(':')[0])), '')
  inside = lambda f: os.path.abspath(f).startswith(folder)
  if isinstance(e, SyntaxError) and e.filename and inside(e.filename):
    return f'config file {e.filename}, line {e.lineno}: SyntaxError: {e.msg}'
  frames = [f for f in traceback.extract_tb(e.__traceback__) if inside(f.filename)]
  if not frames:
    return None
  return f'config file {frames[-1].filename}, line {frames[-1].lineno}: {type(e).__name__}: {_last_line(e)}'


def _unknown_override(argv: list[str]) -> str | None:
  """'unknown config key …; valid keys: …' for the first `--config.KEY=VALUE` whose KEY the config file lacks, or
  None when there is none (or the config cannot be loaded here)."""
  try:
    file, _, arg = _config_flag(argv).partition(':')
    get_config = runpy.run_path(file)['get_config']
    config = get_config(arg) if arg else get_config()
  except Exception:  # noqa: BLE001 — fall back to the parser's own message
    return None
  for a in argv[1:]:
    if not a.startswith('--config.'):
      continue
    key = a[len('--config.'):].split('=', 1)[0]
    node, parts = config, key.split('.')
    for i, part in enumerate(parts):
      if not hasattr(node, 'keys'):
        return f'--config.{key}: {".".join(parts[:i])!r} is a value, not a group of keys'
      if part not in node:
        under = f' under {".".join(parts[:i])!r}' if i else ''
        return f'unknown config key {".".join(parts[:i + 1])!r} in --config.{key}; valid keys{under}: ' + \
            ', '.join(sorted(node.keys()))
      node = node[part]
  return None


def _last_line(e: BaseException) -> str:
  lines = [line.strip() for line in str(e).splitlines() if line.strip()]
  last = lines[-1] if lines else type(e).__name__
  while len(last) > 1 and last[0] == last[-1] and last[0] in '"\'':
    last = last[1:-1]
  return last


def define_config(default: str = 'configs/default.py') -> flags.FlagHolder:
  """`--config` (an ml_collections config file) with `--config.KEY=VALUE` overrides; a bad override key is
  reported (one line, exit 2) right away, because ml_collections inspects the command line here."""
  _default_config[:] = [default]
  try:
    from ml_collections import config_flags
    return config_flags.DEFINE_config_file('config', default, 'Config file (ml_collections).')
  except Exception as e:  # noqa: BLE001 — any failure here is a malformed command line
    _fail(_unknown_override(sys.argv) or f'bad --config override: unknown or malformed key {_last_line(e)!r}', 2)


def config_value(holder: flags.FlagHolder):
  """The loaded config, with its `compilation_cache_dir` (top level or under `base`, as a sweep's) applied to
  the persistent compilation cache; a config file that cannot be loaded is a UserError."""
  try:
    value = holder.value
    value.keys()  # ml_collections loads the file lazily and raises on first access
  except Exception as e:  # noqa: BLE001
    raise UserError(_config_file_bug(e, sys.argv) or
                    f'cannot load --config {flags.FLAGS["config"].config_filename!r}: {_last_line(e)}') from e
  cache = value.get('compilation_cache_dir', value.get('base', {}).get('compilation_cache_dir', compile_cache.AUTO))
  compile_cache.enable(cache)
  return value


def study_main(default: str, study: str | None = None,
               aliases: tuple[tuple[str, str, type, str], ...] = ()) -> Callable[[list[str]], None]:
  """Defines `--config` (default `default`), `--workdir` and the `aliases` and returns the `main` of a study script:
  the config (with `study` as its `experiment` when given: the per-study scripts), each alias given on the command
  line written into its config key, then `studies.run`, whose text it prints. aliases: (flag, dotted config key,
  int | str, help), plain flags kept for existing command lines."""
  from s2f_jax import studies
  holder = define_config(default)
  workdir = flags.DEFINE_string('workdir', None, "Output folder (default: the study's own, e.g. runs/<model>/<setup>/"
                                'seed<seed> for the benchmark).')
  define = {int: flags.DEFINE_integer, str: flags.DEFINE_string}
  alias_flags = [(define[kind](name, None, f'{help_text} (the same as --config.{key})'), key)
                 for name, key, kind, help_text in aliases]

  def main(argv):
    if len(argv) > 1:
      raise UserError(f'unexpected arguments {argv[1:]}; use --config.KEY=VALUE')
    config = config_value(holder)
    if study:
      config.experiment = study
    for flag, key in alias_flags:
      if flag.value is not None:
        *path, last = key.split('.')
        node = config
        for part in path:
          if part not in node:
            raise UserError(f'--{flag.name} sets config key {key}, which this config lacks')
          node = node[part]
        node[last] = flag.value
    print(studies.run(config, workdir.value))
  return main


def run_app(main: Callable[[list[str]], None]) -> None:
  """`absl.app.run(main)` with one-line errors: exit 2 for user errors, 1 for a diverged loss."""
  def guarded(argv):
    absl_logging.set_verbosity(absl_logging.WARNING)  # keep library chatter (orbax) out of the way
    log = logging.getLogger('s2f_jax')
    if not log.handlers:
      handler = logging.StreamHandler(sys.stderr)
      handler.setFormatter(logging.Formatter('%(message)s'))
      log.addHandler(handler)
      log.setLevel(logging.INFO)
      log.propagate = False
    compile_cache.enable()  # config_value moves it where the config says
    try:
      main(argv)
    except UserError as e:
      _fail(e, 2)
    except TrainingDiverged as e:
      _fail(e, 1)
  app.run(guarded, flags_parser=_parse_flags)
