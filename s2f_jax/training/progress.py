"""Progress bars with ETA that stay quiet under CI or when stderr is not a terminal."""
from __future__ import annotations

import os
import sys

from tqdm.auto import tqdm


def progress_enabled() -> bool:
  return not os.environ.get('CI') and sys.stderr.isatty()


def progress_bar(total: int, desc: str, unit: str = 'epoch') -> tqdm:
  """A tqdm bar over `total` items (disabled when `progress_enabled()` is False)."""
  return tqdm(total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True, disable=not progress_enabled())
