"""The model-patching experiment end to end on tiny digits: stage 1, the three methods, metrics and read-back."""
import json
import os

import numpy as np
import pytest

from conftest import run_script, tiny_config
from s2f_jax.errors import UserError
from s2f_jax.patching import experiment


def _config(**overrides):
  p = experiment.patching_config()
  p.correlation, p.num_epochs, p.batch_size = 0.9, 2, 32
  p.stage1.update(num_epochs=2, batch_size=16, generator_widths=(4, 8, 8, 8), discriminator_widths=(4, 8),
                  discriminator_final=8)
  return tiny_config({'patching': p}, **overrides)


@pytest.fixture(scope='module')
def finished(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('patching')
  return str(workdir), experiment.run(_config(), str(workdir))


@pytest.mark.slow
def test_rows_hold_consistent_group_metrics(finished):
  workdir, rows = finished
  assert [r['method'] for r in rows] == ['erm', 'gdro', 'camel']
  out = os.path.join(workdir, 'model_patching')
  assert {'results.csv', 'results.jsonl', 'table.md', 'config.json', 'stage1_gallery_0.png',
          'stage1_gallery_1.png'} <= set(os.listdir(out))
  for r in rows:
    acc = r['group_accuracies']
    assert list(acc) == ['even/clean', 'even/recolor:recolor', 'odd/clean', 'odd/recolor:recolor']
    values = np.array(list(acc.values()))
    assert r['robust_accuracy'] == pytest.approx(values.min())
    assert r['aggregate_accuracy'] == pytest.approx(values.mean())  # the balanced test: equal group sizes
    assert r['subgroup_gap'] == pytest.approx(max(abs(values[0] - values[1]), abs(values[2] - values[3])))
    assert 0.0 <= r['valid_robust_accuracy'] <= 1.0
  assert 'consistency_weight' in rows[2]['hyper_parameters']
  sizes = rows[0]['train_sizes']
  assert sizes['even/recolor:recolor'] < sizes['even/clean'] and sizes['odd/clean'] < sizes['odd/recolor:recolor']


@pytest.mark.slow
def test_selection_uses_validation_worst_group_accuracy(finished):
  workdir, rows = finished
  with open(os.path.join(workdir, 'stage2', 'history.jsonl')) as f:
    history = [json.loads(line) for line in f]
  for r in rows:
    records = [h for h in history if h['stage'] == r['method']]
    assert r['valid_robust_accuracy'] == pytest.approx(max(h['valid_worst_group_accuracy'] for h in records))


@pytest.mark.slow
def test_stage1_views_are_stored_by_example_id(finished):
  workdir, _ = finished
  stored = np.load(os.path.join(workdir, 'stage1', 'augmentations.npz'))
  data = experiment.load_groups(_config())
  assert stored['views'].shape == (len(data.train), 2) + data.train.images.shape[1:]
  np.testing.assert_array_equal(stored['ids'], data.train.ids)


@pytest.mark.slow
def test_finished_experiment_is_read_back(finished, monkeypatch):
  workdir, rows = finished
  monkeypatch.setattr(experiment, 'stage1_views', lambda *a: pytest.fail('retrained a finished experiment'))
  assert experiment.run(_config(), workdir) == json.loads(json.dumps(rows))


@pytest.mark.parametrize('override, message', [
    ({'patching.methods': 'erm,jtt'}, "unknown patching method 'jtt'; valid choices: erm, gdro, irm, camel"),
    ({'patching.consistency': 'js'}, "unknown patching.consistency 'js'"),
    ({'patching.batch_size': 2}, 'gives no example per group'),
    ({'patching.stage1.batch_size': 500}, 'larger than the smallest CycleGAN domain'),
])
def test_bad_settings_fail_before_writing(tmp_path, override, message):
  with pytest.raises(UserError, match=message):
    experiment.run(_config(**override), str(tmp_path / 'w'))
  assert not (tmp_path / 'w').exists()


def test_cli_bad_method_is_one_line_exit_2(tmp_path):
  proc = run_script('experiments/model_patching.py', '--config=configs/model_patching.py',
                    f'--workdir={tmp_path / "w"}', '--config.patching.methods=erm,jtt')
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1].endswith('valid choices: erm, gdro, irm, camel')
  assert len(proc.stderr.strip().splitlines()) == 1
  assert not (tmp_path / 'w').exists()
