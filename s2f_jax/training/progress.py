"""Progress bars with ETA that stay quiet under CI or when stderr is not a terminal."""
from __future__ import annotations

import os
import sys

from tqdm import tqdm  # text bars: they only show on a terminal (progress_enabled)


def progress_enabled() -> bool:
  """On a terminal, unless the `CI` environment variable is set (to anything but '', '0' or 'false')."""
  in_ci = os.environ.get('CI', '').strip().lower() not in ('', '0', 'false')
  return not in_ci and sys.stderr.isatty()


def progress_bar(total: int, desc: str, unit: str = 'epoch') -> tqdm:
  """A tqdm bar over `total` items (disabled when `progress_enabled()` is False)."""
  return tqdm(total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True, disable=not progress_enabled())
