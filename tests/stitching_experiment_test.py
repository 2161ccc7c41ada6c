"""The stitching experiment end to end on tiny digits: one row per layer pair with consistent scores, the
specificity arithmetic, the sensitivity test at full rank (indices and self-stitches), the held-out evaluation split,
the per-run summary and its aggregation over seeds, read-back, and bad input."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from s2f_jax import experiment
from s2f_jax.analysis import similarity
from s2f_jax.data.sequence import Split
from s2f_jax.errors import UserError
from s2f_jax.results import seeds, writer
from s2f_jax.stitching import layer_pairs

from conftest import assert_user_error, run_scripts, tiny_config

# 300 source images: 240 train, a 60-image valid split cut into 15 (donor selection) + 45 (evaluation).
TINY = {'data.source_size': 300, 'model.num_blocks': 1, 'model.width': 4, 'stitching.tlm_epochs': 1, 'stitching.ranks': (1,),
        'stitching.probe_epochs': 5, 'stitching.similarity_samples': 45, 'stitching.dm_samples': 20,
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
    for m in ('dm', 'tlm', 'far_ood'):
      assert 0 <= r[f'{m}_aupr'] <= 1 and 0 <= r[f'{m}_fpr95'] <= 1
    for m in ('dm', 'tlm'):  # the direction is the sign of AUROC − 0.5, as measured
      assert r[f'{m}_ood_direction'] == int(np.sign(r[f'{m}_auroc'] - 0.5))
    # The held-out DM residual (float64 rows of the evaluation images) is the pooled structural error of the DM stitch
    # (float32 forward pass) on the same images: two computations of one number.
    assert r['dm_residual_held_out'] == pytest.approx(r['dm_structural'], rel=1e-4)
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


@pytest.mark.slow
def test_sensitivity_at_full_rank_is_identity(finished):
  _, out = finished
  by_layer = {}
  for r in out['sensitivity']:
    by_layer.setdefault(r['layer'], []).append(r)
  assert set(by_layer) == {'conv1', 'layer1'}
  donor = out['summary']['donor_a_accuracy']
  for rows in by_layer.values():
    full = rows[-1]  # the layer's own width is always included as the last rank
    assert full['cka'] == pytest.approx(1.0, abs=1e-6) and full['procrustes'] == pytest.approx(0.0, abs=1e-6)
    assert [r['rank'] for r in rows] == sorted(r['rank'] for r in rows)
    assert rows[0]['cka'] < full['cka']  # rank 1 loses information
    # The DM self-stitch at full rank is the identity map (up to the float64 fit): the donor's own accuracy exactly.
    assert full['dm_self_accuracy'] == donor and full['dm_self_structural'] < 1e-4
    # At rank 1 DM matches the projected layer: its error is the PCA's lost variance share, well above full rank's.
    assert full['dm_self_structural'] < rows[0]['dm_self_structural'] < 1
    assert all(r['tlm_self_structural'] > 0 and 0 <= r['tlm_self_accuracy'] <= 1 for r in rows)


def test_indices_match_the_similarity_module():
  x = np.random.default_rng(0).normal(size=(50, 6))
  y = x @ np.random.default_rng(1).normal(size=(6, 4))
  got = layer_pairs._indices(x, y)
  assert got['cka'] == similarity.linear_cka(x, y)
  assert got['pwcca_distance'] == pytest.approx(1 - similarity.pwcca(x, y))


@pytest.mark.slow
def test_outputs_written_once_and_read_back(finished):
  workdir, out = finished
  final = os.path.join(workdir, 'stitching')
  for name in ('pairs.jsonl', 'pairs.csv', 'sensitivity.jsonl', 'specificity.json', 'summary.json', 'table.md',
               'heatmaps.pdf', 'DONE'):
    assert os.path.exists(os.path.join(final, name)), name
  assert writer.read_rows(final, 'pairs') == out['pairs']
  np.testing.assert_equal(layer_pairs.run(config(), workdir), out)  # NaN == NaN (unmeasured summary entries)


@pytest.mark.slow
def test_evaluation_split_is_held_out_from_donor_selection(finished):
  workdir, out = finished
  valid = experiment.prepare(config())[0].steps[0].valid
  select, evaluation = layer_pairs.split_valid(valid, 0.25)
  assert (len(select), len(evaluation)) == (15, 45)
  assert (out['summary']['select_images'], out['summary']['evaluation_images']) == (15, 45)
  np.testing.assert_array_equal(np.concatenate([select.images, evaluation.images]), valid.images)
  flat = lambda split: {x.tobytes() for x in split.images}
  assert not flat(select) & flat(evaluation)  # no image in both parts
  # The donors' stages selected their epochs on the 15 selection images (and are named for it).
  for donor in 'ab':
    with open(os.path.join(workdir, 'donors', 'stages', f'donor_{donor}_select15', 'selection.json')) as f:
      accuracy = float(json.load(f)['valid_accuracy'][0])
    assert accuracy * 15 == pytest.approx(round(accuracy * 15), abs=1e-4)  # a fraction of 15 images
  for fraction in (0.0, 1.0, 0.001, True):
    with pytest.raises(UserError, match='select_fraction'):
      layer_pairs.split_valid(Split(valid.images[:10], valid.labels[:10]), fraction)


def _pair(front, end, **values):
  base = {'dm_accuracy': 0.5, 'tlm_accuracy': 0.5, 'dm_structural': 0.5, 'tlm_structural': 1.0, 'dm_auroc': 0.6,
          'tlm_auroc': 0.1, 'dm_aupr': 0.5, 'tlm_aupr': 0.3, 'dm_fpr95': 0.9, 'tlm_fpr95': 1.0, 'dm_ood_direction': 1,
          'tlm_ood_direction': -1, 'far_ood_auroc': 0.99, 'dm_residual_in_sample': 0.1, 'dm_residual_held_out': 0.2,
          'cka': 0.5, 'pwcca_distance': 0.5, 'procrustes': 0.5}
  return {'front_layer': front, 'end_layer': end, **base, **values}


def test_summary_and_seed_aggregation_by_hand():
  pairs = [_pair('a', 'a', dm_accuracy=0.9, tlm_accuracy=0.8, cka=0.9), _pair('a', 'b', dm_accuracy=0.3),
           _pair('b', 'a', dm_accuracy=0.1, dm_ood_direction=-1, dm_auroc=0.2),
           _pair('b', 'b', dm_accuracy=0.7, tlm_accuracy=0.6, cka=0.9, tlm_ood_direction=1, tlm_auroc=0.7)]
  sens = [{'layer': L, 'rank': r, 'probe_accuracy': p, 'cka': c, 'pwcca_distance': 0.1, 'procrustes': d,
           'dm_self_accuracy': p, 'dm_self_structural': d, 'tlm_self_accuracy': 0.5, 'tlm_self_structural': 1.0}
          for L in 'ab' for r, p, c, d in ((1, 0.2, 0.6, 0.9), (2, 0.5, 0.9, 0.3), (4, 0.9, 0.8, 0.0))]
  got = layer_pairs.summarize(pairs, sens, ('a', 'b'))
  assert got['dm_accuracy_corresponding'] == pytest.approx(0.8) and got['dm_accuracy_other'] == pytest.approx(0.2)
  assert got['tlm_accuracy_corresponding'] == pytest.approx(0.7)
  assert got['dm_more_id_fraction'] == 0.25 and got['dm_flagged_ood_fraction'] == 0.75
  assert got['tlm_more_id_fraction'] == 0.75 and got['tlm_flagged_ood_fraction'] == 0.25
  assert got['dm_auroc'] == pytest.approx((0.6 * 3 + 0.2) / 4) and got['specificity_dm_accuracy'] == 1.0
  assert got['self_full_dm_accuracy'] == 0.9 and got['self_low_dm_structural'] == 0.9
  assert got['probe_accuracy_low'] == 0.2 and got['self_full_tlm_structural'] == 1.0
  # Per layer over ranks: probe 0.2 < 0.5 < 0.9; −procrustes rises with it (ρ = 1), CKA ranks 1, 3, 2 (ρ = 0.5).
  assert got['sensitivity_spearman_procrustes'] == pytest.approx(1.0)
  assert got['sensitivity_spearman_cka'] == pytest.approx(0.5)
  assert np.isnan(got['sensitivity_spearman_tlm_self_accuracy'])  # constant score: undefined, not 0

  runs = [{'x': 1.0, 'y': float('nan'), 'name': 'a'}, {'x': 2.0, 'y': 5.0, 'name': 'b'}, {'x': 4.0, 'y': 7.0}]
  (agg,) = seeds.aggregate(runs, ())
  assert set(agg) == {'n', 'x', 'x_std', 'y', 'y_std'} and agg['n'] == 3
  assert (agg['x'], agg['x_std']) == (pytest.approx(7 / 3), pytest.approx(np.std([1, 2, 4], ddof=1)))
  assert (agg['y'], agg['y_std']) == (6.0, pytest.approx(np.sqrt(2)))  # the NaN left out
  rows = seeds.aggregate([{'layer': 'a', 'rank': 1, 'v': 1.0, 'seed': 1}, {'layer': 'a', 'rank': 1, 'v': 3.0, 'seed': 2}],
                         ('layer', 'rank'))
  assert rows == [{'layer': 'a', 'rank': 1, 'n': 2, 'v': 2.0, 'v_std': pytest.approx(np.sqrt(2))}]


def test_seeds_study_runs_each_seed_and_aggregates(tmp_path, monkeypatch):
  calls = []
  pairs = [_pair('conv1', 'conv1')]
  sens = [{'layer': 'conv1', 'rank': 1, 'probe_accuracy': 0.5, 'cka': 0.5, 'pwcca_distance': 0.5, 'procrustes': 0.5}]

  def fake_run(c, workdir):
    calls.append((c.seed, workdir, c.stitching.seeds))
    return {'pairs': [dict(pairs[0], dm_accuracy=c.seed / 10)], 'sensitivity': sens,
            'summary': {'dm_accuracy_corresponding': c.seed / 10, 'seed': c.seed}}
  monkeypatch.setattr(layer_pairs, 'run', fake_run)
  text = layer_pairs.study(config(**{'stitching.seeds': '3, 1,2'}), str(tmp_path))
  assert calls == [(k, str(tmp_path / f'seed{k}'), '') for k in (3, 1, 2)]
  with open(tmp_path / 'summary.json') as f:
    result = json.load(f)
  assert result['seeds'] == [3, 1, 2]
  summary = result['summary']
  assert (summary['dm_accuracy_corresponding'], summary['dm_accuracy_corresponding_std'], summary['n']) == (
      pytest.approx(0.2), pytest.approx(0.1), 3)
  assert result['pairs'][0]['dm_accuracy'] == pytest.approx(0.2)
  assert '0.2 ± 0.1' in text and (tmp_path / 'summary.md').read_text().startswith('Seeds 3, 1, 2')


@pytest.mark.parametrize('overrides, words', [
    ({'stitching.kind': 'c2t'}, ['c2t', 'rc2c_pre']),
    ({'stitching.layers': 'layer7'}, ['layer7', 'conv1']),
    ({'stitching.cutoff': 'tiny'}, ['tiny', 'torch']),
    ({'stitching.dm_samples': 100000}, ['100000']),
    ({'stitching.dm_samples': 2}, ['dm_samples=2', 'use at least 9']),
    ({'stitching.similarity_samples': 20}, ['similarity_samples=20', '34..45']),
    ({'stitching.similarity_samples': 46}, ['similarity_samples=46', '34..45', 'select_fraction']),
    ({'stitching.select_fraction': 1.0}, ['select_fraction=1.0', '(0, 1)']),
    ({'stitching.select_fraction': 0.001}, ['select_fraction=0.001', 'empty part']),
    ({'stitching.ranks': (1, 0)}, ['ranks=(1, 0)', '≥ 1']),
])
def test_bad_config_raises_before_writing(tmp_path, overrides, words):
  with pytest.raises(UserError) as error:
    layer_pairs.run(config(**overrides), str(tmp_path / 'w'))
  assert all(w in str(error.value) for w in words), error.value
  assert not (tmp_path / 'w').exists()


def test_seeds_bad_values_raise_before_writing(tmp_path):
  for value, words in (('1,x', ['1,x', 'list of integers']), ('2,2', ['distinct']), ('-1', ['[0, 2^32)'])):
    with pytest.raises(UserError) as error:
      layer_pairs.study(config(**{'stitching.seeds': value}), str(tmp_path / 'w'))
    assert all(w in str(error.value) for w in words), error.value
  with pytest.raises(UserError, match='select_fraction'):  # a bad section value stops every seed before any runs
    layer_pairs.study(config(**{'stitching.seeds': '1,2', 'stitching.select_fraction': 2.0}), str(tmp_path / 'w'))
  assert not (tmp_path / 'w').exists()


def test_cli_bad_input_exits_2(tmp_path):
  cases = {'zeros': ('--config.stitching.tlm_init=zeros', ['zeros', 'pinv']),
           'seeds': ('--config.stitching.seeds=1,x', ['stitching.seeds', '1,x']),
           'fraction': ('--config.stitching.select_fraction=1.5', ['select_fraction=1.5'])}
  done = run_scripts([['experiments/stitching.py', f'--workdir={tmp_path / name}', flag]
                      for name, (flag, _) in cases.items()], timeout=300)
  for (name, (_, words)), d in zip(cases.items(), done):
    assert_user_error(d.returncode, d.stderr, words)
    assert not (tmp_path / name).exists()


@pytest.mark.slow
def test_vit_donors_stitch_token_to_token(tmp_path):
  """Two ViT donors (tokens [n, 16, 32] between layers) through the whole study with the t2t stitching layer: the
  detector sees the tokens as their 4×4 patch grid, the indices their mean over tokens, and DM matches the two patch
  embeddings exactly: both are affine in a grey patch's 16 pixel values, and the other 16 of 32 channels leave room
  for the position embeddings."""
  out = layer_pairs.run(config(**{'model.name': 'vit', 'model.width': 32, 'stitching.kind': 't2t',
                                   'stitching.layers': 'conv1', 'stitching.self_stitch': False}), str(tmp_path))
  (row,) = out['pairs']
  assert (row['front_layer'], row['end_layer']) == ('conv1', 'conv1') and row['dm_structural'] < 1e-6
  assert 0 <= row['dm_accuracy'] <= 1 and 0 <= row['tlm_auroc'] <= 1 and -1e-9 <= row['cka'] <= 1 + 1e-9
