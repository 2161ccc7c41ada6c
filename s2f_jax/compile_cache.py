"""The persistent JAX compilation cache: compiled XLA programs are kept on disk and reused by later processes.

On by default for every entry point (experiments/*.py, sweeps, the notebook, the tests) under the user's cache
folder (`~/.cache/s2f_jax/jax` on Linux). Where it lives, in order of precedence:
  - an explicit directory (the `compilation_cache_dir` config key when not 'auto'; '' disables the cache);
  - the environment variable `S2F_JAX_CACHE_DIR` (set but empty disables the cache);
  - the user's cache folder.
Reusing a cached program is bit-identical to compiling it again; a warm cache roughly halves the default run's wall
time on 2 CPU cores (docs/benchmarks.md).
"""
from __future__ import annotations

import os

import jax

ENV = 'S2F_JAX_CACHE_DIR'
AUTO = 'auto'


def user_cache_dir() -> str:
  """This project's folder in the user's cache: $XDG_CACHE_HOME (or ~/.cache) / s2f_jax."""
  base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  return os.path.join(base, 's2f_jax')


def default_dir() -> str:
  """The user's cache folder for compiled programs: `user_cache_dir()` / jax."""
  return os.path.join(user_cache_dir(), 'jax')


def resolve(directory: str = AUTO) -> str:
  """The cache directory that `enable(directory)` uses; '' when the cache is off."""
  if directory != AUTO:
    return directory
  return os.environ[ENV] if ENV in os.environ else default_dir()


def enable(directory: str = AUTO) -> str:
  """Turns the persistent cache on in `resolve(directory)` for this process (every program, however quick to
  compile: the test suite and the tiny default compile many sub-second programs); returns the directory, '' = off.
  Call it before the first compilation; calling it again with another directory moves the cache."""
  path = resolve(directory)
  if path:
    path = os.path.abspath(os.path.expanduser(path))
    os.makedirs(path, exist_ok=True)
  jax.config.update('jax_compilation_cache_dir', path or None)
  jax.config.update('jax_enable_compilation_cache', bool(path))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  return path
