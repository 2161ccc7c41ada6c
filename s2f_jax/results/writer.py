"""Run outputs: config.json, metrics.csv / metrics.jsonl (the original's columns first, then ours)."""
from __future__ import annotations

import csv
import json
import os
import platform
from typing import Any, Sequence

ORIGINAL_COLUMNS = ('Model', 'Method', 'Shift sequence', 'Seed', 'Test accuracy')


def run_metadata() -> dict[str, Any]:
  """Library versions and the devices the run used."""
  import flax
  import jax
  import optax
  devices = jax.local_devices()
  return {'jax': jax.__version__, 'flax': flax.__version__, 'optax': optax.__version__,
          'python': platform.python_version(), 'platform': devices[0].platform,
          'device': f'{len(devices)}x {devices[0].device_kind}'}


def write_config(path: str, config_dict: dict) -> None:
  with open(path, 'w') as f:
    json.dump({'config': config_dict, 'metadata': run_metadata()}, f, indent=2, sort_keys=True)


# Top-level keys of configs written before the method families owned their sections (2026-12-06) → (section, key).
MOVED_KEYS = {'fine_tune_layers': ('fine_tune', 'layers'), 'fine_tune_mode': ('fine_tune', 'mode'),
              'regularization': ('fine_tune', 'regularization'), 'ablate_init': ('fine_tune', 'ablate_init'),
              'learning_rate_decay': ('fine_tune', 'learning_rate_decay'),
              'side_layer_sizes': ('adapter', 'side_layer_sizes'),
              'all_layers_efficient': ('adapter', 'all_layers_efficient'), 'adapter_rank': ('adapter', 'rank'),
              'adapter_mode': ('adapter', 'mode'), 'dro_eta': ('robust', 'dro_eta'),
              'irm_penalty': ('robust', 'irm_penalty'), 'irm_anneal_steps': ('robust', 'irm_anneal_steps')}


def read_config(path: str) -> dict:
  """The run config dict written by `write_config` (an older one with its method keys moved into their sections)."""
  with open(path) as f:
    config = json.load(f)['config']
  for old, (section, key) in MOVED_KEYS.items():
    if old in config:
      config.setdefault(section, {})[key] = config.pop(old)
  return config


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
  """A Markdown table (no trailing newline) of string cells."""
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  return '\n'.join(lines + ['| ' + ' | '.join(row) + ' |' for row in rows])


def latex_escape(text: str) -> str:
  """`text` with LaTeX's special characters \\ & % $ # _ { } escaped."""
  for char in '\\&%$#_{}':
    text = text.replace(char, '\\' + char)
  return text


def _cell(value: Any) -> Any:
  return json.dumps(value) if isinstance(value, (dict, list, tuple)) else value


def write_metrics(directory: str, rows: Sequence[dict]) -> None:
  """metrics.csv (nested values JSON-encoded) and metrics.jsonl, the original's columns first."""
  write_rows(directory, rows, 'metrics', ORIGINAL_COLUMNS)


def write_rows(directory: str, rows: Sequence[dict], stem: str, first_columns: Sequence[str] = ()) -> None:
  """<stem>.csv (nested values JSON-encoded) and <stem>.jsonl, columns in first-seen order after `first_columns`."""
  columns = list(first_columns)
  for row in rows:
    columns += [k for k in row if k not in columns]
  with open(os.path.join(directory, f'{stem}.csv'), 'w', newline='') as f:
    writer = csv.DictWriter(f, columns)
    writer.writeheader()
    for row in rows:
      writer.writerow({k: _cell(v) for k, v in row.items()})
  with open(os.path.join(directory, f'{stem}.jsonl'), 'w') as f:
    for row in rows:
      f.write(json.dumps(row) + '\n')


def read_metrics(directory: str) -> list[dict]:
  return read_rows(directory, 'metrics')


def read_rows(directory: str, stem: str) -> list[dict]:
  """The rows of <stem>.jsonl (`write_rows`)."""
  with open(os.path.join(directory, f'{stem}.jsonl')) as f:
    return [json.loads(line) for line in f if line.strip()]


def format_table(rows: Sequence[dict]) -> str:
  """A plain-text results table: method, test and valid accuracy, chosen hyper-parameters, wall time."""
  header = ('Method', 'Test acc', 'Valid acc', 'Selected hyper-parameters', 'Wall s')
  body = [(r['Method'] + (f" (t={r['Time step']})" if 'Time step' in r else ''), f"{r['Test accuracy']:.4f}",
           f"{r['Validation accuracy']:.4f}", ', '.join(f'{k}={v:g}' for k, v in r['Hyper-parameters'].items()),
           f"{r.get('Wall seconds', 0):.1f}") for r in rows]
  widths = [max(len(x[i]) for x in [header] + body) for i in range(len(header))]
  line = lambda cells: '  '.join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
  return '\n'.join([line(header), line(['-' * w for w in widths])] + [line(b) for b in body])
