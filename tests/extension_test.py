"""A method, a dataset, a shift and a study registered from outside the package (this file), run through the CLI.

The config file the test writes imports this module and calls `register`, which adds `source_only` (ERM on one step,
`source_only.train_step` of its own config section, tested on the final step), the dataset `digits_upside_down`, the shift block `invert` and the study `class_counts`;
`experiments/main.py` then validates and runs them like built-in ones.
"""
import json
import os
import runpy

import ml_collections
import numpy as np

from conftest import assert_user_error, ROOT, run_script
from s2f_jax import experiment, studies
from s2f_jax.data import SequenceSpec, ShiftKind, build_sequence, datasets, register_shift, shifts, sources
from s2f_jax.errors import UserError
from s2f_jax.methods import Method, register_config_section, register_method
from s2f_jax.methods.base import ConfigSection, RunContext, result_row


def source_only(ctx: RunContext) -> list[dict]:
  """ERM on the train set of step `source_only.train_step` (default 0, the source), selected on its valid set, tested
  on the final step."""
  t = ctx.config.source_only.train_step
  selection = ctx.train_stage('source', ctx.init_variables(), ctx.grid(), ctx.examples([t]),
                              ctx.examples([t], 'valid'))
  return [result_row('source_only', selection, ctx.test_accuracy(selection.winner()))]


def source_only_defaults() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({'train_step': 0})


def check_source_only(config, methods) -> None:
  if 'source_only' in methods and config.source_only.train_step < 0:
    raise UserError(f'source_only.train_step={config.source_only.train_step} must be a step index (>= 0)')


def upside_down_digits(root, image_size):
  """scikit-learn's digits turned upside down (rows reversed)."""
  d = datasets.load_digits(image_size)
  return datasets.BaseDataset('digits_upside_down', d.train_images[:, ::-1], d.train_labels, d.test_images[:, ::-1],
                              d.test_labels, d.class_names)


def invert(splits, count, rng, num_classes):
  """A shift kind's apply: every invert block so far flips the pixel values (255 − x)."""
  return [(255 - x if count % 2 else x, y) for x, y in splits]


INVERT = ShiftKind(('invert',), lambda num_classes: 0, lambda count, blocks, where: count + ('invert' in blocks), invert)


def class_counts(config, workdir) -> str:
  """A study: the class counts of every step's train split, one line per step (nothing trained or written)."""
  sequence = experiment.load_sequence(config)
  return '\n'.join(f'{step.name}: {np.bincount(step.train.labels, minlength=10).tolist()}' for step in sequence.steps)


def register():
  """What a user's config file calls before the run (here in the experiment's own process only)."""
  register_method('source_only', Method(source_only, 'ERM on the source step only'))
  register_config_section(ConfigSection('source_only', source_only_defaults, check_source_only))
  sources.register_source('digits_upside_down', upside_down_digits)
  studies.register_study('class_counts', studies.Study(class_counts, 'class counts per step'))
  register_shift('invert', INVERT)

CONFIG = f'''
import runpy, sys
sys.path.insert(0, {os.path.join(ROOT, 'tests')!r})
import extension_test
extension_test.register()


def get_config():
  c = runpy.run_path({os.path.join(ROOT, 'configs', 'default.py')!r})['get_config']()
  c.method = 'source_only'
  c.data.name = 'digits_upside_down'
  c.data.shift_sequence = 'rotation:invert,corruption'
  c.num_epochs, c.model.width = 2, 8
  c.data.source_size, c.data.target_sizes, c.data.test_size = 200, '100', 100
  c.grid.learning_rate, c.grid.weight_decay = (1e-3, 1e-2), (1e-4,)
  c.grid.dropout = (0.0,)
  return c
'''


def _main(config, workdir, *args):
  return run_script('experiments/main.py', f'--config={config}', f'--workdir={workdir}', *args)


def test_registered_method_and_dataset_run_through_the_cli(tmp_path):
  config = tmp_path / 'toy.py'
  config.write_text(CONFIG)
  workdir = tmp_path / 'work'
  proc = _main(config, workdir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'source_only' in proc.stdout
  method_dir = workdir / 'source_only'
  assert (method_dir / 'DONE').exists()
  saved = json.loads((method_dir / 'config.json').read_text())['config']
  assert saved['method'] == 'source_only' and saved['data']['name'] == 'digits_upside_down'
  assert saved['source_only'] == {'train_step': 0}  # the method's own section, in base_config and config.json
  history = [json.loads(line) for line in (method_dir / 'history.jsonl').read_text().splitlines()]
  assert {h['stage'] for h in history} == {'source'} and {h['run'] for h in history} == {0, 1}
  row = json.loads((method_dir / 'metrics.jsonl').read_text().splitlines()[0])
  best = max(h['valid_accuracy'] for h in history)  # the selected run's best epoch on the source valid set
  assert row['Method'] == 'source_only' and np.isclose(row['Validation accuracy'], best)
  assert 0.0 <= row['Test accuracy'] <= 1.0

  again = _main(config, workdir)  # finished: skipped
  assert again.returncode == 0 and 'skipping' in again.stderr

  bad = _main(config, tmp_path / 'bad', '--config.method=source_onyl')  # the registry drives the choices
  assert_user_error(bad.returncode, bad.stderr, ['source_onyl', 'source_only', 'erm_final'])
  bad = _main(config, tmp_path / 'bad', '--config.source_only.train_step=-1')  # the section checks itself
  assert_user_error(bad.returncode, bad.stderr, ['source_only.train_step=-1'])
  assert not (tmp_path / 'bad').exists()


def test_registered_study_and_study_errors_through_the_cli(tmp_path):
  config = tmp_path / 'toy.py'
  config.write_text(CONFIG)
  proc = _main(config, tmp_path / 'w', '--config.experiment=class_counts')
  assert proc.returncode == 0, proc.stderr[-3000:]
  sequence = experiment.load_sequence(runpy.run_path(str(config))['get_config']())  # the same steps, here
  assert proc.stdout.splitlines() == [f'{s.name}: {np.bincount(s.train.labels, minlength=10).tolist()}'
                                      for s in sequence.steps]
  bad = _main(config, tmp_path / 'bad', '--config.experiment=class_count')
  assert_user_error(bad.returncode, bad.stderr, ['class_count', 'benchmark', 'hessian', 'stitching', 'class_counts'])
  bad = _main(config, tmp_path / 'bad', '--config.experiment=stitching')  # a study whose section is missing
  assert_user_error(bad.returncode, bad.stderr, ['no stitching section', 'stitching_config()'])
  assert not (tmp_path / 'bad').exists()


def test_registered_shift_inverts_the_images_of_its_steps(monkeypatch):
  register()
  base = datasets.load_digits(16)
  spec = SequenceSpec.parse('rotation:invert,corruption', 100, '60', 40)
  inverted = build_sequence(spec, base)
  monkeypatch.setitem(shifts.SHIFT_KINDS, 'invert', ShiftKind(('invert',), INVERT.start, INVERT.advance))  # no-op
  plain = build_sequence(spec, base)
  assert [a.name for a in inverted.steps] == ['source', 'rotation', 'invert,corruption']
  for a, b in zip(inverted.steps, plain.steps):
    flipped = a.name == 'invert,corruption'
    np.testing.assert_array_equal(a.train.images, 255 - b.train.images if flipped else b.train.images)
    np.testing.assert_array_equal(a.train.labels, b.train.labels)
