"""Tests of the stitched model (original.md Stitching §1, §3, §5): prefix/suffix splits, exact self-stitches (identity
and DM), TLM training through the shared loop touching only the stitch, and the structural score against numpy."""
from __future__ import annotations

import dataclasses
import functools

import chex
import jax
import numpy as np
import pytest

from s2f_jax import experiment
from s2f_jax.errors import UserError
from s2f_jax.models.layers import layer_names
from s2f_jax.stitching.layers import interp_matrix, stitch_init
from s2f_jax.stitching.low_rank import fit_basis
from s2f_jax.stitching.stitch import (Stitched, evaluate_stitch, fit_direct_match, layer_output, layer_shape,
                                      projection_variables, stitched_variables, train_task_loss)
from conftest import SMALL, tiny_config

K = 100  # DM fitting images


@pytest.fixture(scope='module')
def donor(tmp_path_factory):
  """A 2-block width-8 ConvNet trained with ERM on step 0 of the 16×16 digits (10 epochs, Adam lr 1e-2; valid
  accuracy ≈ 0.8): (ctx, model, variables)."""
  config = tiny_config(**{**SMALL, 'model.num_blocks': 2, 'num_epochs': 10, 'grid.learning_rate': (1e-2,)})
  _, ctx = experiment.prepare(config)
  ctx = dataclasses.replace(ctx, workdir=str(tmp_path_factory.mktemp('stitch')))
  sel = ctx.train_stage('erm_source', ctx.init_variables(), ctx.grid(), ctx.examples([0]), ctx.examples([0], 'valid'))
  return ctx, ctx.model, jax.device_get(sel.winner())


def _test(ctx):
  return ctx.sequence.steps[-1].test


def _fit_images(ctx):
  return ctx.sequence.steps[0].train.images[:K]


@pytest.mark.slow
def test_prefix_then_suffix_is_the_full_forward(donor):
  ctx, model, v = donor
  x = ctx.scaling(_test(ctx).images[:20])
  splits = layer_names(model.num_blocks)[:-1]

  @jax.jit
  def forward(v, x):
    prefixes = [model.apply(v, x, until=layer) for layer in splits]
    return (model.apply(v, x), model.apply(v, x, until='fc'), prefixes,
            [model.apply(v, h, after=layer) for h, layer in zip(prefixes, splits)])

  full, until_fc, prefixes, outputs = forward(v, x)
  np.testing.assert_array_equal(until_fc, full)
  for layer, h, out in zip(splits, prefixes, outputs):
    assert h.shape[1:] == layer_shape(model, layer, x.shape[1:])
    np.testing.assert_allclose(out, full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('kind, layer', [('c2c', 'layer1'), ('rc2c_pre', 'conv1')])
def test_self_stitch_identity_and_direct_match_reproduce_the_donor(donor, kind, layer):
  ctx, model, v = donor
  test = _test(ctx)
  donor_loss, donor_acc = ctx.loss_accuracy(v)
  stitched = Stitched(model, model, layer, layer, kind)
  channels = layer_shape(model, layer, test.images.shape[1:])[-1]
  eye = stitched_variables(v, v, stitch_init(kind, 'eye', jax.random.key(0), channels, channels))
  scores = evaluate_stitch(stitched, eye, test, ctx.scaling)
  assert scores['accuracy'] == donor_acc and scores['loss'] == pytest.approx(donor_loss, rel=1e-5)
  # S = identity exactly; a_f and a_g are the same prefix computed twice in one program (float noise only).
  assert scores['structural'] < 1e-12 and scores['structural_batch_mean'] < 1e-12

  stitch, match = fit_direct_match(model, v, model, v, _fit_images(ctx), layer, layer, kind, ctx.scaling)
  assert match.residual_in_sample < 1e-9
  np.testing.assert_allclose(stitch['params']['kernel'], np.eye(channels), atol=1e-4)
  scores = evaluate_stitch(stitched, stitched_variables(v, v, stitch), test, ctx.scaling)
  assert scores['accuracy'] == donor_acc
  assert scores['structural'] < 1e-9


def test_task_loss_matching_trains_only_the_stitch(donor):
  ctx, model, v = donor
  test = _test(ctx)
  stitched = Stitched(model, model, 'layer1', 'layer2', 'rc2c_pre')
  c_in, c_out = (layer_shape(model, layer, test.images.shape[1:])[-1] for layer in ('layer1', 'layer2'))
  init = stitch_init('rc2c_pre', 'rand', jax.random.key(3), c_in, c_out)
  train, valid = ctx.examples([0]), ctx.examples([0], 'valid')
  out, sel = train_task_loss(ctx, 'tlm', stitched, v, v, 'rand', train, valid, num_epochs=10, key=jax.random.key(3))
  assert set(out['params']) == {'front', 'end', 'stitch'} and set(out['batch_stats']) == {'front', 'end'}
  for collection in ('params', 'batch_stats'):
    for part in ('front', 'end'):
      chex.assert_trees_all_equal(out[collection][part], v[collection])
  assert sel.runs[0]['best_epoch'] > 0
  assert not np.array_equal(out['params']['stitch']['kernel'], init['params']['kernel'])
  start = evaluate_stitch(stitched, stitched_variables(v, v, init), test, ctx.scaling)
  trained = evaluate_stitch(stitched, out, test, ctx.scaling)
  assert trained['accuracy'] >= start['accuracy']
  cached, _ = train_task_loss(ctx, 'tlm', stitched, v, v, init, train, valid, num_epochs=10)  # the stored stage
  chex.assert_trees_all_equal(cached, out)


def _stitched_by_hand(a_front: np.ndarray, size, kernel, bias) -> np.ndarray:
  """rc2c_pre in float64: separable bilinear resize (PyTorch align_corners=False) then the per-pixel affine map."""
  mh, mw = interp_matrix(a_front.shape[1], size[0]), interp_matrix(a_front.shape[2], size[1])
  resized = np.einsum('hH,wW,bHWc->bhwc', mh, mw, a_front.astype(np.float64))
  return resized @ np.asarray(kernel, np.float64) + np.asarray(bias, np.float64)


def test_structural_score_and_accuracy_by_hand(donor):
  ctx, model, v = donor
  test = _test(ctx)
  stitched = Stitched(model, model, 'conv1', 'layer1', 'rc2c_pre')
  stitch, match = fit_direct_match(model, v, model, v, _fit_images(ctx), 'conv1', 'layer1', 'rc2c_pre', ctx.scaling)
  assert match.residual_in_sample > 1e-3  # a real, inexact match
  variables = stitched_variables(v, v, stitch)
  scores = evaluate_stitch(stitched, variables, test, ctx.scaling, batch_size=32)

  a_f = np.asarray(layer_output(model, v, test.images, 'conv1', ctx.scaling))
  a_g = np.asarray(layer_output(model, v, test.images, 'layer1', ctx.scaling), np.float64)  # numpy: exact references
  s = _stitched_by_hand(a_f, a_g.shape[1:3], stitch['params']['kernel'], stitch['params']['bias'])
  diff, norm = ((s - a_g) ** 2).sum(axis=(1, 2, 3)), (a_g ** 2).sum(axis=(1, 2, 3))
  assert scores['structural'] == pytest.approx(diff.sum() / norm.sum(), rel=1e-4)
  per_batch = [diff[i:i + 32].sum() / norm[i:i + 32].sum() for i in range(0, len(diff), 32)]
  assert len(per_batch) == 4 and scores['structural_batch_mean'] == pytest.approx(np.mean(per_batch), rel=1e-4)
  assert scores['structural_batch_mean'] != pytest.approx(scores['structural'], rel=1e-6)

  logits = np.asarray(jax.jit(functools.partial(model.apply, after='layer1'))(v, np.asarray(s, np.float32)))
  assert scores['accuracy'] == pytest.approx(np.mean(np.argmax(logits, -1) == test.labels), abs=0.011)

  # A fixed PCA basis on the front channels is applied before the stitch.
  basis = fit_basis(layer_output(model, v, _fit_images(ctx), 'conv1', ctx.scaling), 3)
  low = Stitched(model, model, 'conv1', 'layer1', 'rc2c_pre', basis=basis)
  got = jax.jit(functools.partial(low.apply, output='stitched'))(variables, ctx.scaling(test.images[:8]))
  projected = basis.mean + (a_f[:8] - basis.mean) @ basis.components @ basis.components.T
  np.testing.assert_allclose(got, _stitched_by_hand(projected, got.shape[1:3], stitch['params']['kernel'],
                                                    stitch['params']['bias']), rtol=1e-4, atol=1e-4)
  # An int rank refits the basis on each batch (the original's per-batch mode): a batch's own top-3 PCA.
  per_batch = Stitched(model, model, 'conv1', 'layer1', 'rc2c_pre', basis=3)
  got = jax.jit(functools.partial(per_batch.apply, output='stitched'))(variables, ctx.scaling(test.images[:8]))
  rows = a_f[:8].reshape(-1, a_f.shape[-1])
  _, _, vt = np.linalg.svd(rows - rows.mean(0), full_matrices=False)
  projected = rows.mean(0) + (a_f[:8] - rows.mean(0)) @ vt[:3].T @ vt[:3]
  np.testing.assert_allclose(got, _stitched_by_hand(projected, got.shape[1:3], stitch['params']['kernel'],
                                                    stitch['params']['bias']), rtol=1e-3, atol=1e-3)


def test_projection_as_data_equals_the_constant_basis_and_stays_frozen(donor):
  ctx, model, v = donor
  x = ctx.scaling(_test(ctx).images[:16])
  a = layer_output(model, v, _fit_images(ctx), 'layer1', ctx.scaling)
  width = a.shape[-1]
  stitch = stitch_init('c2c', 'rand', jax.random.key(1), width, width)
  as_data = Stitched(model, model, 'layer1', 'layer1', 'c2c', projection=True)
  stitched = jax.jit(functools.partial(as_data.apply, output='stitched'))
  plain = jax.jit(functools.partial(Stitched(model, model, 'layer1', 'layer1', 'c2c').apply, output='stitched'))(
      stitched_variables(v, v, stitch), x)
  # The default projection (mean 0, V = I) is the identity: the unprojected stitch.
  np.testing.assert_array_equal(stitched(stitched_variables(v, v, stitch, projection_variables(None, width)), x),
                                plain)
  # A rank-3 basis zero-padded to the width gives the constant-basis stitch, in the same compiled program.
  basis = fit_basis(a, 3)
  constant = Stitched(model, model, 'layer1', 'layer1', 'c2c', basis=basis).apply(
      stitched_variables(v, v, stitch), x, output='stitched')
  np.testing.assert_allclose(stitched(stitched_variables(v, v, stitch, projection_variables(basis, width)), x),
                             constant, rtol=1e-5, atol=1e-5)
  # TLM trains the stitch only: the projection comes back unchanged.
  projection = projection_variables(basis, width)
  out, _ = train_task_loss(ctx, 'tlm_projected', as_data, v, v, stitch, ctx.examples([0]),
                           ctx.examples([0], 'valid'), num_epochs=1, projection=projection)
  chex.assert_trees_all_equal(out['params']['projection'], projection)
  assert not np.array_equal(out['params']['stitch']['kernel'], stitch['params']['kernel'])


def test_bad_names_raise_user_errors(donor):
  ctx, model, v = donor
  x = ctx.scaling(_test(ctx).images[:2])
  variables = stitched_variables(v, v, stitch_init('c2c', 'rand', jax.random.key(0), 16, 16))
  for bad in [Stitched(model, model, 'layer9', 'layer1', 'c2c'), Stitched(model, model, 'layer1', 'layer1', 'x2y'),
              Stitched(model, model, 'layer1', 'fc', 'c2c'), Stitched(model, model, 'conv1', 'layer1', 'c2c'),
              Stitched(model, model, 'layer1', 'layer1', 'c2c', out_size=(3, 3))]:
    with pytest.raises(UserError):
      jax.eval_shape(bad.apply, variables, x)
  with pytest.raises(UserError):
    jax.eval_shape(functools.partial(Stitched(model, model, 'layer1', 'layer1', 'c2c').apply, output='nope'),
                   variables, x)
  with pytest.raises(UserError):
    train_task_loss(ctx, 'bad', Stitched(model, model, 'layer1', 'layer1', 'c2c'), v, v, 'pinv',
                    ctx.examples([0]), ctx.examples([0], 'valid'))
