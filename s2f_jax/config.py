"""The run configuration (ml_collections) and its validation.

Every key can be overridden on the command line as `--config.KEY=VALUE`. This module holds the keys every run
shares; each method family's section (`fine_tune`, `adapter`, `robust`, `joint`) comes from its own module through
`s2f_jax.methods.CONFIG_SECTIONS`. `validate` is the one call that turns bad values into `UserError`s (one line
naming the value and the valid choices): the shared keys here, then every section's own checks.
"""
from __future__ import annotations

import ml_collections

from s2f_jax import distributed
from s2f_jax.data.sources import is_source, source_names
from s2f_jax.errors import UserError, check_ints, choices_error
from s2f_jax.methods import CONFIG_SECTIONS, METHODS, layers_spec
from s2f_jax.methods.fine_tune import check_schedule
from s2f_jax.models import registry as model_registry

INPUT_SCALINGS = ('standard', 'raw', 'original')


def base_config(method: str = 'erm_fine_tune') -> ml_collections.ConfigDict:
  """Paper settings (original.md S2F §1.6, §3) for `method`: CIFAR-10 RCL, ResNet-4, 100 epochs, the 8-point grid."""
  c = ml_collections.ConfigDict()
  c.experiment = 'benchmark'  # the study: benchmark | hessian | stitching | transferability | model_patching
  c.method = method  # one method or a comma list; see s2f_jax.methods.METHODS
  c.seed = 1007
  c.num_epochs = 100
  c.distributed = distributed.distributed_config()  # one run over several processes; s2f_jax.distributed
  c.compilation_cache_dir = 'auto'  # persistent JAX compilation cache: auto | a folder | '' (off); s2f_jax.compile_cache
  c.tensorboard = True  # per-epoch train/valid metrics of every stage also as TensorBoard event files (tensorboard/)

  c.data = ml_collections.ConfigDict()
  c.data.name = 'cifar10'  # digits | cifar10 | cifar100 | portraits | tfds:<name>
  c.data.root = ''  # folder holding the dataset files (not needed for digits)
  c.data.image_size = 32
  c.data.shift_sequence = 'rotation:corruption:label_flip'
  c.data.source_size = 6000  # train+valid examples at t=0
  c.data.target_sizes = '4000:6000:4000'  # train+valid per target step, or one size for all
  c.data.test_size = 5000  # final-step test examples
  c.data.test_all_steps = False  # a test set at every target step (sequential_fine_tune reports each)
  c.data.input_scaling = 'standard'  # standard | raw (0–255 floats) | original (raw; Portraits as the original scaled)

  c.model = ml_collections.ConfigDict()
  c.model.name = 'resnet'  # convnet | resnet | densenet
  c.model.num_blocks = 4
  c.model.width = 64  # stem channels; every width scales by width/64 (64 = paper)

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 100
  c.train.eval_batch_size = 1000
  c.train.patience = 5  # stop after more than this many epochs without a new best valid accuracy
  c.train.checkpoint_every_s = 60.0
  c.train.parallel_runs = 0  # runs (grid points) trained side by side per device; 0 = auto (CPU 1, GPU/TPU all)
  c.train.lanes = 0  # CPU: concurrent lanes the runs are cut into, one thread each; 0 = auto (one per core)
  c.train.resident_runs = 0  # runs whose training state is held at once (the rest in later passes); 0 = auto
  c.train.shard_data = True  # batches split over devices: each device/process holds only its share of the examples

  c.grid = ml_collections.ConfigDict()
  c.grid.learning_rate = (1e-3, 1e-4)
  c.grid.weight_decay = (1e-4, 1e-2)
  c.grid.dropout = (0.0, 0.5)
  c.grid.adjacent = (0.01, 0.1, 1.0)  # side_tune / low_rank_adapt: L2 pulling the new conv1/fc toward the old ones

  # Fine-tuning under a distance constraint and label noise (Ju et al. 2022; original.md Hessian §6).
  c.constraint = ml_collections.ConfigDict()
  c.constraint.norm = 'none'  # none | frob | inf_op: fine-tuning stages project weights onto balls around their start
  c.constraint.radius = (1.0,)  # radius grid (one vmapped run per value; a grid axis like the learning rate)
  c.constraint.scale_factor = 1.0  # block i of N gets radius·scale_factor^k (k = 0, 0, 1, 2 for N = 4)
  c.constraint.head_scale = 1.0  # the head's radius = head_scale·radius
  c.constraint.head_centre = 'zero'  # zero | init: centre of the head's ball
  c.constraint.stem = False  # constrain conv1 too (the original leaves it free)
  c.label_noise = ml_collections.ConfigDict()
  c.label_noise.rate = 0.0  # symmetric noise on the final step's train labels: each flips w.p. rate to another class
  c.label_noise.correction = 'none'  # none | backward | forward: fine-tuning loss corrected with F
  c.label_noise.confusion = 'known'  # F: known = symmetric F(rate); dual_t = estimated by Dual-T from an uncorrected fine-tune

  # The method families' own sections: fine_tune, adapter, robust, joint (s2f_jax.methods.CONFIG_SECTIONS).
  for section in CONFIG_SECTIONS.values():
    c[section.name] = section.defaults()

  c.debug = ml_collections.ConfigDict()
  c.debug.joint_mirror = 'none'  # none | standard_using_joint[_with_init][_with_prev_reg] (fine_tune.JOINT_MIRRORS)
  c.compat = ml_collections.ConfigDict()
  c.compat.original = False  # the released code's behaviour: every switch below, input_scaling=original, joint.grid=released
  c.compat.early_stopping_previous = False  # patience counted against the previous epoch, not the best
  c.compat.convnet_no_relu = False  # the original ConvNet blocks have no ReLU
  c.compat.subpop_remainder = False  # the original CIFAR-100 sub-population sizing bug
  c.compat.frozen_bn_batch_stats = False  # frozen layers' BNs use batch statistics and their running stats drift
  c.compat.surgical_per_batch = False  # surgical scores from mini-batch gradients (the original) not per-sample
  c.compat.fisher_per_batch = False  # Fisher from squared mini-batch gradients (the original) not per-sample
  c.compat.dro_hard_max = False  # dro: the worst step's batch loss each iteration (no group weights)
  c.compat.irm_vector_dummy = False  # irm: vector dummy, penalty weight 1, summed over steps (the original)
  c.compat.joint_adjacent_all_params = False  # joint adjacent term over every parameter, BN γ/β included
  c.compat.robust_pretrain_includes_final = False  # irm/dro_fine_tune: stage 1 also trains on the final step
  c.compat.robust_per_step_forward = False  # irm/dro: one forward pass per step's batch (BN statistics per step)
  c.compat.reference_name_filter = False  # previous/Fisher/EWC terms: the original's name filter (some BNs included)
  c.compat.gradual_unfreeze_stages = False  # gradual_unfreeze_*: N+1 stages (no stage just before `all`)
  # The companion systems' originals (their studies read these; the benchmark ignores them):
  c.compat.rc2c_pre_eye_is_rand = False  # stitching: tlm_init 'eye' for rc2c_pre starts from 'rand'
  c.compat.detector_lr_drop_per_iteration = False  # stitching detectors: the LR drop after fe//2 *iterations*
  c.compat.patching_undetached = False  # model patching: gradients through the group weights, adjustment in the loss
  c.compat.transfer_cost_mismatch = False  # transferability: Euclidean coupling, squared-cost gradients
  c.compat.hessian_batches = False  # hessian study: HDM's maxima over mini-batches of 4 (the original), not examples
  c.compat.transfer_prior_init = False  # transferability: d_logits = P_S (D ≈ uniform) instead of log P_S
  return c


def apply_presets(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Expands `compat.original` in place (every compat switch on, data.input_scaling=original, joint.grid=released)
  and returns the config; idempotent, and a no-op without the preset. Called before validation, so `config.json`
  records what ran."""
  if config.get('compat', {}).get('original', False):
    for key in config.compat:
      config.compat[key] = True
    config.data.input_scaling = 'original'
    config.joint.grid = 'released'
  return config


def dataset_tag(config: ml_collections.ConfigDict) -> str:
  """The dataset part of run folder names: data.name (':' → '_'), plus '_label_noise<rate>' with label noise and
  '_original' under compat.original (so both modes' runs live side by side)."""
  rate = config.label_noise.rate
  return (config.data.name.replace(':', '_') + (f'_label_noise{rate:g}' if rate else '')
          + ('_original' if config.compat.get('original', False) else ''))


def methods_of(config: ml_collections.ConfigDict) -> list[str]:
  return [m.strip() for m in str(config.method).split(',') if m.strip()]


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises UserError for the first invalid value (sequence strings are checked when parsed); expands the presets
  first (`apply_presets`). The method families' sections validate themselves (`ConfigSection.validate`)."""
  apply_presets(config)
  methods = methods_of(config)
  if not methods:
    raise choices_error('method', config.method, sorted(METHODS))
  for m in methods:
    if m not in METHODS:
      raise choices_error('method', m, sorted(METHODS))
  if config.model.name not in model_registry.MODELS:  # looked up at call time: models register later
    raise choices_error('model', config.model.name, tuple(model_registry.MODELS))
  name = config.data.name
  if not is_source(name):
    raise choices_error('dataset', name, source_names())
  if config.data.input_scaling not in INPUT_SCALINGS:
    raise choices_error('data.input_scaling', config.data.input_scaling, INPUT_SCALINGS)
  check_ints(config, 'model.num_blocks', 'model.width', 'data.image_size', 'train.batch_size',
             'train.eval_batch_size', minimum=1)
  _validate_constraint(config)
  for section in CONFIG_SECTIONS.values():
    section.validate(config, methods)
  check_ints(config, 'seed', 'num_epochs', 'train.patience', 'train.parallel_runs', 'train.lanes',
             'train.resident_runs')
  if config.seed >= 2 ** 32:  # numpy's legacy seeding (original.md S2F §1.5) takes 32-bit seeds
    raise UserError(f'seed={config.seed} must be below 2**32 = {2 ** 32}')
  for key in ('learning_rate', 'weight_decay', 'dropout', 'adjacent'):
    values = tuple(config.grid[key]) if isinstance(config.grid[key], (tuple, list)) else (config.grid[key],)
    if not values:
      raise UserError(f'grid.{key} is empty; give at least one value')
    if any(not isinstance(v, (int, float)) or v < 0 for v in values):
      raise UserError(f'grid.{key}={values} must hold non-negative numbers')
    if key == 'dropout' and any(v >= 1 for v in values):
      raise UserError(f'grid.dropout={values}: dropout rates must be in [0, 1)')


CONSTRAINT_NORMS = ('none', 'frob', 'inf_op')
CORRECTIONS = ('none', 'backward', 'forward')
CONFUSIONS = ('known', 'dual_t')


def _validate_constraint(config: ml_collections.ConfigDict) -> None:
  k, n = config.constraint, config.label_noise
  if k.norm not in CONSTRAINT_NORMS:
    raise choices_error('constraint.norm', k.norm, CONSTRAINT_NORMS)
  if k.head_centre not in ('zero', 'init'):
    raise choices_error('constraint.head_centre', k.head_centre, ('zero', 'init'))
  radii = tuple(k.radius) if isinstance(k.radius, (tuple, list)) else (k.radius,)
  if not radii or not all(isinstance(r, (int, float)) and r > 0 for r in radii):
    raise UserError(f'constraint.radius={radii} must hold positive numbers')
  if not (k.scale_factor > 0 and k.head_scale > 0):
    raise UserError(f'constraint.scale_factor={k.scale_factor} and constraint.head_scale={k.head_scale} must be '
                    'positive')
  if not 0.0 <= n.rate < 1.0:
    raise UserError(f'label_noise.rate={n.rate} must be in [0, 1)')
  if n.correction not in CORRECTIONS:
    raise choices_error('label_noise.correction', n.correction, CORRECTIONS)
  if n.confusion not in CONFUSIONS:
    raise choices_error('label_noise.confusion', n.confusion, CONFUSIONS)
  if n.correction != 'none' and n.rate == 0:
    raise UserError(f'label_noise.correction={n.correction} needs label_noise.rate > 0')


def validate_for_sequence(config: ml_collections.ConfigDict, num_steps: int) -> None:
  """Checks that need the sequence length (per-step `fine_tune.layers` specs, learning-rate schedules)."""
  if 'sequential_fine_tune' in methods_of(config):
    layers_spec.step_plans(config.fine_tune.layers, num_steps, config.model.num_blocks)
    if config.fine_tune.mode == 'standard':
      check_schedule(config.fine_tune.learning_rate_decay, num_steps)
