"""Mean ± std over seeds of per-seed result rows (the companion studies' tables)."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from s2f_jax.errors import UserError
from s2f_jax.results.writer import markdown_table


def parse(value, key: str) -> tuple[int, ...]:
  """The seeds of a `<section>.seeds` config value `key` names: a tuple or list of integers, one integer, or a comma
  list ('1,2,3'; '' or () = none). UserError for anything but distinct integers in [0, 2³²)."""
  items = str(value).split(',') if isinstance(value, str) else np.atleast_1d(value).tolist()
  try:
    out = tuple(int(s) for s in items if str(s).strip())
  except (TypeError, ValueError):
    raise UserError(f'{key}={value!r} must be a list of integers, e.g. 1,2,3') from None
  if any(not 0 <= s < 2 ** 32 for s in out) or len(set(out)) != len(out):
    raise UserError(f'{key}={value!r} must be distinct integers in [0, 2^32)')
  return out


def numeric_columns(rows: Sequence[dict], skip: Sequence[str] = ('seed',)) -> list[str]:
  """The columns (first-seen order) whose every value is a number (not a bool), but `skip`."""
  columns = dict.fromkeys(k for r in rows for k in r if k not in skip)
  return [k for k in columns if all(isinstance(r[k], (int, float, np.integer, np.floating))
                                    and not isinstance(r[k], (bool, np.bool_)) for r in rows if k in r)]


def aggregate(rows: Sequence[dict], by: Sequence[str], metrics: Sequence[str] | None = None) -> list[dict]:
  """One row per distinct value of the `by` columns (first-seen order), holding those columns, 'n' (rows in the
  group) and per metric m: m = the mean and m + '_std' = the sample standard deviation (ddof 1, as pandas; 0 for one
  value) over the group's finite values (NaN when it has none). metrics None: every `numeric_columns` but `by`."""
  if metrics is None:
    metrics = numeric_columns(rows, tuple(by) + ('seed', 'n'))
  groups: dict[tuple, list[dict]] = {}
  for row in rows:
    groups.setdefault(tuple(row[k] for k in by), []).append(row)
  out = []
  for key, members in groups.items():
    summary = dict(zip(by, key), n=len(members))
    for m in metrics:
      values = np.array([r.get(m, np.nan) for r in members], np.float64)
      values = values[np.isfinite(values)]
      summary[m] = float(values.mean()) if len(values) else float('nan')
      summary[m + '_std'] = float(values.std(ddof=1)) if len(values) > 1 else (0.0 if len(values) else float('nan'))
    out.append(summary)
  return out


def markdown(summary: Sequence[dict], by: Sequence[str], metrics: Sequence[str], digits: int = 3) -> str:
  """The `aggregate` rows as a Markdown table: the `by` columns, n, and 'mean ± std' per metric ('—' where a group
  has no value)."""
  def cell(s, m):
    return f'{s[m]:.{digits}f} ± {s[m + "_std"]:.{digits}f}' if np.isfinite(s[m]) else '—'
  body = [[str(s[k]) for k in by] + [str(s['n'])] + [cell(s, m) for m in metrics] for s in summary]
  return markdown_table(list(by) + ['n'] + list(metrics), body)
