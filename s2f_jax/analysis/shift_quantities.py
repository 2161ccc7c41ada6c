"""Shift quantities (original.md S2F §5.5, the paper's Tables 4–5): Wasserstein-2 distances between time steps' images.

Images are flattened on their raw 0–255 scale and reduced with one PCA fitted on every step's train images together;
the final step's test images are projected with the same PCA. Between two sets of projected images:

  * covariate shift = W2(X₁, X₂), the exact optimal-transport distance with uniform weights and squared-Euclidean
    cost, sqrt(`ot.emd2(u, v, ot.dist(X₁, X₂))`) (POT's network simplex);
  * conditional shift = Σ_y P₂(y) · W2(X₁|y, X₂|y) over the labels after flipping, P₂ from the second set.

`quantify` computes (a) the source-halves sanity value (one seeded 50/50 split of the source train set), (b) every
consecutive pair of steps t−1 → t and (c) every step's train set → the final test set; `ratio_tables` gives Table 4
((b)/(a)) and Table 5 ((c)_t/(c)_{T−1}, t < T−1), covariate and conditional separately.

Where we differ from the original `quantify_shifts.py` (all improvements; the numbers mean the same):
  * PCA is exact and deterministic (float64; sklearn's 'covariance_eigh' solver when there are more images than
    pixel values, else the full SVD) instead of sklearn's 'auto', which picks a randomized solver driven by the
    global RNG for large inputs; the fitted components are capped at min(100, n_samples, n_features) so small sets
    work;
  * POT's iteration cap (default 100,000, which large problems such as 4800 × 3200 points can hit, returning a
    non-optimal plan with only a warning) is raised to max(10⁶, 50·n₁·n₂), and a plan that is not optimal raises a
    `UserError` instead of a warning;
  * both sets are centred on their pooled mean before the cost matrix is formed (W2 is translation invariant), which
    reduces cancellation in ‖x‖² + ‖y‖² − 2⟨x, y⟩; rounding negatives are clipped to 0;
  * a label present in only one set: the original crashes (an empty set has no uniform weights). Here a label absent
    from the second set has P₂(y) = 0 and is skipped; a label present in the second set but absent from the first is
    skipped and the remaining weights are renormalised to sum to 1 (Σ over shared labels of P₂(y) W2_y / Σ P₂(y)).
    Every skipped label and the P₂ mass actually compared (`covered_mass`) are reported; no shared label at all is
    a `UserError`;
  * the source-halves split uses `RandomState(seed)` rather than the unseeded global `np.random.shuffle`, and
    `max_samples` optionally subsamples every set (seeded, without replacement) before anything else;
  * timings: seconds for every single W2 and in total; ratios with a zero denominator are `None` (the original
    divides by zero).
"""
from __future__ import annotations

import json
import os
import time
import warnings

import numpy as np

from s2f_jax.errors import UserError
from s2f_jax.io import write_atomic
from s2f_jax.results.writer import latex_escape, markdown_table

VARIANCE = 0.95  # PCA keeps the fewest components whose cumulative explained-variance ratio reaches this
MAX_COMPONENTS = 100
TABLES = ('covariate_shift', 'conditional_shift', 'covariate_shift_relative_to_final',
          'conditional_shift_relative_to_final')  # file stems of the original's four `*_ratios_table.txt`
JSON_NAME = 'shift_quantities.json'
_OPTIMAL = 1  # POT network simplex result code (0 infeasible, 2 unbounded, 3 iteration cap reached)


# ------------------------------------------------------------------------------------------------------ PCA


def _flat(name: str, images) -> np.ndarray:
  """images [N, ...] as a finite float64 matrix [N, prod(...)]."""
  A = np.asarray(images)
  if A.ndim < 2 or A.shape[0] == 0:
    raise UserError(f'shift quantities: {name} must be a non-empty [N, ...] array; got shape {A.shape}')
  A = A.reshape(A.shape[0], -1).astype(np.float64)
  if not np.isfinite(A).all():
    raise UserError(f'shift quantities: {name} has NaN/inf values; shape {A.shape}')
  return A


def _exact_solver(n_samples: int, n_features: int) -> str:
  """An exact, deterministic sklearn PCA solver: the eigendecomposition of the [d, d] covariance when there are
  more samples than features (sklearn >= 1.5; O(n d² + d³), much faster than an SVD of the data), else the full
  SVD."""
  import sklearn
  version = tuple(int(p) for p in sklearn.__version__.split('.')[:2] if p.isdigit())
  return 'covariance_eigh' if n_samples > n_features and version >= (1, 5) else 'full'


def _fit_pca(train_sets, variance: float, max_components: int):
  """(fitted sklearn PCA, k, cumulative explained-variance ratios [m]) on all `train_sets` stacked."""
  from sklearn.decomposition import PCA
  if not 0.0 < variance <= 1.0:
    raise UserError(f'PCA: variance must be in (0, 1]; got {variance!r}')
  if isinstance(max_components, bool) or not isinstance(max_components, (int, np.integer)) or max_components < 1:
    raise UserError(f'PCA: max_components must be a positive integer; got {max_components!r}')
  sets = [_flat(f'train set {i}', s) for i, s in enumerate(train_sets)]
  if not sets:
    raise UserError('PCA: no train sets given')
  if len({s.shape[1] for s in sets}) > 1:
    raise UserError(f'PCA: train sets differ in size per example: {[s.shape[1:] for s in sets]}')
  X = np.concatenate(sets)
  if X.shape[0] < 2:
    raise UserError(f'PCA: needs at least 2 train examples in all; got {X.shape[0]}')
  if not np.ptp(X, axis=0).any():
    raise UserError(f'PCA: the train images are constant (no variance); shape {X.shape}')
  m = min(max_components, X.shape[0], X.shape[1])
  pca = PCA(n_components=m, svd_solver=_exact_solver(*X.shape)).fit(X)
  cumulative = np.cumsum(pca.explained_variance_ratio_)
  if not np.isfinite(cumulative).all() or cumulative[-1] <= 0:
    raise UserError(f'PCA: the train images are constant (no variance); shape {X.shape}')
  k = min(m, int(np.searchsorted(cumulative, variance)) + 1)
  return pca, k, cumulative, sets


def pca_projection(train_sets, test_images, variance: float = VARIANCE,
                   max_components: int = MAX_COMPONENTS) -> tuple[list[np.ndarray], np.ndarray, int]:
  """Projects train_sets (each [N_t, ...]) and test_images [M, ...] on the top k PCA components of the stacked,
  flattened train sets (float64, raw scale, no scaling): k = min(m, 1 + searchsorted(cumulative explained-variance
  ratio, variance)) with m = min(max_components, total N, features) components fitted.

  Returns ([N_t, k] per train set, [M, k], k).
  """
  pca, k, _, sets = _fit_pca(train_sets, variance, max_components)
  test = _flat('test images', test_images)
  if test.shape[1] != sets[0].shape[1]:
    raise UserError(f'PCA: test images have {test.shape[1]} values per example, train images {sets[0].shape[1]}')
  return [pca.transform(s)[:, :k] for s in sets], pca.transform(test)[:, :k], k


# ------------------------------------------------------------------------------------------------------ W2


def _points(name: str, X) -> np.ndarray:
  A = np.asarray(X)
  if A.ndim != 2 or A.shape[0] == 0 or A.shape[1] == 0:
    raise UserError(f'w2: {name} must be a non-empty 2-D [n_points, dim] array; got shape {A.shape}')
  if A.dtype.kind not in 'biuf':
    raise UserError(f'w2: {name} must hold real numbers; got dtype {A.dtype}')
  A = A.astype(np.float64)
  if not np.isfinite(A).all():
    raise UserError(f'w2: {name} has NaN/inf values; shape {A.shape}')
  return A


def w2(x1, x2, num_iter_max: int | None = None) -> float:
  """Exact Wasserstein-2 distance between the uniform empirical distributions of x1 [n1, d] and x2 [n2, d].

  sqrt(min over couplings π of Σ π_ij ‖x1_i − x2_j‖²) by POT's network simplex (`ot.emd2`). The iteration cap
  defaults to max(10⁶, 50·n1·n2); a result that is not optimal (cap reached, infeasible) raises `UserError`.
  """
  import ot
  X1, X2 = _points('x1', x1), _points('x2', x2)
  if X1.shape[1] != X2.shape[1]:
    raise UserError(f'w2: x1 {X1.shape} and x2 {X2.shape} differ in dimension')
  n1, n2 = X1.shape[0], X2.shape[0]
  mean = (X1.sum(axis=0) + X2.sum(axis=0)) / (n1 + n2)
  cost = np.maximum(ot.dist(X1 - mean, X2 - mean, metric='sqeuclidean'), 0.0)
  cap = int(num_iter_max) if num_iter_max is not None else max(10 ** 6, 50 * n1 * n2)
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')  # POT warns on non-optimality; the result code below is checked instead
    value, log = ot.emd2(np.full(n1, 1.0 / n1), np.full(n2, 1.0 / n2), cost, numItermax=cap, log=True)
  if log.get('result_code') != _OPTIMAL:
    raise UserError(f'w2: exact optimal transport did not converge for {n1} x {n2} points in {X1.shape[1]} dims '
                    f'(POT result code {log.get("result_code")}: {log.get("warning")}; iteration cap {cap}); '
                    'use fewer samples (--max_samples) or a larger num_iter_max')
  return float(np.sqrt(max(float(value), 0.0)))


def _labels(name: str, y, n: int) -> np.ndarray:
  y = np.asarray(y)
  if y.ndim != 1 or y.shape[0] != n:
    raise UserError(f'conditional_w2: {name} must be 1-D with one label per point ({n}); got shape {y.shape}')
  if y.dtype.kind not in 'biu':
    raise UserError(f'conditional_w2: {name} must hold integer labels; got dtype {y.dtype}')
  return y


def conditional_w2_details(x1, y1, x2, y2, num_iter_max: int | None = None) -> dict:
  """Conditional W2 of labelled sets (x1 [n1, d], y1 [n1]) → (x2 [n2, d], y2 [n2]) with its parts.

  Σ_y P₂(y) W2(x1[y1 = y], x2[y2 = y]) / Σ_y P₂(y) over the labels in both sets, P₂(y) = #{y2 = y} / n2. Labels in
  only one set are skipped (the denominator renormalises when a label of the second set is missing from the first).
  Returns {'w2', 'covered_mass' (Σ P₂ over the labels compared), 'classes': {label: {'weight' (P₂, before
  renormalising), 'w2', 'n1', 'n2', 'seconds'}}, 'skipped_classes': {label: {'n1', 'n2'}}, 'seconds'}.
  """
  X1, X2 = _points('x1', x1), _points('x2', x2)
  y1, y2 = _labels('y1', y1, X1.shape[0]), _labels('y2', y2, X2.shape[0])
  tic = time.perf_counter()
  classes, skipped = {}, {}
  for label in np.union1d(y1, y2):
    in1, in2 = y1 == label, y2 == label
    n1, n2 = int(in1.sum()), int(in2.sum())
    if n1 == 0 or n2 == 0:
      skipped[int(label)] = {'n1': n1, 'n2': n2}
      continue
    start = time.perf_counter()
    value = w2(X1[in1], X2[in2], num_iter_max)
    classes[int(label)] = {'weight': n2 / X2.shape[0], 'w2': value, 'n1': n1, 'n2': n2,
                           'seconds': time.perf_counter() - start}
  if not classes:
    raise UserError(f'conditional_w2: the two sets share no label (first: {np.unique(y1).tolist()}, second: '
                    f'{np.unique(y2).tolist()})')
  covered = sum(c['weight'] for c in classes.values())
  value = sum(c['weight'] * c['w2'] for c in classes.values()) / covered
  return {'w2': float(value), 'covered_mass': float(covered), 'classes': classes, 'skipped_classes': skipped,
          'seconds': time.perf_counter() - tic}


def conditional_w2(x1, y1, x2, y2, num_iter_max: int | None = None) -> float:
  """Σ_y P₂(y) W2(x1|y, x2|y) (see `conditional_w2_details` for labels present in only one set)."""
  return conditional_w2_details(x1, y1, x2, y2, num_iter_max)['w2']


# ------------------------------------------------------------------------------------------------------ quantities


def _pair(name_from: str, name_to: str, X1, y1, X2, y2) -> dict:
  tic = time.perf_counter()
  covariate = w2(X1, X2)
  covariate_seconds = time.perf_counter() - tic
  cond = conditional_w2_details(X1, y1, X2, y2)
  classes = {str(k): v for k, v in cond['classes'].items()}
  return {'from': name_from, 'to': name_to, 'n1': int(len(y1)), 'n2': int(len(y2)),
          'covariate_w2': covariate, 'conditional_w2': cond['w2'], 'conditional_covered_mass': cond['covered_mass'],
          'classes': classes, 'skipped_classes': {str(k): v for k, v in cond['skipped_classes'].items()},
          'seconds': {'covariate_w2': covariate_seconds, 'conditional_w2': cond['seconds'],
                      'per_class_w2': {k: v['seconds'] for k, v in classes.items()}}}


def _subsample(rng: np.random.RandomState, images: np.ndarray, labels: np.ndarray, max_samples: int | None):
  if max_samples is None or len(labels) <= max_samples:
    return images, labels
  keep = np.sort(rng.choice(len(labels), max_samples, replace=False))
  return images[keep], labels[keep]


def quantify(sequence, seed: int, max_samples: int | None = None, variance: float = VARIANCE,
             max_components: int = MAX_COMPONENTS) -> dict:
  """All shift quantities of a `Sequence` (steps 0..T−1, the final step with a test split) as a JSON-ready dict.

  With `rng = RandomState(seed)`: if `max_samples` is set, every step's train set and then the final test set are
  subsampled to at most that many examples (without replacement, order kept); then the source train set is split
  by `rng.permutation` into halves (first ⌊n/2⌋, rest). Keys: 'setup', 'seed', 'step_names', 'max_samples',
  'sizes', 'pca' (components k, explained variance, ...), 'source_halves' (a), 'consecutive' (b, T−1 entries
  with 'from_step'/'to_step'), 'to_final_test' (c, T entries with 'from_step'), each entry with 'covariate_w2',
  'conditional_w2', per-class parts and seconds; 'ratios' (`ratio_tables`), 'seconds' (PCA, every W2 call and the
  total) and the original's six keys ('Covariate shift W2s', ..., 'Source conditional shift W2').
  """
  import ot  # noqa: F401 (imported here so that the first timed W2 does not include the import)
  tic = time.perf_counter()
  if max_samples is not None and (isinstance(max_samples, bool) or not isinstance(max_samples, (int, np.integer))
                                  or max_samples < 2):
    raise UserError(f'max_samples must be an integer of at least 2 (or None for all); got {max_samples!r}')
  steps = sequence.steps
  if len(steps) < 2:
    raise UserError(f'shift quantities need at least 2 time steps; the sequence has {len(steps)}')
  if steps[-1].test is None or len(steps[-1].test) == 0:
    raise UserError('shift quantities need a test set at the final step')
  rng = np.random.RandomState(seed)
  trains = [_subsample(rng, s.train.images, s.train.labels, max_samples) for s in steps]
  test_images, test_labels = _subsample(rng, steps[-1].test.images, steps[-1].test.labels, max_samples)
  if len(trains[0][1]) < 2:
    raise UserError(f'the source train set needs at least 2 examples to split in halves; got {len(trains[0][1])}')

  start = time.perf_counter()
  pca, k, cumulative, flat = _fit_pca([images for images, _ in trains], variance, max_components)
  projected = [pca.transform(f)[:, :k] for f in flat]
  test = pca.transform(_flat('final test images', test_images))[:, :k]
  pca_seconds = time.perf_counter() - start
  labels = [np.asarray(y) for _, y in trains]
  names = [s.name for s in steps]

  order = rng.permutation(len(labels[0]))
  first, second = order[:len(order) // 2], order[len(order) // 2:]
  halves = _pair('0 source train (half 1)', '0 source train (half 2)', projected[0][first], labels[0][first],
                 projected[0][second], labels[0][second])
  consecutive = []
  for t in range(1, len(steps)):
    entry = _pair(f'{t - 1} {names[t - 1]} train', f'{t} {names[t]} train', projected[t - 1], labels[t - 1],
                  projected[t], labels[t])
    consecutive.append({'from_step': t - 1, 'to_step': t, **entry})
  final = len(steps) - 1
  to_final = []
  for t in range(len(steps)):
    entry = _pair(f'{t} {names[t]} train', f'{final} {names[final]} test', projected[t], labels[t], test,
                  np.asarray(test_labels))
    to_final.append({'from_step': t, **entry})

  w2_seconds = [e['seconds']['covariate_w2'] for e in [halves, *consecutive, *to_final]]
  w2_seconds += [s for e in [halves, *consecutive, *to_final] for s in e['seconds']['per_class_w2'].values()]
  result = {
      'setup': sequence.setup, 'seed': int(seed), 'step_names': names, 'max_samples': max_samples,
      'sizes': {'train': [int(len(y)) for y in labels], 'final_test': int(len(test_labels)),
                'source_halves': [int(len(first)), int(len(second))]},
      'pca': {'components': int(k), 'explained_variance': float(cumulative[k - 1]),
              'fitted_components': int(len(cumulative)), 'fitted_explained_variance': float(cumulative[-1]),
              'variance_target': float(variance), 'max_components': int(max_components),
              'features': int(flat[0].shape[1]), 'fit_examples': int(sum(len(f) for f in flat)),
              'seconds': pca_seconds},
      'source_halves': halves, 'consecutive': consecutive, 'to_final_test': to_final,
  }
  result['ratios'] = ratio_tables(result)
  result['seconds'] = {'pca': pca_seconds, 'w2_calls': len(w2_seconds), 'w2_total': float(sum(w2_seconds)),
                       'w2_max': float(max(w2_seconds)), 'total': time.perf_counter() - tic}
  # The original's keys, so its summarize_shift_quantities.py reads this file unchanged.
  result.update({'Covariate shift W2s': [e['covariate_w2'] for e in consecutive],
                 'Conditional shift W2s': [e['conditional_w2'] for e in consecutive],
                 'Covariate shift relative to final test W2s': [e['covariate_w2'] for e in to_final],
                 'Conditional shift relative to final test W2s': [e['conditional_w2'] for e in to_final],
                 'Source covariate shift W2': halves['covariate_w2'],
                 'Source conditional shift W2': halves['conditional_w2']})
  return result


def _ratio(a: float, b: float) -> float | None:
  return float(a / b) if b > 0 else None


def ratio_tables(quantities: dict) -> dict:
  """The four ratio tables of original.md S2F §5.5 from `quantify`'s dict: {name: {'columns', 'values', 'description'}}.

  'covariate_shift' / 'conditional_shift' (Table 4): W2(step t−1 → t) / W2(source half 1 → half 2), t = 1..T−1;
  '*_relative_to_final' (Table 5): W2(step t train → final test) / W2(final train → final test), t = 0..T−2.
  A zero denominator gives None.
  """
  names = quantities['step_names']
  halves, consecutive, to_final = (quantities[k] for k in ('source_halves', 'consecutive', 'to_final_test'))
  tables = {}
  for kind in ('covariate', 'conditional'):
    key = f'{kind}_w2'
    tables[f'{kind}_shift'] = {
        'columns': [f'{names[e["from_step"]]} → {names[e["to_step"]]}' for e in consecutive],
        'values': [_ratio(e[key], halves[key]) for e in consecutive],
        'description': f'{kind} W2 between consecutive steps / {kind} W2 between the source train halves'}
    tables[f'{kind}_shift_relative_to_final'] = {
        'columns': [names[e['from_step']] for e in to_final[:-1]],
        'values': [_ratio(e[key], to_final[-1][key]) for e in to_final[:-1]],
        'description': f'{kind} W2 from each step\'s train set to the final test set / {kind} W2 from the final '
                       'train set to the final test set'}
  return {name: tables[name] for name in TABLES}


# ------------------------------------------------------------------------------------------------------ output


def latex_row(setup: str, values) -> str:
  """'<setup> & r1 & r2 \\\\' (the original's table row; ratios to 2 decimals, None as '---')."""
  cells = ['---' if v is None else f'{v:.2f}' for v in values]
  return ' & '.join([latex_escape(setup)] + cells) + ' \\\\\n'


def _md_cell(value) -> str:
  return 'n/a' if value is None else f'{value:.3f}'


def format_markdown(quantities: dict) -> str:
  """The W2 values and Tables 4–5 (ratios) as Markdown."""
  q = quantities
  pca = q['pca']
  out = [f'## Shift quantities: {q["setup"]}, seed {q["seed"]}\n',
         f'W2 on {pca["components"]} PCA components ({100 * pca["explained_variance"]:.1f}% of the variance of '
         f'{pca["fit_examples"]} train images with {pca["features"]} values); total {q["seconds"]["total"]:.1f} s, '
         f'{q["seconds"]["w2_calls"]} W2 computations, the slowest {q["seconds"]["w2_max"]:.3f} s.\n']
  rows = []
  for tag, entries in (('(a)', [q['source_halves']]), ('(b)', q['consecutive']), ('(c)', q['to_final_test'])):
    for e in entries:
      skipped = (f' (labels {", ".join(e["skipped_classes"])} skipped; P₂ mass compared '
                 f'{e["conditional_covered_mass"]:.2f})' if e['skipped_classes'] else '')
      rows.append([tag, f'{e["from"]} → {e["to"]}', f'{e["n1"]} → {e["n2"]}', f'{e["covariate_w2"]:.2f}',
                   f'{e["conditional_w2"]:.2f}{skipped}',
                   f'{e["seconds"]["covariate_w2"] + e["seconds"]["conditional_w2"]:.3f}'])
  out.append(markdown_table(['', 'Sets', 'Examples', 'Covariate W2', 'Conditional W2', 'Seconds'], rows) + '\n')
  ratios = q['ratios']
  for title, stem in (('Table 4: consecutive-step shift / source-halves shift', 'shift'),
                      ('Table 5: step train → final test, relative to final train → final test',
                       'shift_relative_to_final')):
    columns = ratios[f'covariate_{stem}']['columns']
    rows = [[kind.capitalize()] + [_md_cell(v) for v in ratios[f'{kind}_{stem}']['values']]
            for kind in ('covariate', 'conditional')]
    out.append(f'\n### {title}\n')
    out.append(markdown_table(['Shift'] + columns, rows) + '\n')
  return '\n'.join(out)


def write_outputs(quantities: dict, directory: str) -> list[str]:
  """Writes `shift_quantities.json`, `shift_quantities.md` and, per ratio table, `<name>_ratios_table.txt` (the
  original's LaTeX row) and `<name>_ratios_table.md` into `directory` (each via a temporary file and a rename)."""
  os.makedirs(directory, exist_ok=True)
  files = {JSON_NAME: json.dumps(quantities, indent=1, allow_nan=False) + '\n',
           'shift_quantities.md': format_markdown(quantities)}
  for name, table in quantities['ratios'].items():
    files[f'{name}_ratios_table.txt'] = latex_row(quantities['setup'], table['values'])
    files[f'{name}_ratios_table.md'] = markdown_table(
        ['Setup'] + table['columns'], [[quantities['setup']] + [_md_cell(v) for v in table['values']]]) + '\n'
  paths = []
  for name, text in files.items():
    path = os.path.join(directory, name)
    write_atomic(path, text)
    paths.append(path)
  return paths
