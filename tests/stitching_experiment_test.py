"""The stitching experiment end to end on tiny digits: one row per layer pair with consistent scores, the
specificity arithmetic, the sensitivity test at full rank, read-back, and bad input."""
from __future__ import annotations

import os

import numpy as np
import pytest

from s2f_jax.analysis import similarity
from s2f_jax.errors import UserError
from s2f_jax.results import writer
from s2f_jax.stitching import layer_pairs

from conftest import run_script, tiny_config

TINY = {'data.source_size': 300, 'model.num_blocks': 1, 'model.width': 4, 'stitching.tlm_epochs': 1, 'stitching.ranks': (1, 4),
        'stitching.probe_epochs': 5, 'stitching.similarity_samples': 60, 'stitching.dm_samples': 20,
        'stitching.detector.pretrain_epochs': 2, 'stitching.detector.finetune_epochs': 1,
        'stitching.detector.width': 8, 'stitching.detector.batch_size': 64,
        'grid.learning_rate': (1e-3,), 'grid.weight_decay': (1e-4,), 'grid.dropout': (0.0,)}


def config(**overrides):
  return tiny_config(sections={'stitching': layer_pairs.stitching_config()}, **{**TINY, **overrides})


@pytest.fixture(scope='module')
def finished(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('stitching'))
  return workdir, layer_pairs.run(config(), workdir)


@pytest.mark.slow
def test_one_row_per_layer_pair(finished):
  _, out = finished
  rows = out['pairs']
  assert [(r['front_layer'], r['end_layer']) for r in rows] == [('conv1', 'conv1'), ('conv1', 'layer1'),
                                                                 ('layer1', 'conv1'), ('layer1', 'layer1')]
  for r in rows:
    assert 0 <= r['dm_accuracy'] <= 1 and 0 <= r['tlm_accuracy'] <= 1
    assert r['dm_structural'] >= 0 and 0 <= r['dm_auroc'] <= 1 and 0 <= r['tlm_auroc'] <= 1
    assert -1e-9 <= r['cka'] <= 1 + 1e-9 and 0 <= r['procrustes'] <= 2
  # DM minimises the structural error on its fitting images; on held-out images it still beats TLM, which is
  # trained for the task only.
  assert np.mean([r['dm_structural'] for r in rows]) < np.mean([r['tlm_structural'] for r in rows])


def test_specificity_by_hand():
  rows = [{'front_layer': f, 'end_layer': e, **{k: v for k, v in zip(layer_pairs.SIMILARITY_SCORES, values)}}
          for (f, e), values in {('a', 'a'): (0.9, 0.1, 0.5, 0.9, 0.1, 0.1), ('a', 'b'): (0.8, 0.2, 0.9, 0.5, 0.2, 0.3),
                                 ('b', 'a'): (0.7, 0.05, 0.6, 0.6, 0.3, 0.2), ('b', 'b'): (0.6, 0.3, 0.8, 0.7, 0.4, 0.1)
                                 }.items()]
  spec = layer_pairs.specificity(rows, ('a', 'b'))
  assert spec['dm_accuracy']['best_end_layer'] == {'a': 'a', 'b': 'a'} and spec['dm_accuracy']['hit_rate'] == 0.5
  assert spec['dm_structural']['best_end_layer'] == {'a': 'a', 'b': 'a'}
  assert spec['tlm_accuracy']['best_end_layer'] == {'a': 'b', 'b': 'b'}
  assert spec['cka']['hit_rate'] == 1.0 and spec['procrustes']['hit_rate'] == 1.0
  assert spec['pwcca_distance']['best_end_layer'] == {'a': 'a', 'b': 'a'}


def test_sensitivity_at_full_rank_is_identity(finished):
  _, out = finished
  by_layer = {}
  for r in out['sensitivity']:
    by_layer.setdefault(r['layer'], []).append(r)
  assert set(by_layer) == {'conv1', 'layer1'}
  for rows in by_layer.values():
    full = rows[-1]  # the layer's own width is always included as the last rank
    assert full['cka'] == pytest.approx(1.0, abs=1e-6) and full['procrustes'] == pytest.approx(0.0, abs=1e-6)
    assert [r['rank'] for r in rows] == sorted(r['rank'] for r in rows)
    assert rows[0]['cka'] < full['cka']  # rank 1 loses information


def test_indices_match_the_similarity_module():
  x = np.random.default_rng(0).normal(size=(50, 6))
  y = x @ np.random.default_rng(1).normal(size=(6, 4))
  got = layer_pairs._indices(x, y)
  assert got['cka'] == similarity.linear_cka(x, y)
  assert got['pwcca_distance'] == pytest.approx(1 - similarity.pwcca(x, y))


def test_outputs_written_once_and_read_back(finished):
  workdir, out = finished
  final = os.path.join(workdir, 'stitching')
  for name in ('pairs.jsonl', 'pairs.csv', 'sensitivity.jsonl', 'specificity.json', 'table.md', 'heatmaps.pdf',
               'DONE'):
    assert os.path.exists(os.path.join(final, name)), name
  assert writer.read_rows(final, 'pairs') == out['pairs']
  assert layer_pairs.run(config(), workdir) == out


@pytest.mark.parametrize('overrides, words', [
    ({'stitching.kind': 'c2t'}, ['c2t', 'rc2c_pre']),
    ({'stitching.layers': 'layer7'}, ['layer7', 'conv1']),
    ({'stitching.cutoff': 'tiny'}, ['tiny', 'torch']),
    ({'stitching.dm_samples': 100000}, ['100000']),
    ({'stitching.dm_samples': 2}, ['dm_samples=2', 'use at least 9']),
    ({'stitching.similarity_samples': 20}, ['similarity_samples=20', '34..60']),
])
def test_bad_config_raises_before_writing(tmp_path, overrides, words):
  with pytest.raises(UserError) as error:
    layer_pairs.run(config(**overrides), str(tmp_path / 'w'))
  assert all(w in str(error.value) for w in words), error.value
  assert not (tmp_path / 'w').exists()


def test_cli_bad_input_exits_2(tmp_path):
  done = run_script('experiments/stitching.py', f'--workdir={tmp_path / "w"}', '--config.stitching.tlm_init=zeros',
                    timeout=300)
  assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1
  assert 'zeros' in done.stderr and 'pinv' in done.stderr
  assert not (tmp_path / 'w').exists()
