"""A fork server for the tests' command lines: each request runs one experiment script in a child forked from this
warm interpreter, which has imported s2f_jax (about 4 s per fresh process, more beside the other test worker) but
started no XLA backend, so forking is safe.

  python tests/forked_script.py   # stdin: one JSON request per line {"commands": [[SCRIPT, ARG, ...], ...],
                                  #   "env", "cwd", "timeout", "kill_when"}; the commands of a request run at the
                                  #   same time
                                  # stdout: one JSON line per request [[exit code, stdout, stderr], ...] (code None:
                                  #   timeout)

A child runs SCRIPT as `__main__` with `sys.argv = [SCRIPT, *ARGS]`, the request's environment and folder. Its exit
code, stdout and stderr are what a fresh `python SCRIPT ARGS` process gives: exceptions that escape print their
traceback and exit 1, `SystemExit` exits with its code, exit handlers run. Settings JAX reads when it is imported
(JAX_PLATFORMS, JAX_ENABLE_X64) come from the server's environment; XLA_FLAGS and everything else from the request.
"""
import atexit
import glob
import importlib
import json
import os
import runpy
import sys
import tempfile
import time
import traceback

# The slow imports, done once before forking (every study's runner and the other scripts' modules).
for _module in ('s2f_jax.cli', 's2f_jax.experiment', 's2f_jax.studies', 's2f_jax.sweep', 's2f_jax.visualize',
                's2f_jax.generalization', 's2f_jax.robust_fine_tune', 's2f_jax.stitching.layer_pairs',
                's2f_jax.transfer.pairs', 's2f_jax.patching.experiment', 'matplotlib.pyplot',
                'sklearn.datasets'):  # the digits loader, imported lazily
  importlib.import_module(_module)
importlib.import_module('s2f_jax.results.tensorboard').summary_writer_class()  # the event files' writer, as runs do


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


def run(commands: list[list[str]], env: dict[str, str] | None = None, cwd: str | None = None,
        timeout: float | None = None, kill_when: str | None = None) -> list[tuple[int | None, str, str]]:
  """[(exit code, stdout, stderr)] of every command [SCRIPT, *ARGS], each in a forked child, all at once (e.g.
  the processes of one multi-process run); exit code None for a child that ran past `timeout` s (killed).
  kill_when: a glob pattern; once a path matches it, every child still running is SIGKILLed (exit code -9), as a
  machine failure would stop them (e.g. right after a checkpoint is written)."""
  children = []
  for script, *args in commands:
    out, err = tempfile.TemporaryFile('w+'), tempfile.TemporaryFile('w+')
    pid = os.fork()
    if pid == 0:
      os.dup2(out.fileno(), 1)
      os.dup2(err.fileno(), 2)
      if env is not None:
        os.environ.clear()
        os.environ.update(env)
      if cwd:
        os.chdir(cwd)
      code = _child(script, args)
      try:
        atexit._run_exitfuncs()  # noqa: SLF001 — what interpreter exit does before os._exit skips it
      finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    children.append((pid, out, err))
  deadline = None if timeout is None else time.monotonic() + timeout
  codes = {}
  while len(codes) < len(children):
    matched = kill_when is not None and bool(glob.glob(kill_when))
    timed_out = deadline is not None and time.monotonic() > deadline
    for pid, _, _ in children:
      if pid not in codes:
        done, status = os.waitpid(pid, os.WNOHANG)
        if not done and (matched or timed_out):
          os.kill(pid, 9)
          _, status = os.waitpid(pid, 0)
        if done or matched or timed_out:
          codes[pid] = None if timed_out and not done else os.waitstatus_to_exitcode(status)
    time.sleep(0.01)
  results = []
  for pid, out, err in children:
    out.seek(0)
    err.seek(0)
    results.append((codes[pid], out.read(), err.read()))
    out.close()
    err.close()
  return results


def serve() -> None:
  channel = os.fdopen(os.dup(1), 'w')
  os.dup2(2, 1)  # stray prints of this server go to stderr, never into the replies
  for line in sys.stdin:
    request = json.loads(line)
    channel.write(json.dumps(run(request['commands'], request.get('env'), request.get('cwd'),
                                 request.get('timeout'), request.get('kill_when'))) + '\n')
    channel.flush()


if __name__ == '__main__':
  serve()
