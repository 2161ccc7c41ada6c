"""The persistent compilation cache: where it lives, and that a second process reads back the first one's program."""
import os
import subprocess
import sys

import pytest

from s2f_jax import compile_cache

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Compiles one program and prints the cache hits JAX reports and the result's bytes (hex).
PROGRAM = """
import sys
import jax, jax.numpy as jnp
from jax import monitoring
from s2f_jax import compile_cache
hits = []
monitoring.register_event_listener(lambda event, **kw: hits.append(event) if event.endswith('/cache_hits') else None)
print(compile_cache.enable(sys.argv[1]))
x = jnp.arange(12.0).reshape(3, 4)
y = jax.jit(lambda a: jnp.tanh(a @ a.T).sum(0) * 0.37)(x)
print(len(hits), y.block_until_ready().tobytes().hex())
"""


def test_resolve_precedence(monkeypatch, tmp_path):
  monkeypatch.delenv(compile_cache.ENV, raising=False)
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'xdg'))
  assert compile_cache.resolve() == str(tmp_path / 'xdg' / 's2f_jax' / 'jax')
  monkeypatch.setenv(compile_cache.ENV, str(tmp_path / 'env'))
  assert compile_cache.resolve() == str(tmp_path / 'env')
  assert compile_cache.resolve(str(tmp_path / 'key')) == str(tmp_path / 'key')  # the config key wins
  assert compile_cache.resolve('') == ''
  monkeypatch.setenv(compile_cache.ENV, '')
  assert compile_cache.resolve() == ''  # set but empty: off


def _run(directory: str) -> tuple[str, int, str]:
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  out = subprocess.run([sys.executable, '-c', PROGRAM, directory], cwd=ROOT, env=env, capture_output=True,
                       text=True, check=True).stdout.split()
  return out[0] if len(out) == 3 else '', int(out[-2]), out[-1]


@pytest.mark.parametrize('disabled', [False, True])
def test_second_process_reads_the_first_ones_program(tmp_path, disabled):
  directory = '' if disabled else str(tmp_path / 'cache')
  path, hits, first = _run(directory)
  assert path == directory and hits == 0
  again, hits, second = _run(directory)
  assert second == first  # bit-identical results
  if disabled:
    assert hits == 0 and not (tmp_path / 'cache').exists()
  else:
    assert hits >= 1 and any(name.startswith('jit__lambda') for name in os.listdir(directory))
