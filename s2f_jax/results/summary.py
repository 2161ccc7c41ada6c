"""Result tables in the paper's layout (original.md S2F §5.6, Tables 7–13): one table per setup, rows = architectures,
columns = methods, from every finished method folder under a root.

`collect(root)` reads the metrics rows of every finished method folder (`metrics.jsonl` next to a `DONE` marker; an
unfinished `<method>.partial/` is never read). `summarize(rows)` builds one `Table` per setup and `to_markdown`,
`to_csv`, `to_latex` render it; `write_tables` writes `<dir>/<name>.{md,csv,tex}`.

Columns: the paper's methods in the paper's order and naming, only those with results; then every other column
(the "other" section), so a method added later appears without changes here. A result's column is the one the
sweep that wrote it recorded for its method folder (`<root>/columns/*.json`, written by `write_columns` from the
sweep's job list: its variant label, e.g. 'ST-B', 'SFT' for every SFT lr decay, '20k' for the oracle). A result no
sweep recorded (a run of experiments/main.py) is mapped by its method name (`PAPER_COLUMNS`, one table mapping method
names to labels), and goes under its own name when it has no paper column:
- "4k" and "20k" are both `erm_final_<n>_samples`, told apart by n: n equal to the setup's final-step size (the
  trailing number of its name, e.g. ...label_flip4000) is "4k"; the largest larger n is the oracle "20k". As in the
  original, the oracle is run as its own setup (final size 20000: ...label_flip20000); its erm_final rows join the
  table of the setup with the same steps and the smaller final size, and a setup holding nothing but such erm_final
  rows gets no table of its own. A setup whose name ends without a size (portraits) takes its smallest n as "4k".
- ConvNet rows show the `*_side_tune_block` methods in the ST-1 / SST-1 / JST-1 columns and '---' in the -B columns
  (original.md S2F §5.6; the original's ConvNet only has block side modules). A ConvNet one-conv side-tune result, which
  this port can produce, is listed under its own name in the other section. (Recorded sweep columns are kept as
  they are: the paper sweeps run both side-module sizes on every architecture, each in its own column.)

Cells: the metric (test accuracy by default; `metric='valid'` for validation accuracy) as a fraction, mean over
seeds, formatted `.2f` without the leading 0 (".85"), with "± std" (sample std over seeds, as pandas' `std`) when
there are 2+ seeds; 'Mean' and 'Std dev' rows: mean and population std (numpy's `np.std`) over the architectures
of the column's cell means. Wall seconds per cell: mean over seeds of the wall seconds of every run the cell chose
among (e.g. all of SFT's lr-decay variants), i.e. the compute behind the number.

Model selection never looks at test data: where several method folders map to one column for the same (setup,
architecture, seed) — SFT's / EWC's lr-decay variants (none, linear, exponential), or repeated runs — the one with
the best validation accuracy is kept (ties: the first by method name). `compat_select_by_test=True` reproduces the
original summary, which took the best *test* accuracy per seed (original.md S2F §3.4, §5.6, §8 item 11; deviations #13).

Marking (original.md S2F §5.6: cells within 0.02 of the best non-oracle method are **bold**; cells within 0.02 of the
oracle are *bold italic*; in the Mean row, a method is bold (or italic-bold) if mean(diff to best or oracle) − std(diff)
< 0 across architectures), as the original's `create_latex_table(tolerance=.02)` does it:
- per architecture row, with best = the largest cell mean among the paper's non-oracle columns of that row and
  oracle = the row's 20k mean: the 20k cell is never marked; another cell is bold italic if mean ≥ oracle − 0.02,
  else bold if best − mean ≤ 0.02 (comparisons on the unrounded means, with a 1e-9 slack so that a difference of
  exactly 0.02 counts as within in floating point);
- Mean row, with best = the paper's non-oracle column with the largest Mean (the first in column order on ties):
  a column is bold italic if, over the architectures it shares with 20k, mean(d) − std(d) < 0 with d = oracle −
  cell (population std); else bold if it is the best column or, over the architectures it shares with the best
  column, mean(d) − std(d) < 0 with d = best − cell; the 20k Mean is never marked; the Std dev row never.
Columns of the other section are marked by the same rules against the paper columns' best and oracle, but never
count as the best themselves.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import re
import statistics
from typing import Iterable, Sequence

from s2f_jax.errors import UserError
from s2f_jax.io import write_atomic
from s2f_jax.results.writer import latex_escape, markdown_table

_DECAY = r'(?:_linear_lr_decay|_exponential_lr_decay)?'
ERM_FINAL = re.compile(r'erm_final_(\d+)_samples')
ORACLE = '20k'
NOT_APPLICABLE = '---'

# The paper's columns in the paper's order (original.md S2F §5.6 panels 1 and 2, labels of §7): (label, the method names
# it takes, as a regular expression that must match the whole 'Method' value, what it is). Method names are those
# `s2f_jax.methods` writes; the settings are those of the original's experiment_scripts/run_*_RCL.sh.
PAPER_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ('4k', ERM_FINAL.pattern, "ERM on the final step, n = the setup's final-step size"),
    ('ERM', r'erm_all', 'ERM on all steps pooled'),
    ('IRM', r'irm_all', 'IRM on all steps'),
    ('DRO', r'dro_all', 'DRO on all steps'),
    ('FT', r'erm_fine_tune', 'ERM on the history, then fine-tune all layers'),
    ('LP-FT', r'erm_linear_probe_then_fine_tune', 'linear probe, then fine-tune'),
    ('I-FT', r'irm_fine_tune', 'IRM on the history, then fine-tune'),
    ('D-FT', r'dro_fine_tune', 'DRO on the history, then fine-tune'),
    ('ST-1', r'erm_side_tune', 'side-tune, one 3x3 conv + BN per block (without adapter.all_layers_efficient)'),
    ('ST-B', r'erm_side_tune_block', 'side-tune, a copy of each block'),
    ('SFT', r'sequential_fine_tune' + _DECAY, 'sequential fine-tuning, lr decay none / linear / exponential'),
    ('EWC', r'sequential_fine_tune_reg_all_previous_fisher' + _DECAY, 'sequential fine-tuning with EWC'),
    ('SST-1', r'sequential_side_tune', 'sequential side-tuning, one conv per block'),
    ('SST-B', r'sequential_side_tune_block', 'sequential side-tuning, block copies'),
    ('JM', r'joint_model_adjacent_reg_l2', 'joint model, adjacent L2'),
    ('JST-1', r'joint_model_side_tune_all_layers_efficient_adjacent_reg_none',
     'joint side-tuned model, one conv per block, adapter.all_layers_efficient, no adjacent term'),
    ('JST-B', r'joint_model_side_tune_block_adjacent_reg_none', 'joint side-tuned model, block copies, no adjacent term'),
    (ORACLE, ERM_FINAL.pattern, 'oracle: ERM on the final step with the largest larger n (20000 in the paper)'),
)
LABELS = tuple(label for label, _, _ in PAPER_COLUMNS)
_PATTERNS = tuple((label, re.compile(pattern)) for label, pattern, _ in PAPER_COLUMNS if pattern != ERM_FINAL.pattern)
PANEL_1 = LABELS[:10]  # 4k .. ST-B; panel 2: SFT .. JST-B, 20k (the LaTeX layout of original.md S2F §5.6)
# ConvNet rows: the block variant fills the one-conv column (original.md S2F §5.6).
CONVNET_BLOCK_COLUMNS = {'ST-B': 'ST-1', 'SST-B': 'SST-1', 'JST-B': 'JST-1'}
FAMILIES = (('convnet', 'Conv'), ('densenet', 'Dense'), ('resnet', 'Res'))
METRICS = {'test': 'Test accuracy', 'valid': 'Validation accuracy'}
TOLERANCE = 0.02
_SLACK = 1e-9
_MODEL_DIR = re.compile(r'(convnet|densenet|resnet)_(\d+)blocks_(.+)')
_MODEL = re.compile(r'(convnet|densenet|resnet) (\d+) blocks?')
COLUMNS_DIR = 'columns'  # <root>/columns/<sweep>.json: method folder (relative to the root) → column


@dataclasses.dataclass(frozen=True)
class Cell:
  """One table cell: `mean` of the metric over seeds (or, in the Mean / Std dev rows, over architectures), `std`
  over seeds (None with one seed), the seeds, the mean wall seconds, the method names chosen, and the mark ('',
  'bold' or 'bold italic')."""
  mean: float
  std: float | None = None
  seeds: tuple = ()
  wall_seconds: float | None = None
  methods: tuple[str, ...] = ()
  mark: str = ''


@dataclasses.dataclass
class Table:
  """One setup's table. `cells[(architecture, column)]` is a `Cell` or NOT_APPLICABLE (absent: no result)."""
  name: str
  setup: str
  dataset: str | None
  metric: str
  columns: tuple[str, ...]  # paper labels with results, in the paper's order
  other_columns: tuple[str, ...]  # methods without a paper column, by name
  architectures: tuple[str, ...]  # row labels: Conv-1..4, Dense-1..4, Res-1..4, then any other model
  cells: dict
  mean: dict  # column → Cell (mark set)
  std_dev: dict  # column → Cell
  compat_select_by_test: bool = False

  @property
  def all_columns(self) -> tuple[str, ...]:
    return self.columns + self.other_columns


# ------------------------------------------------------------------------------------------------------ collection


def collect(root: str) -> list[dict]:
  """The metrics rows of every finished method folder under `root` (`metrics.jsonl` beside `DONE`), in path order.

  Each row gains 'Folder' (its method folder), 'Column' where a sweep recorded the folder's column, and 'Dataset'
  (the dataset tag of the default layout's `<model>_<N>blocks_<dataset>` folder, which tells label-noise and
  compat.original runs apart, else config.json's data.name, else None); 'Shift sequence', 'Seed' and 'Model' come from the folder
  layout `<model>_<N>blocks_<dataset>/<setup>/seed<seed>/<method>/` where a row lacks them. With
  `data.test_all_steps`, only the final step's row of a file is kept. `<root>/summary` is skipped."""
  rows = []
  root = os.path.abspath(root)
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if not d.endswith('.partial') and d != 'checkpoints'
                         and not (dirpath == root and d in ('summary', COLUMNS_DIR)))
    if 'metrics.jsonl' in filenames and 'DONE' in filenames:
      rows += _read_folder(dirpath)
  columns = read_columns(root)
  for row in rows:
    column = columns.get(os.path.relpath(row['Folder'], root))
    if column and row.get('Column') is None:
      row['Column'] = column
  return rows


def write_columns(root: str, name: str, columns: dict[str, str]) -> str:
  """Writes `<root>/columns/<name>.json` ({method folder relative to root: column}); returns its path."""
  path = os.path.join(root, COLUMNS_DIR, file_stem(name.replace(':', '_')) + '.json')
  os.makedirs(os.path.dirname(path), exist_ok=True)
  write_atomic(path, json.dumps(dict(sorted(columns.items())), indent=1) + '\n')
  return path


def read_columns(root: str) -> dict[str, str]:
  """The recorded columns of every sweep under `root` (files in name order; a later file wins for a folder)."""
  folder = os.path.join(root, COLUMNS_DIR)
  out = {}
  for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else ():
    path = os.path.join(folder, name)
    try:
      with open(path) as f:
        columns = json.load(f)
    except (OSError, ValueError) as e:
      raise UserError(f'{path}: not a JSON column record ({e})') from None
    if not isinstance(columns, dict):
      raise UserError(f'{path}: not a JSON object')
    out.update({os.path.normpath(k): str(v) for k, v in columns.items()})
  return out


def _read_folder(folder: str) -> list[dict]:
  path = os.path.join(folder, 'metrics.jsonl')
  rows = []
  with open(path) as f:
    for number, line in enumerate(f, 1):
      if line.strip():
        try:
          row = json.loads(line)
        except json.JSONDecodeError:
          raise UserError(f'{path}:{number} is not valid JSON') from None
        if not isinstance(row, dict):
          raise UserError(f'{path}:{number} is not a JSON object')
        rows.append(row)
  steps = [r['Time step'] for r in rows if r.get('Time step') is not None]
  if steps:
    rows = [r for r in rows if r.get('Time step') in (None, max(steps))]
  layout = _layout(folder)
  for row in rows:
    for key, value in layout.items():
      if value is not None and row.get(key) is None:
        row[key] = value
    row['Folder'] = folder
    for key in ('Method', 'Model', 'Shift sequence', 'Seed'):
      if row.get(key) is None:
        raise UserError(f"{path}: a row has no {key!r}")
  return rows


def _layout(folder: str) -> dict:
  """Dataset, setup, seed and model from config.json and the default folder layout (None where absent)."""
  seed_dir = os.path.dirname(folder)
  setup_dir = os.path.dirname(seed_dir)
  model_dir = os.path.basename(os.path.dirname(setup_dir))
  seed = re.fullmatch(r'seed(\d+)', os.path.basename(seed_dir))
  model = _MODEL_DIR.fullmatch(model_dir)
  dataset = model.group(3) if model and seed else None  # the run folder's dataset tag (e.g. cifar10_original)
  if dataset is None:
    try:
      with open(os.path.join(folder, 'config.json')) as f:
        dataset = json.load(f)['config']['data']['name']
    except (OSError, ValueError, KeyError, TypeError):
      pass
  return {'Dataset': dataset,
          'Shift sequence': os.path.basename(setup_dir) if seed else None,
          'Seed': int(seed.group(1)) if seed else None,
          'Model': f'{model.group(1)} {model.group(2)} blocks' if model and seed else None}


# ------------------------------------------------------------------------------------------------------ summary


def architecture_label(model: str) -> str:
  """'resnet 4 blocks' → 'Res-4' (any other model name is kept as it is)."""
  m = _MODEL.fullmatch(str(model).strip())
  return f'{dict(FAMILIES)[m.group(1)]}-{int(m.group(2))}' if m else str(model)


def _architecture_order(model: str) -> tuple:
  m = _MODEL.fullmatch(str(model).strip())
  if m:
    return (0, [f for f, _ in FAMILIES].index(m.group(1)), int(m.group(2)), '')
  return (1, 0, 0, str(model))


def _family(label: str) -> str:
  return label.split('-')[0] if re.fullmatch(r'(Conv|Dense|Res)-\d+', label) else label


def split_setup(setup: str) -> tuple[str, int | None]:
  """('source6000:rotation4000:corruption6000:label_flip', 4000) for '...label_flip4000'; (setup, None) without a
  trailing size (portraits)."""
  m = re.fullmatch(r'(.*?)(\d+)', setup)
  return (m.group(1), int(m.group(2))) if m else (setup, None)


def paper_label(method: str) -> str | None:
  """The paper column of a method name other than erm_final (None: the method has no paper column)."""
  for label, pattern in _PATTERNS:
    if pattern.fullmatch(method):
      return label
  return None


def _final_size(method: str) -> int | None:
  m = ERM_FINAL.fullmatch(method)
  return int(m.group(1)) if m else None


def summarize(rows: Iterable[dict], metric: str = 'test', compat_select_by_test: bool = False) -> dict[str, Table]:
  """One `Table` per setup (see the module docstring), keyed and ordered by name: the setup, or
  '<dataset>_<setup>' where one setup name has results for several datasets."""
  if metric not in METRICS:
    raise UserError(f"unknown metric {metric!r}; valid choices: {', '.join(METRICS)}")
  by_setup: dict[tuple, list[dict]] = {}
  for row in rows:
    by_setup.setdefault((row.get('Dataset'), str(row['Shift sequence'])), []).append(row)
  keys = sorted(by_setup, key=lambda k: (str(k[0]), k[1]))
  setups_of = {}
  for dataset, setup in keys:
    setups_of.setdefault(setup, set()).add(dataset)
  tables = {}
  for dataset, setup in keys:
    base, size = split_setup(setup)
    native = by_setup[(dataset, setup)]
    siblings = [(k, split_setup(k[1])[1]) for k in keys if k[0] == dataset and split_setup(k[1])[0] == base]
    siblings = [(k, n) for k, n in siblings if size is not None and n is not None]
    larger = [k for k, n in siblings if n > size]
    smaller = [k for k, n in siblings if n < size]
    if smaller and all(_final_size(str(r['Method'])) is not None for r in native):
      continue  # an oracle-only setup: its rows join the smaller setup's table
    imported = [r for k in larger for r in by_setup[k] if (_final_size(str(r['Method'])) or 0) > (size or 0)]
    name = setup if len(setups_of[setup]) == 1 else f'{dataset}_{setup}'
    tables[name] = _table(name, setup, dataset, native, imported, size, metric, compat_select_by_test)
  return dict(sorted(tables.items()))


def _table(name, setup, dataset, native, imported, size, metric, compat) -> Table:
  sizes = [_final_size(str(r['Method'])) for r in native + imported]
  sizes = [n for n in sizes if n is not None]
  own = size if size is not None else (min(sizes) if sizes else None)
  oracle_size = max((n for n in sizes if own is not None and n > own), default=None)
  groups: dict[tuple, list[dict]] = {}  # (model, column, seed) → candidate rows
  for row, is_native in [(r, True) for r in native] + [(r, False) for r in imported]:
    method, model = str(row['Method']), str(row['Model'])
    n = _final_size(method)
    if row.get('Column'):
      label = str(row['Column'])
    elif n is not None:
      label = '4k' if n == own else ORACLE if n == oracle_size else None
      if label is None and not is_native:
        continue
    else:
      label = paper_label(method)
    if not row.get('Column') and label is not None and architecture_label(model).startswith('Conv-'):
      if label in CONVNET_BLOCK_COLUMNS:
        label = CONVNET_BLOCK_COLUMNS[label]
      elif label in CONVNET_BLOCK_COLUMNS.values():
        label = None  # the column holds the block variant on ConvNet rows
    groups.setdefault((model, label or method, row['Seed']), []).append(row)
  key = METRICS['test' if compat else 'valid']
  value_key = METRICS[metric]
  per_cell: dict[tuple, list[tuple]] = {}  # (model, column) → [(seed, chosen row, wall seconds)]
  for (model, column, seed), candidates in groups.items():
    candidates = sorted(candidates, key=lambda r: (str(r['Method']), r['Folder'] if 'Folder' in r else ''))
    chosen = max(candidates, key=lambda r: _number(r.get(key)))
    folders = {r.get('Folder', id(r)): float(r.get('Wall seconds') or 0.0) for r in candidates}
    per_cell.setdefault((model, column), []).append((seed, chosen, sum(folders.values())))
  models = sorted({m for m, _ in per_cell}, key=_architecture_order)
  architectures = tuple(architecture_label(m) for m in models)
  cells = {}
  for (model, column), entries in per_cell.items():
    entries.sort(key=lambda e: _seed_order(e[0]))
    values = [_value(e[1], value_key) for e in entries]
    cells[(architecture_label(model), column)] = Cell(
        mean=statistics.fmean(values), std=statistics.stdev(values) if len(values) > 1 else None,
        seeds=tuple(e[0] for e in entries), wall_seconds=statistics.fmean(e[2] for e in entries),
        methods=tuple(sorted({str(e[1]['Method']) for e in entries})))
  present = {c for _, c in cells}
  columns = tuple(label for label in LABELS if label in present)
  other_columns = tuple(sorted(present - set(LABELS)))
  for arch in architectures:
    if arch.startswith('Conv-'):
      for column in CONVNET_BLOCK_COLUMNS:
        if column in columns:
          cells.setdefault((arch, column), NOT_APPLICABLE)
  _mark_rows(cells, architectures, columns, other_columns)
  mean, std_dev = _summary_rows(cells, architectures, columns, other_columns)
  return Table(name, setup, dataset, metric, columns, other_columns, architectures, cells, mean, std_dev, compat)


def _value(row: dict, key: str) -> float:
  try:
    return float(row[key])
  except (KeyError, TypeError, ValueError):
    where = row.get('Folder') or f"method {row.get('Method')!r}"
    raise UserError(f'{where}: no number in {key!r} ({row.get(key)!r})') from None


def _number(value) -> float:
  try:
    x = float(value)
  except (TypeError, ValueError):
    return -math.inf
  return -math.inf if math.isnan(x) else x


def _seed_order(seed) -> tuple:
  try:
    return (0, float(seed), '')
  except (TypeError, ValueError):
    return (1, 0.0, str(seed))


def _means(cells, architectures, column) -> dict[str, float]:
  out = {}
  for arch in architectures:
    cell = cells.get((arch, column))
    if isinstance(cell, Cell):
      out[arch] = cell.mean
  return out


def _mark(mean: float, best: float | None, oracle: float | None) -> str:
  if oracle is not None and mean >= oracle - TOLERANCE - _SLACK:
    return 'bold italic'
  if best is not None and best - mean <= TOLERANCE + _SLACK:
    return 'bold'
  return ''


def _mark_rows(cells, architectures, columns, other_columns) -> None:
  candidates = [c for c in columns if c != ORACLE]
  for arch in architectures:
    means = [cells[(arch, c)].mean for c in candidates if isinstance(cells.get((arch, c)), Cell)]
    best = max(means) if means else None
    oracle = cells.get((arch, ORACLE))
    oracle = oracle.mean if isinstance(oracle, Cell) else None
    for column in candidates + list(other_columns):
      cell = cells.get((arch, column))
      if isinstance(cell, Cell):
        cells[(arch, column)] = dataclasses.replace(cell, mark=_mark(cell.mean, best, oracle))


def _equivalent(reference: dict[str, float], means: dict[str, float]) -> bool:
  """mean(d) − std(d) < 0 for d = reference − means over the shared architectures (population std)."""
  shared = [a for a in means if a in reference]
  if not shared:
    return False
  diffs = [reference[a] - means[a] for a in shared]
  return statistics.fmean(diffs) - statistics.pstdev(diffs) < 0


def _summary_rows(cells, architectures, columns, other_columns) -> tuple[dict, dict]:
  per_column = {c: _means(cells, architectures, c) for c in columns + other_columns}
  col_mean = {c: statistics.fmean(v.values()) for c, v in per_column.items() if v}
  best = None
  for column in columns:
    if column != ORACLE and column in col_mean and (best is None or col_mean[column] > col_mean[best]):
      best = column
  oracle = per_column.get(ORACLE, {})
  mean, std_dev = {}, {}
  for column, value in col_mean.items():
    mark = ''
    if column != ORACLE:
      if _equivalent(oracle, per_column[column]):
        mark = 'bold italic'
      elif column == best or (best is not None and _equivalent(per_column[best], per_column[column])):
        mark = 'bold'
    walls = [cells[(a, column)].wall_seconds for a in per_column[column]]
    mean[column] = Cell(value, wall_seconds=statistics.fmean(walls), mark=mark)
    std_dev[column] = Cell(statistics.pstdev(per_column[column].values()))
  return mean, std_dev


# ------------------------------------------------------------------------------------------------------ rendering


def fmt(x: float) -> str:
  """'.2f' without the leading 0 (0.853 → '.85'), as the paper's tables."""
  s = f'{x:.2f}'
  return s[1:] if s.startswith('0.') else '-' + s[2:] if s.startswith('-0.') else s


def _cell_text(cell, bold: str, italic_bold: str, pm: str) -> str:
  """A cell's text: the mark wraps the mean (format strings `bold`, `italic_bold` with {}), then ± std."""
  if cell is None:
    return ''
  if not isinstance(cell, Cell):
    return cell
  text = fmt(cell.mean)
  text = {'bold': bold, 'bold italic': italic_bold}.get(cell.mark, '{}').format(text)
  return text + (f' {pm} {fmt(cell.std)}' if cell.std is not None else '')


def _grid(table: Table, columns: Sequence[str], bold: str, italic_bold: str, pm: str) -> list[list[str]]:
  """Rows of text: one per architecture, then Mean and Std dev."""
  out = [[arch] + [_cell_text(table.cells.get((arch, c)), bold, italic_bold, pm) for c in columns]
         for arch in table.architectures]
  out.append(['Mean'] + [_cell_text(table.mean.get(c), bold, italic_bold, pm) for c in columns])
  out.append(['Std dev'] + [_cell_text(table.std_dev.get(c), bold, italic_bold, pm) for c in columns])
  return out


def _wall(cell) -> str:
  return f'{cell.wall_seconds:.1f}' if isinstance(cell, Cell) and cell.wall_seconds is not None else (
      cell if isinstance(cell, str) else '')


def legend(table: Table) -> str:
  what = METRICS[table.metric]
  rule = 'test accuracy (compat: as the original)' if table.compat_select_by_test else 'validation accuracy'
  return (f'{what}, mean over seeds ± std (2+ seeds). Bold: within {TOLERANCE:g} of the best non-oracle method of '
          f'the row; bold italic: within {TOLERANCE:g} of the oracle ({ORACLE}). Mean row: marked when mean − std '
          f'(over architectures) of the difference to the best method / the oracle is below 0. Several runs for one '
          f'cell and seed (e.g. SFT lr decays): the best {rule}.')


def to_markdown(table: Table) -> str:
  """The table (paper columns), the other methods (if any), and the wall seconds per cell, in Markdown."""
  title = table.setup + (f' ({table.dataset})' if table.dataset else '')
  parts = [f'## {title}', '', legend(table), '']
  if table.columns:
    parts += [markdown_table(['Model', *table.columns],
                              _grid(table, table.columns, '**{}**', '***{}***', '±')), '']
  if table.other_columns:
    parts += ['Other methods (no paper column):', '',
              markdown_table(['Model', *table.other_columns],
                              _grid(table, table.other_columns, '**{}**', '***{}***', '±')), '']
  columns = table.all_columns
  walls = [[arch] + [_wall(table.cells.get((arch, c))) for c in columns] for arch in table.architectures]
  walls.append(['Mean'] + [_wall(table.mean.get(c)) for c in columns])
  parts += ['Wall seconds per cell (mean over seeds):', '', markdown_table(['Model', *columns], walls)]
  return '\n'.join(parts) + '\n'


CSV_COLUMNS = ('Setup', 'Dataset', 'Model', 'Column', 'Mean', 'Std', 'Seeds', 'Wall seconds', 'Mark', 'Methods')


def to_csv(table: Table) -> str:
  """One line per cell (architectures, then Mean and Std dev; '---' cells left out), full precision."""
  out = io.StringIO()
  writer = csv.writer(out, lineterminator='\n')
  writer.writerow(CSV_COLUMNS)
  number = lambda x: '' if x is None else f'{x:.6f}'
  for arch, lookup in [(a, lambda c, a=a: table.cells.get((a, c))) for a in table.architectures] + [
      ('Mean', table.mean.get), ('Std dev', table.std_dev.get)]:
    for column in table.all_columns:
      cell = lookup(column)
      if isinstance(cell, Cell):
        writer.writerow([table.setup, table.dataset or '', arch, column, number(cell.mean), number(cell.std),
                         len(cell.seeds) if cell.seeds else '', '' if cell.wall_seconds is None else
                         f'{cell.wall_seconds:.2f}', cell.mark, ' '.join(cell.methods)])
  return out.getvalue()


def to_latex(table: Table) -> str:
  """booktabs tabulars: panel 1 (4k .. ST-B), panel 2 (SFT .. JST-B, 20k), then the other methods; bold
  \\textbf, bold italic \\textit{\\textbf{}}, midrules between model families and before Mean."""
  panels = [[c for c in table.columns if c in PANEL_1], [c for c in table.columns if c not in PANEL_1],
            list(table.other_columns)]
  what = METRICS[table.metric]
  out = [f'% {table.setup}' + (f' ({table.dataset})' if table.dataset else '') +
         f': {what}, mean over seeds $\\pm$ std']
  for columns in panels:
    if not columns:
      continue
    grid = _grid(table, columns, '\\textbf{{{}}}', '\\textit{{\\textbf{{{}}}}}', '$\\pm$')
    out += [f"\\begin{{tabular}}{{l{'c' * len(columns)}}}", '\\toprule',
            ' & '.join(['Model'] + [latex_escape(c) for c in columns]) + ' \\\\', '\\midrule']
    for i, row in enumerate(grid):
      if i == len(table.architectures) or (0 < i < len(table.architectures)
                                          and _family(table.architectures[i]) != _family(table.architectures[i - 1])):
        out.append('\\midrule')
      out.append(' & '.join([latex_escape(row[0])] + row[1:]) + ' \\\\')
    out += ['\\bottomrule', '\\end{tabular}']
  return '\n'.join(out) + '\n'


# ------------------------------------------------------------------------------------------------------ files


def file_stem(name: str) -> str:
  return name.replace(os.sep, '_')


def write_tables(tables: dict[str, Table], directory: str) -> list[str]:
  """`<directory>/<name>.md`, `.csv`, `.tex` per table (each written to a temporary name, then renamed)."""
  os.makedirs(directory, exist_ok=True)
  paths = []
  for name, table in tables.items():
    for ext, render in (('md', to_markdown), ('csv', to_csv), ('tex', to_latex)):
      path = os.path.join(directory, f'{file_stem(name)}.{ext}')
      write_atomic(path, render(table))
      paths.append(path)
  return paths


def write_summary(root: str, metric: str = 'test', compat_select_by_test: bool = False
                  ) -> tuple[dict[str, Table], list[str]]:
  """Collects every finished result under `root` and writes its tables to `<root>/summary/` (`write_tables`):
  (tables, paths); ({}, []) when nothing has finished."""
  tables = summarize(collect(root), metric, compat_select_by_test)
  return tables, write_tables(tables, os.path.join(root, 'summary')) if tables else []
