"""`joint_setup` on a prepared tiny run, per side-tune / low-rank option (original.md S2F §2.8–§2.9, §4.1–§4.2): the
layout's modules (new per step, gated, under the efficient L2), parameter shapes and counts, the merged adapter weights
and the penalties (which are nonzero), against hand computations."""
import chex
import jax
import numpy as np
import pytest
from flax import traverse_util

from s2f_jax import experiment
from s2f_jax.errors import UserError
from s2f_jax.methods.joint import adjacent_values, initial_variables, joint_learner, joint_name, joint_setup
from s2f_jax.models.registry import count_params

from conftest import SMALL, tiny_config

T = 3  # SMALL: source, rotation, corruption
BASE = ('conv1', 'layer1', 'fc')
# The tiny ConvNet (width 8, 1 block, 16 px digits, 10 classes): conv1 = 7×7 conv 3→8 + BN (1192 params); layer1 =
# 3×3 conv 8→64 (512·8/64) + BN (4736); fc = Dense 64→10 with bias (650).
STEM = {'conv': {'kernel': (7, 7, 3, 8)}, 'bn': {'scale': (8,), 'bias': (8,)}}
BLOCK = {'conv': {'kernel': (3, 3, 8, 64)}, 'bn': {'scale': (64,), 'bias': (64,)}}
HEAD = {'dense': {'kernel': (64, 10), 'bias': (10,)}}
LAYERS = {'conv1': STEM, 'layer1': BLOCK, 'fc': HEAD}
ONE_CONV = {'conv0': {'kernel': (3, 3, 8, 64)}, 'bn': {'scale': (64,), 'bias': (64,)}}  # 4736 params


def prepared(**overrides):
  """(run context, per-step model, layout, initial joint params) of a T-step joint run."""
  _, ctx = experiment.prepare(tiny_config(**{**SMALL, 'method': 'joint_model', **overrides}))
  model, layout = joint_setup(ctx, 'all')
  return ctx, model, layout, initial_variables(ctx, model, layout)


def shapes(tree):
  return jax.tree.map(lambda a: tuple(a.shape), tree)


def lead(tree, k):
  """A shape tree with a leading axis of k on every leaf."""
  return jax.tree.map(lambda s: (k,) + s, tree, is_leaf=lambda s: isinstance(s, tuple))


def squares(tree, stacked: bool = True) -> np.ndarray:
  """[K]: Σ w² per leading index (K = 1 if not `stacked`) over the regularised leaves (original.md S2F §2.6: conv/dense
  weights, adapter factors and the Dense bias; no BN)."""
  flat = {p: np.asarray(a, np.float64) if stacked else np.asarray(a, np.float64)[None]
          for p, a in traverse_util.flatten_dict(tree).items()}
  return sum(np.square(a).reshape(len(a), -1).sum(1) for p, a in flat.items()
             if p[-1] in ('kernel', 'a_in', 'a_out') or p[-2:] == ('dense', 'bias'))


def penalty_values(ctx, model, layout, params) -> dict[str, float]:
  return {p.coef_key: float(p.fn(params, None)) for p in joint_learner(ctx, model, layout).penalties}


# option → (config overrides, layers with side modules, the side module's shapes (per layer for JST-1), whether
# they are under the efficient L2, parameter count, method name)
SIDE_CASES = {
    'one conv': ({}, ('layer1',), ONE_CONV, True, 3 * 1192 + 4736 + 3 * 650 + 2 * 4736,
                 'joint_model_side_tune_adjacent_reg_l2'),
    'widths 4': ({'adapter.side_layer_sizes': '4'}, ('layer1',),
                 {'conv0': {'kernel': (3, 3, 8, 4)}, 'conv1': {'kernel': (3, 3, 4, 64)},
                  'bn': {'scale': (64,), 'bias': (64,)}}, True, 3 * 1192 + 4736 + 3 * 650 + 2 * 2720,
                 'joint_model_side_tune_1layers_size4_adjacent_reg_l2'),
    'JST-B': ({'adapter.side_layer_sizes': 'block', 'joint.adjacent_reg_type': 'none'}, ('layer1',), BLOCK, False,
              3 * 1192 + 4736 + 3 * 650 + 2 * 4736, 'joint_model_side_tune_block_adjacent_reg_none'),
    'JST-1': ({'adapter.all_layers_efficient': True, 'joint.adjacent_reg_type': 'none'}, BASE,
              {'conv1': STEM, 'layer1': ONE_CONV, 'fc': HEAD}, True, 3 * (1192 + 4736 + 650),
              'joint_model_side_tune_all_layers_efficient_adjacent_reg_none'),
}


@pytest.mark.parametrize('case', list(SIDE_CASES))
def test_side_tune_layout(case):
  overrides, sided, side_shape, efficient, count, name = SIDE_CASES[case]
  ctx, model, layout, variables = prepared(**{'joint.mode': 'side_tune', **overrides})
  params = variables['params']
  assert joint_name(ctx.config) == name
  separate = () if sided == BASE else ('conv1', 'fc')  # new modules at every step, replacing the previous ones
  sides = [tuple(f'side_{n}' for n in sided), tuple(f'side2_{n}' for n in sided)]  # side module k, added at t > k
  assert layout.names == BASE + sides[0] + sides[1]
  assert layout.path == tuple(tuple(t if n in separate else 0 for n in layout.names) for t in range(T))
  assert layout.gated == tuple((n, k) for k in range(T - 1) for n in sides[k])
  assert layout.gates().tolist() == [[0, 0], [1, 0], [1, 1]]
  assert layout.efficient == (sides[0] + sides[1] if efficient else ())
  side_shapes = side_shape if sided == BASE else {'layer1': side_shape}
  expected = {n: lead(LAYERS[n], T if n in separate else 1) for n in BASE}
  expected.update({f'{s}_{n}': lead(side_shapes[n], 1) for s in ('side', 'side2') for n in sided})
  assert shapes(params) == expected and count_params(params) == count

  # step 0 runs the plain block model (no side module added)
  x = ctx.sequence.steps[0].train.images[:4].astype(np.float32)
  step0 = model.apply(layout.step_variables(variables, 0), x, **layout.step_kwargs(0))
  block_model = jax.tree.map(lambda a: a[0], {c: {n: v[n] for n in BASE if n in v} for c, v in variables.items()})
  np.testing.assert_allclose(step0, ctx.model.apply(block_model, x), rtol=1e-5, atol=1e-6)

  # Σ_t of the modules step t runs: the base layers at every step, side module k at the T−1−k steps that add it
  base = sum(squares(params[n])[layout.path[t][layout.names.index(n)]] for t in range(T) for n in BASE)
  side = sum((T - 1 - k) * squares(params[n])[0] for k in range(T - 1) for n in sides[k])
  adjacent = sum(squares(jax.tree.map(lambda x: np.diff(x, axis=0), params[n])).sum() for n in separate)
  np.testing.assert_allclose(layout.l2(params, np.ones(T)), (base, side) if efficient else (base + side, 0.0),
                             rtol=1e-5)
  penalties = penalty_values(ctx, model, layout, params)
  assert list(penalties) == ['weight_decay'] + (['adjacent'] if 'joint.adjacent_reg_type' not in overrides else [])
  np.testing.assert_allclose(penalties['weight_decay'], base + side, rtol=1e-5)
  np.testing.assert_allclose(float(layout.adjacent(params, 'l2', np.ones(T - 1))), adjacent, rtol=1e-5)
  assert (adjacent > 0) == bool(separate) and side > 0


def test_sweep_efficient_reg_needs_efficient_modules():
  """Block side modules take λ, not the efficient coefficient (original.md S2F §4.2), so there is nothing to sweep."""
  with pytest.raises(UserError, match='sweep_efficient_reg needs'):
    prepared(**{'joint.mode': 'side_tune', 'adapter.side_layer_sizes': 'block', 'joint.sweep_efficient_reg': True})


def adapter_shape(layer, rank):
  """The adapter of one layer over T−1 steps: rank 0 a copy per step; else per kernel a_in [r, in] and a_out
  [out, r] (per kernel position for convs), the bias beside it and BN replaced per step."""
  flat = traverse_util.flatten_dict(LAYERS[layer])
  out = {}
  for path, shape in flat.items():
    if rank and path[-1] == 'kernel':
      *window, fan_in, fan_out = shape
      out[path[:-1] + ('a_in',)], out[path[:-1] + ('a_out',)] = (*window, rank, fan_in), (*window, fan_out, rank)
    else:
      out[path] = shape
  return lead(traverse_util.unflatten_dict(out), T - 1)


# option → (config overrides, ranks (original.md S2F §2.9: [0, r, 0], or [1, r, min(r, (64·10 − 1) // 74 = 8)]), adapter
# parameter count, method name)
LOW_RANK_CASES = {
    'add': ({}, {'conv1': 0, 'layer1': 4, 'fc': 0}, 2 * (1192 + 288 + 2304 + 128 + 650),
            'joint_model_low_rank_adapt_add_rank4_adjacent_reg_l2'),
    'multiply, sweep_efficient_reg': ({'adapter.mode': 'multiply', 'joint.sweep_efficient_reg': True},
                                      {'conv1': 0, 'layer1': 4, 'fc': 0}, 2 * (1192 + 288 + 2304 + 128 + 650),
                                      'joint_model_low_rank_adapt_multiply_rank4_adjacent_reg_l2_sweep_efficient_reg'),
    'all layers efficient': ({'adapter.all_layers_efficient': True}, {'conv1': 1, 'layer1': 4, 'fc': 4},
                             2 * (147 + 392 + 16 + 288 + 2304 + 128 + 256 + 40 + 10),
                             'joint_model_low_rank_adapt_add_rank4_all_layers_efficient_adjacent_reg_l2'),
}


@pytest.mark.parametrize('case', list(LOW_RANK_CASES))
def test_low_rank_layout(case):
  overrides, ranks, count, name = LOW_RANK_CASES[case]
  ctx, model, layout, variables = prepared(**{'joint.mode': 'low_rank_adapt', **overrides})
  params, mode = variables['params'], overrides.get('adapter.mode', 'add')
  assert joint_name(ctx.config) == name
  assert dict(layout.ranks) == ranks and layout.low_rank.mode == mode
  assert shapes(params['base']) == LAYERS
  assert shapes(params['adapter']) == {n: adapter_shape(n, r) for n, r in ranks.items()}
  assert count_params(params['adapter']) == count

  # step 0 runs the base; step t ≥ 1 W₀ ⊙ Π_{s<t} P_s (multiply) or W₀ + Σ_{s<t} P_s (add), P_s = A_o A_i per kernel
  # position, and step t's own copy of a rank-0 layer, of every bias beside an adapted kernel and of every BN
  w0, a = params['base']['layer1']['conv']['kernel'], params['adapter']['layer1']['conv']
  products = np.einsum('shwor,shwri->shwio', a['a_out'], a['a_in'])
  for t in range(T):
    step = layout.step_variables(variables, t)['params']
    if not t:
      chex.assert_trees_all_equal(step, params['base'])
      continue
    merged = w0 * np.prod(products[:t], 0) if mode == 'multiply' else w0 + np.sum(products[:t], 0)
    np.testing.assert_allclose(step['layer1']['conv']['kernel'], merged, rtol=1e-5, atol=1e-6)
    for n in BASE:
      own = traverse_util.flatten_dict(params['adapter'][n])
      for path, leaf in traverse_util.flatten_dict(step[n]).items():
        if path in own:
          np.testing.assert_array_equal(leaf, own[path][t - 1], err_msg=f'step {t} {n} {path}')

  # plain: the base of adapted layers at every step, each step's copy of a rank-0 layer; efficient: Σ_t Σ_{s<t}
  # ‖adapter s‖²; adjacent: between consecutive copies of the rank-0 layers
  copies = {n: jax.tree.map(lambda b, c: np.concatenate([np.asarray(b)[None], c]), params['base'][n],
                            params['adapter'][n]) for n in BASE if not ranks[n]}
  plain = sum(squares(copies[n]).sum() if n in copies else T * squares(params['base'][n], stacked=False)[0]
              for n in BASE)
  efficient = sum(2 * squares(params['adapter'][n])[0] + squares(params['adapter'][n])[1] for n in BASE if ranks[n])
  adjacent = sum(squares(jax.tree.map(lambda x: np.diff(x, axis=0), copies[n])).sum() for n in copies)
  np.testing.assert_allclose(layout.l2(params, np.ones(T)), (plain, efficient), rtol=1e-5)
  np.testing.assert_allclose(float(layout.adjacent(params, 'l2', np.ones(T - 1))), adjacent, rtol=1e-5)
  assert efficient > 0 and (adjacent > 0) == bool(copies)
  # no copies, no adjacent term: one β (0) instead of the type's grid of identical runs
  assert adjacent_values(ctx.config) == ((0.0,) if not copies else (0.01, 0.1, 1.0))
  penalties = penalty_values(ctx, model, layout, params)
  if 'joint.sweep_efficient_reg' in overrides:  # the adapters get their own coefficient
    assert list(penalties) == ['weight_decay', 'efficient_decay', 'adjacent']
    np.testing.assert_allclose([penalties['weight_decay'], penalties['efficient_decay']], [plain, efficient],
                               rtol=1e-5)
  else:
    assert list(penalties) == ['weight_decay', 'adjacent']
    np.testing.assert_allclose(penalties['weight_decay'], plain + efficient, rtol=1e-5)
