"""Atomic file writes: a reader, or a run resumed after a kill, sees the previous file or the complete new one."""
from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from typing import IO


@contextlib.contextmanager
def atomic_open(path: str, mode: str = 'w', **kwargs) -> Iterator[IO]:
  """A file opened for writing (`open`'s mode and keyword arguments) whose content replaces `path` when the block
  exits normally: it is a uniquely named temporary file next to `path`, renamed onto it. If the block raises, the
  temporary file is removed and `path` is left as it was."""
  tmp = f'{path}.{uuid.uuid4().hex[:12]}.tmp'
  try:
    with open(tmp, mode, **kwargs) as f:
      yield f
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise


def write_atomic(path: str, text: str) -> None:
  """Writes `text` to `path` atomically (`atomic_open`), its newlines as given."""
  with atomic_open(path, 'w', newline='') as f:
    f.write(text)
