"""The faithful preset (compat.original) and the released-code behaviours it turns on, each against a hand
computation: the name filter of the regularisers toward earlier weights, per-step forward passes of IRM/DRO, the
original's gradual-unfreezing stages, the released joint grid, the Portraits input scaling, and the sweeps'
`:original` variants."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from s2f_jax import config as config_lib, experiment, sweep
from s2f_jax.methods import layers_spec
from s2f_jax.methods.joint import joint_grid
from s2f_jax.models import make_model
from s2f_jax.results import summary
from s2f_jax.training.loop import Learner
from s2f_jax.training.objective import InputScaling, reference_mask, reference_penalty

from conftest import SMALL, tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_preset_turns_on_every_released_behaviour():
  c = tiny_config()
  plain = c.to_dict()
  config_lib.validate(c)
  assert c.to_dict() == plain  # no preset: validation changes nothing
  c.compat.original = True
  config_lib.validate(c)
  assert all(c.compat[k] for k in c.compat) and len(c.compat) == 20
  assert (c.data.input_scaling, c.joint.grid) == ('original', 'released')
  assert config_lib.dataset_tag(c) == 'digits_original'
  once = c.to_dict()
  assert config_lib.apply_presets(c).to_dict() == once  # idempotent


def _params(name):
  """Random params of a 2-block width-4 model, shapes from an abstract init (nothing compiled)."""
  model = make_model(name, 2, 10, 4)
  shapes = jax.eval_shape(lambda x: model.init({'params': jax.random.PRNGKey(0)}, x, train=False)['params'],
                          jax.ShapeDtypeStruct((1, 16, 16, 3), jnp.float32))
  rng = np.random.default_rng(0)
  return jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32), shapes)


@pytest.mark.parametrize('name,bn_modules', [
    ('convnet', {('conv1', 'bn'), ('layer1', 'bn'), ('layer2', 'bn')}),  # stem and block BNs
    ('resnet', {('conv1', 'bn')}),  # stem only: bn1 / bn2 / downsample BNs are filtered out
    ('densenet', {('conv1', 'bn'), ('fc', 'bn')})])  # stem and head; the dense layers' and transitions' BNs out
def test_name_filter_keeps_the_original_bn_layers(name, bn_modules):
  params = _params(name)
  flat = traverse_util.flatten_dict(params)
  weights = traverse_util.flatten_dict(reference_mask(params))
  filtered = traverse_util.flatten_dict(reference_mask(params, 'name_filter'))
  added = {path for path in flat if filtered[path] and not weights[path]}
  assert added == {m + (leaf,) for m in bn_modules for leaf in ('scale', 'bias')}
  assert all(traverse_util.flatten_dict(reference_mask(params, 'all')).values())
  # Σ (θ − θ_ref)² over the filtered leaves, by hand: every leaf moved by +0.5 (BNs) or +0.25 (the rest)
  moved = traverse_util.unflatten_dict({p: v + (0.5 if p[-2] == 'bn' or 'bn' in p[-2] else 0.25)
                                        for p, v in flat.items()})
  aux = {'reference': jax.tree.map(lambda v: v[None], params)}
  expected = sum(v.size * (0.5 if 'bn' in p[-2] else 0.25) ** 2 for p, v in flat.items() if filtered[p])
  value = reference_penalty(leaves='name_filter').fn(moved, aux)
  np.testing.assert_allclose(value, expected, rtol=1e-5)
  default = sum(v.size * 0.25 ** 2 for p, v in flat.items() if weights[p])
  np.testing.assert_allclose(reference_penalty().fn(moved, aux), default, rtol=1e-5)


def test_gradual_unfreeze_stages_of_the_original():
  first = layers_spec.layer_plan('gradual_unfreeze_first_to_last', 4, compat_stages=True)
  assert first == [('conv1',), ('conv1', 'layer1'), ('conv1', 'layer1', 'layer2'),
                   ('conv1', 'layer1', 'layer2', 'layer3'), ('conv1', 'layer1', 'layer2', 'layer3', 'layer4', 'fc')]
  last = layers_spec.layer_plan('gradual_unfreeze_last_to_first', 4, compat_stages=True)
  assert last == [('fc',), ('layer4', 'fc'), ('layer3', 'layer4', 'fc'), ('layer2', 'layer3', 'layer4', 'fc'),
                  ('conv1', 'layer1', 'layer2', 'layer3', 'layer4', 'fc')]
  assert len(layers_spec.layer_plan('gradual_unfreeze_first_to_last', 4)) == 6  # ours: the README's N+2 stages
  assert layers_spec.step_plans('gradual_unfreeze_last_to_first', 3, 1, compat_stages=True) == [
      [('fc',), ('conv1', 'layer1', 'fc')]] * 2


def test_group_forward_runs_each_step_batch_on_its_own():
  """Per-step passes: each group's logits and BN statistics are those of a forward pass over that group alone, and
  the running statistics are updated group after group, exactly as three separate calls in order."""
  model = make_model('convnet', 1, 3, 4)
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.integers(0, 256, (3, 6, 16, 16, 3)), jnp.uint8)  # [G, B, H, W, 3]
  mask = np.ones((3, 6), bool)
  mask[2, 4:] = False  # a padded tail in the last group stays out of its statistics
  variables = model.init({'params': jax.random.PRNGKey(1)}, jnp.zeros((1, 16, 16, 3)), train=False)
  hparams, key = {'dropout': 0.0}, jax.random.PRNGKey(2)
  learner = Learner(model, InputScaling.raw(), group_forward=True)
  logits, stats = learner.forward(variables, images, hparams=hparams, rng=key, mask=mask)
  expected_stats = variables['batch_stats']
  for g in range(3):
    expected, expected_stats = Learner(model, InputScaling.raw()).apply(
        {'params': variables['params'], 'batch_stats': expected_stats}, images[g], train=True, hparams=hparams,
        rng=jax.random.fold_in(key, g), mask=mask[g])
    np.testing.assert_allclose(logits[g], expected, rtol=1e-5, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), stats, expected_stats)
  pooled, _ = Learner(model, InputScaling.raw()).forward(variables, images, hparams=hparams, rng=key, mask=mask)
  assert np.abs(np.asarray(pooled) - np.asarray(logits)).max() > 1e-3  # pooled BN statistics differ


def test_released_joint_grid():
  c = tiny_config()
  c.joint.grid = 'released'
  grid = joint_grid(c, (0.01, 0.1, 1.0))
  assert {k: tuple(v) for k, v in grid.items()} == {
      'learning_rate': (1e-3,) * 3, 'weight_decay': (1e-4,) * 3, 'adjacent': (0.01, 0.1, 1.0), 'dropout': (0.5,) * 3,
      'final_weight': (3.0,) * 3}
  assert len(joint_grid(c, (0.0,))['learning_rate']) == 1  # JST-1 / JST-B: one run
  c.joint.grid = 'full'
  assert len(joint_grid(c, (0.01, 0.1, 1.0))['learning_rate']) == 24


def test_original_input_scaling():
  x = np.array([0, 17, 128, 255], np.uint8).reshape(1, 1, 4, 1).repeat(3, -1)
  mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
  expected = (x / 255.0 - 255 * mean) / (255 * std)  # Normalize(255·mean, 255·std) after ToTensor
  got = np.asarray(InputScaling.of('original', 'portraits', x)(jnp.asarray(x)))
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  width = got.max(axis=(0, 1, 2)) - got.min(axis=(0, 1, 2))
  np.testing.assert_allclose(width, 1 / (255 * std), rtol=1e-3)  # each channel squashed into ~0.017 (S2F §1.8)
  np.testing.assert_array_equal(InputScaling.of('original', 'cifar10', x)(jnp.asarray(x)), x.astype(np.float32))


def test_sweeps_original_variants():
  load = lambda arg: sweep.load_config(os.path.join(ROOT, 'configs', 'sweeps', f'rcl.py:{arg}'))
  jobs = sweep.jobs(load('quick_original'))
  assert len(jobs) == 6 and all(j.config.compat.original and j.config.compat.dro_hard_max for j in jobs)
  assert all(j.folder.startswith('convnet_1blocks_digits_original/') for j in jobs)
  assert all(j.config.joint.grid == 'released' for j in jobs)
  assert not any(j.config.compat.original for j in sweep.jobs(load('quick')))
  assert len(sweep.jobs(load('original'))) == 240
  cpu = sweep.load_config(os.path.join(ROOT, 'configs', 'sweeps', 'rcl_cpu.py:original'))
  assert cpu.name == 'rcl_cpu:original' and cpu.base.compat.original
  table = {arg: sweep.jobs(sweep.load_config(os.path.join(ROOT, 'configs', 'sweeps', f'rcl_table.py{arg}')))
           for arg in ('', ':original')}
  assert [j.key['variant'] for j in table[''][:-1]] == [v[0] for v in sweep.PAPER_VARIANTS]
  assert {j.column for j in table['']} == set(summary.LABELS)  # every column of the paper's table
  assert not {j.folder for j in table['']} & {j.folder for j in table[':original']}  # both modes share a root
  with pytest.raises(Exception, match='valid choices: full, quick'):
    sweep.check_arg('rcl', 'orignal')


def test_a_run_under_the_preset_records_what_ran(tmp_path):
  c = tiny_config(method='irm_all', num_epochs=1, **SMALL)
  c.compat.original = True
  rows = experiment.run(c, str(tmp_path))
  assert rows[0]['Method'] == 'irm_all' and 0 <= rows[0]['Test accuracy'] <= 1
  with open(tmp_path / 'irm_all' / 'config.json') as f:
    ran = json.load(f)['config']
  assert all(ran['compat'].values()) and ran['data']['input_scaling'] == 'original'
  assert sweep.run_folder(c).startswith('convnet_1blocks_digits_original/')
