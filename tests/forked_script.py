"""Runs one experiment script with many command lines, each in a child forked from one warm interpreter.

  python tests/forked_script.py SCRIPT < {"case": [ARG, ...], ...}  →  {"case": [exit code, stdout, stderr], ...}

A child runs SCRIPT as `__main__` with `sys.argv = [SCRIPT, *ARGS]` from a copy of this process, which has
imported s2f_jax (about 3 s per process) but started no XLA backend, so forking is safe. The child's exit code,
stdout and stderr are what a fresh `python SCRIPT ARGS` process would give: exceptions that escape print their
traceback and exit 1, `SystemExit` exits with its code. The CLI tests use it for their long tables of bad inputs.
"""
import importlib
import json
import os
import runpy
import sys
import tempfile
import traceback

for _module in ('s2f_jax.cli', 's2f_jax.experiment'):  # the slow imports, done once before forking
  importlib.import_module(_module)


def _child(script: str, args: list[str]) -> int:
  sys.argv = [script, *args]
  try:
    runpy.run_path(script, run_name='__main__')
    return 0
  except SystemExit as e:
    if e.code is None or isinstance(e.code, int):
      return e.code or 0
    print(e.code, file=sys.stderr)
    return 1
  except BaseException:  # noqa: BLE001 — as the interpreter does
    traceback.print_exc()
    return 1


def run(script: str, argv: list[str]) -> tuple[int, str, str]:
  with tempfile.TemporaryFile('w+') as out, tempfile.TemporaryFile('w+') as err:
    pid = os.fork()
    if pid == 0:
      os.dup2(out.fileno(), 1)
      os.dup2(err.fileno(), 2)
      code = _child(script, argv)
      sys.stdout.flush()
      sys.stderr.flush()
      os._exit(code)
    _, status = os.waitpid(pid, 0)
    out.seek(0)
    err.seek(0)
    return os.waitstatus_to_exitcode(status), out.read(), err.read()


if __name__ == '__main__':
  cases = json.load(sys.stdin)
  json.dump({name: run(sys.argv[1], argv) for name, argv in cases.items()}, sys.stdout)
