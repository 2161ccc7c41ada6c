"""Atomic file writes: the target holds the old content or the complete new one, and no temporary file is left."""
import numpy as np
import pytest

from s2f_jax.io import atomic_open, write_atomic


def test_write_atomic_replaces_the_file_and_keeps_newlines(tmp_path):
  path = tmp_path / 'table.md'
  path.write_text('old')
  write_atomic(str(path), 'a\r\nb\n')
  assert path.read_bytes() == b'a\r\nb\n'
  assert [p.name for p in tmp_path.iterdir()] == ['table.md']


def test_atomic_open_binary_and_failure_leaves_old_content(tmp_path):
  path = tmp_path / 'cache.npz'
  with atomic_open(str(path), 'wb') as f:
    np.savez(f, z=np.arange(3))
  with np.load(path) as stored:
    np.testing.assert_array_equal(stored['z'], np.arange(3))
  before = path.read_bytes()
  with pytest.raises(RuntimeError):
    with atomic_open(str(path), 'wb') as f:
      f.write(b'partial')
      raise RuntimeError('interrupted')
  assert path.read_bytes() == before
  assert [p.name for p in tmp_path.iterdir()] == ['cache.npz']
