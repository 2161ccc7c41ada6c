"""Shared test helpers: a tiny run configuration, command lines run in forked children, the check of a one-line
user error, and a fixture recording every stage of real training."""
import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile

# The suite is bound by XLA CPU compile time (tiny models, many distinct programs): the tests, and the experiment
# scripts they start as subprocesses, compile with backend optimisation off (about 2.5x faster compiles) and with
# the classic loop emitters instead of the fusion emitters (compile time halved again: fewer LLVM modules per
# program). Results are checked against references with tolerances, never against timings.
# Appended once: an xdist worker inherits the controller's flags, and a repeated flag would change the cache keys.
_TEST_XLA_FLAGS = ('--xla_backend_optimization_level=0', '--xla_cpu_use_fusion_emitters=false')
_flags = os.environ.get('XLA_FLAGS', '').split()
os.environ['XLA_FLAGS'] = ' '.join(_flags + [f for f in _TEST_XLA_FLAGS if f not in _flags])

import jax  # noqa: E402
import pytest

from s2f_jax import compile_cache, config as config_lib, experiment
from s2f_jax.data import decoded_cache
from s2f_jax.methods import base

# Both workers, and the scripts the tests start, share the persistent compilation cache (S2F_JAX_CACHE_DIR, else
# the user's cache folder): a program compiled once is read back by every later process that needs it.
compile_cache.enable()

# Decoded datasets (s2f_jax.data.decoded_cache) go to one folder per test session, shared by the workers and the
# scripts they start (set here in the controller, inherited), removed at its end; the user's cache is left alone.
if decoded_cache.ENV not in os.environ:
  os.environ[decoded_cache.ENV] = tempfile.mkdtemp(prefix='s2f_jax_decoded_')
  atexit.register(shutil.rmtree, os.environ[decoded_cache.ENV], True)

@pytest.fixture(autouse=True, scope='module')
def _fresh_compilation_caches():
  """Drops each test file's compiled programs when it ends: an xdist worker runs many files, and the XLA CPU
  compiler has crashed (abort / segfault while compiling) late in long worker sessions."""
  yield
  jax.clear_caches()


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_SERVER: subprocess.Popen | None = None


def _fork_server() -> subprocess.Popen:
  """This worker's fork server (tests/forked_script.py), started on first use."""
  global _SERVER
  if _SERVER is None or _SERVER.poll() is not None:
    _SERVER = subprocess.Popen([sys.executable, 'tests/forked_script.py'], cwd=ROOT, text=True,
                               env=dict(os.environ, CI='1', JAX_PLATFORMS='cpu'),
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    atexit.register(_SERVER.stdin.close)
  return _SERVER


def run_scripts(commands: list[list[str]], env: dict[str, str] | None = None, timeout: float = 600,
                cwd: str = ROOT, kill_when=None) -> list[subprocess.CompletedProcess]:
  """Every command [script, *args] (script: a path from the repo root) as a fresh `python script args` process
  would run it, all at the same time, with CI=1, JAX_PLATFORMS=cpu and `env` added to this environment, each in a
  child forked from a warm interpreter that has imported s2f_jax (tests/forked_script.py): about 4 s less per
  command. kill_when: a glob pattern (str or path); the commands still running when a path matches it are
  SIGKILLed (return code -9). TimeoutExpired when one runs past `timeout` s."""
  server = _fork_server()
  commands = [list(map(str, command)) for command in commands]
  request = {'commands': commands, 'cwd': str(cwd), 'timeout': timeout,
             'kill_when': None if kill_when is None else str(kill_when),
             'env': dict(os.environ, CI='1', JAX_PLATFORMS='cpu', **(env or {}))}
  server.stdin.write(json.dumps(request) + '\n')
  server.stdin.flush()
  out = []
  for command, (code, stdout, stderr) in zip(commands, json.loads(server.stdout.readline())):
    if code is None:
      raise subprocess.TimeoutExpired(command, timeout, stdout, stderr)
    out.append(subprocess.CompletedProcess(command, code, stdout, stderr))
  return out


def checkpointed_epoch(checkpoint_dir) -> int:
  """The latest complete orbax step (= epoch) in the folder `checkpoint_dir` (a pathlib.Path), 0 if none; a step
  being written has a temporary name."""
  try:
    return max((int(p.name) for p in checkpoint_dir.iterdir() if p.name.isdigit()), default=0)
  except FileNotFoundError:
    return 0


def run_script(script: str, *args: str, env: dict[str, str] | None = None, timeout: float = 600,
               cwd: str = ROOT) -> subprocess.CompletedProcess:
  """`python script args` through `run_scripts`."""
  return run_scripts([[script, *args]], env, timeout, cwd)[0]


def forked_runs(script: str, cases: dict[str, list[str]], root, out_flag: str) -> dict[str, tuple[int, str, bool]]:
  """Every case's command line through `script` (`run_script`), with `{out_flag}=root/<i>` as its own output
  folder: case → (exit code, stderr, whether its output folder exists)."""
  out = {}
  for i, (case, args) in enumerate(cases.items()):
    folder = os.path.join(root, str(i))
    done = run_script(script, *args, f'{out_flag}={folder}')
    out[case] = (done.returncode, done.stderr, os.path.exists(folder))
  return out


def assert_user_error(code: int, stderr: str, must_mention) -> None:
  """A user error as the CLI reports it: exit 2 and one stderr line 'error: …' naming every `must_mention`."""
  assert code == 2, (code, stderr[-2000:])
  lines = [line for line in stderr.splitlines() if line.strip()]
  assert len(lines) == 1 and lines[0].startswith('error: '), stderr
  for word in must_mention:
    assert word in lines[0], (word, lines[0])


# Two steps (rotation, then corruption) and a one-point grid: quick end-to-end runs.
SMALL = {'data.shift_sequence': 'rotation:corruption', 'data.target_sizes': '150:150', 'grid.learning_rate': (1e-3,),
         'grid.weight_decay': (1e-4,), 'grid.dropout': (0.0,)}


def tiny_config(sections=None, **overrides):
  """The base config on 16x16 digits, 4 steps (200 source, 100:150:100 targets), a width-8 1-block ConvNet and 2
  epochs; sections: extra top-level config sections (name → ConfigDict) added first; overrides: dotted keys."""
  c = config_lib.base_config()
  c.data.name, c.data.image_size = 'digits', 16
  c.data.source_size, c.data.target_sizes, c.data.test_size = 200, '100:150:100', 100
  c.model.name, c.model.num_blocks, c.model.width = 'convnet', 1, 8
  c.num_epochs = 2
  for name, section in (sections or {}).items():
    c[name] = section
  for k, v in overrides.items():
    obj = c
    *path, last = k.split('.')
    for p in path:
      obj = obj[p]
    obj[last] = v
  return c


def run_small(tmp_path, **overrides) -> list[dict]:
  """`experiment.run` of `tiny_config` with `SMALL` and `overrides` in `tmp_path`."""
  return experiment.run(tiny_config(**{**SMALL, **overrides}), str(tmp_path))


@pytest.fixture
def captured(monkeypatch):
  """Real training, with every stage's selection and learner recorded."""
  stages = {}
  original = base.RunContext.train_stage

  def capture(self, name, *args, **kwargs):
    sel = original(self, name, *args, **kwargs)
    stages[name] = (sel, kwargs.get('learner'), kwargs.get('aux'))
    return sel
  monkeypatch.setattr(base.RunContext, 'train_stage', capture)
  return stages
