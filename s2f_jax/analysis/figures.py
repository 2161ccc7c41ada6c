"""Writing matplotlib figures (built with `matplotlib.figure.Figure`, no pyplot, so the Agg renderer is used and the
global backend is left alone)."""
from __future__ import annotations

import os
from pathlib import Path

from matplotlib.figure import Figure

from s2f_jax.errors import UserError


def save_figure(fig: Figure, path: str | os.PathLike, what: str = 'figure') -> None:
  """Writes `fig` to `path` as PDF or PNG, by its extension (UserError naming `what` for another); creates the
  folder."""
  fmt = Path(path).suffix.lower().lstrip('.')
  if fmt not in ('pdf', 'png'):
    raise UserError(f'{what} path must end in .pdf or .png; got {str(path)!r}')
  Path(path).parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, format=fmt)
