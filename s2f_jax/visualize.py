"""The three weight-space visualisations of finished runs (original.md S2F §5.1–§5.3), from the models the runs stored.

- `linear_interpolate`: final-step test accuracy along θ(α) between each method's init and final model
  (`interpolation.PATH_PAIRS`), one figure per run and one merged figure per (setup, seed) across architectures.
- `weight_proj`: every model's coordinates on the historical-shift / limited-sample axes (`projection`).
- `cca`: mean SVCCA with the oracle's activations at 50% and 90% variance (`activations`).

weight_proj and cca need three reference models: the oracle (`erm_final` of a run whose final step is larger and
everything else equal, e.g. a sweep's oracle job), `erm_final` of the run itself (limited) and ERM on the history
(the shared `erm_all_prev` stage of any fine-tune method). Single models are points, fine-tune methods arrows
(history model → fine-tuned), sequential methods and joint models (mode `separate`) paths over the time steps;
side-tuned and adapter models are left out, as in the original.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from s2f_jax import experiment
from s2f_jax.analysis import activations as activations_lib
from s2f_jax.analysis.interpolation import interpolation_accuracy, path_family, save_interpolation, \
    save_merged_interpolation
from s2f_jax.analysis.projection import ENTIRE, PAPER_PANELS, save_projection, weight_projection
from s2f_jax.errors import UserError
from s2f_jax.methods.adapted import side_layer_sizes
from s2f_jax.methods.base import RunContext
from s2f_jax.models import make_side_tuned
from s2f_jax.results import stored
from s2f_jax.results.summary import architecture_label
from s2f_jax.training.loop import Examples, Learner

log = logging.getLogger('s2f_jax')
PyTree = Any
REPRESENTATIONS = ('linear_interpolate', 'weight_proj', 'cca')
SINGLE_MODEL = re.compile(r'(erm_final|erm_all|irm_all|dro_all)(_.*)?')  # method directories drawn as points


@dataclasses.dataclass
class Run:
  """A finished run workdir: its data and model (rebuilt from its config) and its finished methods."""
  directory: str
  ctx: RunContext
  methods: dict[str, stored.StoredMethod]

  @property
  def architecture(self) -> str:
    m = self.ctx.config.model
    return architecture_label(f'{m.name} {m.num_blocks} blocks')

  @property
  def title(self) -> str:
    return f'{self.architecture}, seed {self.ctx.config.seed}\n{self.ctx.sequence.setup}'

  def context(self, method: stored.StoredMethod) -> RunContext:
    """The run's context with `method`'s config (same data and model)."""
    return dataclasses.replace(self.ctx, config=method.config, workdir=self.directory)

  def load(self, ref) -> PyTree:
    return stored.load_variables(self.directory, ref)


def open_run(run_dir: str) -> Run:
  """Rebuilds a finished run's data and model from its first method's config."""
  found = stored.methods(run_dir)
  if not found:
    raise UserError(f'{run_dir!r} holds no finished method')
  _, ctx = experiment.prepare(next(iter(found.values())).config)
  return Run(run_dir, ctx, found)


# ----------------------------------------------------------------------------------------------- models per method


def _joint_path(run: Run, method: stored.StoredMethod) -> tuple[Learner, list[PyTree]]:
  from s2f_jax.methods.joint import joint_setup
  ctx = run.context(method)
  if method.config.joint.mode != 'separate':
    raise UserError(f'{method.name}: joint mode {method.config.joint.mode!r} has no per-step block models to draw '
                    '(only mode separate)')
  model, layout = joint_setup(ctx, method.row['Separate layers'])
  joint = run.load(stored.stage_ref(method.row))
  steps = [jax.device_get(layout.step_variables(joint, t)) for t in range(ctx.num_steps)]
  return ctx.learner(model=model), steps


def _side_tune_pair(run: Run, method: stored.StoredMethod) -> tuple[Learner, PyTree, PyTree]:
  """Final side-tuned variables and the same with the newest side modules' BN scale and bias at 0."""
  c = method.config
  if c.adapter.side_layer_sizes == 'block' or c.adapter.all_layers_efficient or method.name.startswith('joint'):
    raise UserError(f'{method.name}: interpolation covers conv-chain side modules of erm/sequential side-tuning '
                    '(not block copies, adapter.all_layers_efficient or joint side-tuning)')
  ctx = run.context(method)
  num_sides = ctx.num_steps - 1 if method.name.startswith('sequential') else 1
  model = make_side_tuned(c.model.name, c.model.num_blocks, ctx.sequence.num_classes, c.model.width,
                          side_layer_sizes(c), False, not c.compat.convnet_no_relu).clone(
                              num_sides=num_sides)
  final = run.load(stored.stage_ref(method.row))
  params = dict(final['params'])
  for name in model.side_names(num_sides - 1):
    params[name] = {**params[name], 'bn': jax.tree_util.tree_map(np.zeros_like, params[name]['bn'])}
  return ctx.learner(model=model), {**final, 'params': params}, final


def interpolation_pair(run: Run, method: stored.StoredMethod) -> tuple[Learner, PyTree, PyTree]:
  """(learner, init variables, final variables) of a method's interpolation path (original.md S2F §5.1, `PATH_PAIRS`);
  UserError for methods without one."""
  family = path_family(method.name)
  row = method.row
  if family == 'side_tune':
    return _side_tune_pair(run, method)
  if family == 'joint':
    learner, steps = _joint_path(run, method)
    return learner, steps[-2], steps[-1]
  if family == 'sequential':
    steps = row.get('Step stages')
    if not steps:
      raise UserError(f'{method.name}: no per-step models recorded (adapter methods have no interpolation path)')
    return run.ctx.learner(), run.load(steps[-2]), run.load(steps[-1])
  return run.ctx.learner(), run.load(stored.stage_ref(row, 'Start stage')), run.load(stored.stage_ref(row))


def model_path(run: Run, method: stored.StoredMethod) -> list[PyTree]:
  """The block-model variables a method is drawn with in weight_proj / cca: one (single models), two (history model
  → fine-tuned) or one per time step (sequential, joint); UserError for methods left out."""
  name, row = method.name, method.row
  if 'side_tune' in name or 'low_rank' in name or 'frozen_joint' in name:
    raise UserError(f'{name}: side-tuned and adapter models are not drawn (original.md S2F §5.2)')
  if SINGLE_MODEL.fullmatch(name):
    return [run.load(stored.stage_ref(row))]
  family = path_family(name)
  if family == 'joint':
    return _joint_path(run, method)[1]
  if family == 'sequential':
    return [run.load(ref) for ref in row['Step stages']]
  return [run.load(stored.stage_ref(row, 'Start stage')), run.load(stored.stage_ref(row))]


def _each(run: Run, make) -> tuple[dict, dict[str, str]]:
  """{method: make(method)} over a run's methods, and {method: reason} for those `make` rejects."""
  done, skipped = {}, {}
  for name, method in run.methods.items():
    try:
      done[name] = make(method)
    except UserError as e:
      skipped[name] = str(e)
  return done, skipped


# ---------------------------------------------------------------------------------------------------- references


def _final_size(run: Run) -> int:
  return len(run.ctx.sequence.final.train.labels) + len(run.ctx.sequence.final.valid.labels)


def _comparable(config) -> tuple:
  d, m = config.data, config.model
  return (d.name, d.shift_sequence, d.source_size, str(d.target_sizes).split(':')[:-1], d.image_size, d.test_size,
          m.name, m.num_blocks, m.width, config.seed)


def find_oracle(run: Run, run_dirs: Sequence[str]) -> tuple[str, list]:
  """(run dir, stage ref) of the oracle for `run`: `erm_final` of the run among `run_dirs` with the same data,
  model and seed and the largest final step, larger than `run`'s."""
  key = _comparable(next(iter(run.methods.values())).config)
  best = None
  for d in run_dirs:
    if d == run.directory:
      continue
    for method in stored.methods(d).values():
      if method.name == 'erm_final' and _comparable(method.config) == key:
        size = int(str(method.config.data.target_sizes).split(':')[-1])
        if best is None or size > best[0]:
          best = (size, d, stored.stage_ref(method.row))
  own = int(str(run.ctx.config.data.target_sizes).split(':')[-1])
  if best is None or best[0] <= own:
    raise UserError(f'{run.directory}: no oracle run (erm_final with a final step larger than {own}, same data, '
                    'model and seed) under the root; sweeps add one per run folder (variant oracle)')
  return best[1], list(best[2])


def references(run: Run, run_dirs: Sequence[str]) -> dict[str, PyTree]:
  """{'oracle', 'historical', 'limited'} variables of a run (see the module docstring)."""
  limited = run.methods.get('erm_final')
  if limited is None:
    raise UserError(f'{run.directory}: no erm_final (the limited-sample reference); run it in this folder')
  history = os.path.join('shared', experiment.shared_fingerprint(limited.config), 'stages', 'erm_all_prev')
  if not os.path.isdir(os.path.join(run.directory, history)):
    raise UserError(f'{run.directory}: no ERM model of the history ({history}); run erm_fine_tune in this folder')
  oracle_dir, oracle_ref = find_oracle(run, run_dirs)
  return {'oracle': stored.load_variables(oracle_dir, oracle_ref), 'historical': run.load((history, 0)),
          'limited': run.load(stored.stage_ref(limited.row))}


# ----------------------------------------------------------------------------------------------------- computing


def interpolation_curves(run: Run, num_points: int = 101) -> tuple[dict[str, dict], dict[str, str]]:
  """({method: {'alpha': [A], 'accuracy': [A]}} on the final step's test set, {method: why skipped})."""
  test = Examples.concat([run.ctx.sequence.final.test])
  eval_batch = run.ctx.config.train.eval_batch_size

  def curve(method):
    learner, init, final = interpolation_pair(run, method)
    alphas, _, acc = interpolation_accuracy(learner, init, final, test, num_points, eval_batch)
    return {'alpha': alphas.tolist(), 'accuracy': acc.tolist()}
  return _each(run, curve)


def projection(run: Run, run_dirs: Sequence[str]) -> tuple[dict, dict[str, str]]:
  """(`weight_projection` coordinates {panel: {method: [K, 2]}}, {method: why skipped})."""
  refs = references(run, run_dirs)
  paths, skipped = _each(run, lambda m: model_path(run, m))
  coords = weight_projection(paths, refs['oracle'], refs['historical'], refs['limited'])
  return coords, skipped


def cca(run: Run, run_dirs: Sequence[str], variance_from_squares: bool = True) -> tuple[dict, dict[str, str]]:
  """(`activations.cca_coordinates` {panel: {method: [K, 2]}} on the final step's test images, {method: why
  skipped}); `variance_from_squares=False` is the original's variance from singular values (compat)."""
  oracle_dir, oracle_ref = find_oracle(run, run_dirs)
  images, model, scaling = run.ctx.sequence.final.test.images, run.ctx.model, run.ctx.scaling
  acts = lambda v: activations_lib.layer_activations(model, v, images, scaling)
  oracle = acts(stored.load_variables(oracle_dir, oracle_ref))
  paths, skipped = _each(run, lambda m: [acts(v) for v in model_path(run, m)])
  return activations_lib.cca_coordinates(paths, oracle, variance_from_squares=variance_from_squares), skipped


# ------------------------------------------------------------------------------------------------------- writing


def _file_name(text: str) -> str:
  return re.sub(r'[^A-Za-z0-9_.-]+', '_', text)


def _stem(root: str, run_dir: str) -> str:
  rel = os.path.relpath(run_dir, root)
  return 'run' if rel == '.' else _file_name(rel.replace(os.sep, '__'))


def _to_json(obj):
  if isinstance(obj, dict):
    return {k: _to_json(v) for k, v in obj.items()}
  return np.asarray(obj).tolist() if isinstance(obj, np.ndarray) else obj


def visualize(root: str, representation: str, out: str | None = None, num_points: int = 101,
              compat_cca_variance: bool = False, fmt: str = 'pdf') -> list[str]:
  """Computes `representation` for every run under `root` and writes figures (`fmt`: pdf or png) and JSON to `out`
  (default `<root>/visualizations`), each run's files as `<run path>_<representation>.{fmt,json}`, and for
  linear_interpolate one merged figure per (setup, seed) over architectures. Returns the written paths."""
  if representation not in REPRESENTATIONS:
    raise UserError(f'unknown representation {representation!r}; valid choices: {", ".join(REPRESENTATIONS)}')
  if fmt not in ('pdf', 'png'):
    raise UserError(f'unknown figure format {fmt!r}; valid choices: pdf, png')
  run_dirs = stored.find_runs(root)
  out = out or os.path.join(root, 'visualizations')
  results, merged = [], {}
  for run_dir in run_dirs:
    run = open_run(run_dir)
    try:
      if representation == 'linear_interpolate':
        data, skipped = interpolation_curves(run, num_points)
        merged.setdefault((run.ctx.sequence.setup, run.ctx.config.seed), {})[run.architecture] = data
      elif representation == 'weight_proj':
        data, skipped = projection(run, run_dirs)
      else:
        data, skipped = cca(run, run_dirs, variance_from_squares=not compat_cca_variance)
    except UserError as e:
      if len(run_dirs) == 1:
        raise
      log.warning('skipping %s: %s', run_dir, e)  # e.g. an oracle folder, which has no references of its own
      continue
    for name, why in skipped.items():
      log.info('%s: %s', name, why)
    results.append((run, data, skipped))
  if not results:
    raise UserError(f'no run under {root!r} could be drawn as {representation}')
  os.makedirs(out, exist_ok=True)
  written = []
  for run, data, skipped in results:
    if not data:
      continue  # e.g. an oracle folder holding only erm_final, which has no interpolation path
    path = os.path.join(out, f'{_stem(root, run.directory)}_{representation}')
    if representation == 'linear_interpolate':
      save_interpolation({k: (v['alpha'], v['accuracy']) for k, v in data.items()}, f'{path}.{fmt}', run.title)
      written.append(f'{path}.{fmt}')
    else:
      paper = run.ctx.config.model.num_blocks == 4  # the 2×2 figure of original.md S2F §5.2; else every layer
      panels = list(PAPER_PANELS) if paper else [*[p for p in data if p != ENTIRE], ENTIRE]
      kwargs = {} if representation == 'weight_proj' else {
          'axes_labels': ('mean SVCCA, 50% variance', 'mean SVCCA, 90% variance'), 'oracle_at': (1.0, 1.0),
          'limits': (-0.05, 1.05)}
      save_projection(data, f'{path}.{fmt}', panels, run.title, **kwargs)
      written.append(f'{path}.{fmt}')
    with open(path + '.json', 'w') as f:
      json.dump({'run': run.directory, 'representation': representation, 'data': _to_json(data),
                 'skipped': skipped}, f, indent=1)
    written.append(path + '.json')
  for (setup, seed), panels in merged.items():
    if len(panels) > 1 and any(panels.values()):
      path = os.path.join(out, f'{_file_name(setup)}_seed{seed}_all_architectures'
                               f'_linear_interpolate.{fmt}')
      save_merged_interpolation({a: {k: (v['alpha'], v['accuracy']) for k, v in c.items()} for a, c in
                                 panels.items()}, path, f'seed {seed}\n{setup}')
      written.append(path)
  return written
