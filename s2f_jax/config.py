"""The run configuration (ml_collections) and its validation.

Every key can be overridden on the command line as `--config.KEY=VALUE`. `validate` is the one place that turns
bad values into `UserError`s (one line naming the value and the valid choices).
"""
from __future__ import annotations

import ml_collections

from s2f_jax import distributed
from s2f_jax.errors import UserError, choices_error

INPUT_SCALINGS = ('standard', 'raw', 'original')
JOINT_GRIDS = ('full', 'released')
LR_DECAYS = ('none', 'linear', 'exponential')
FINE_TUNE_MODES = ('standard', 'side_tune', 'low_rank_adapt')
# debug.joint_mirror: erm_fine_tune through a frozen 2-step joint model (the original's standard_using_joint*
# fine_tune_modes, original.md S2F §3.4), a check that the joint code reproduces the single-model method it mirrors
JOINT_MIRRORS = ('none', 'standard_using_joint', 'standard_using_joint_with_init', 'standard_using_joint_with_prev_reg',
                 'standard_using_joint_with_init_and_prev_reg')
ADAPTER_MODES = ('add', 'multiply')


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

  c.grid = ml_collections.ConfigDict()
  c.grid.learning_rate = (1e-3, 1e-4)
  c.grid.weight_decay = (1e-4, 1e-2)
  c.grid.dropout = (0.0, 0.5)
  c.grid.adjacent = (0.01, 0.1, 1.0)  # side_tune / low_rank_adapt: L2 pulling the new conv1/fc toward the old ones

  # Fine-tuning (erm/irm/dro_fine_tune, sequential_fine_tune): see s2f_jax/methods/layers_spec.py for the grammar.
  c.fine_tune_layers = 'all'  # all | comma set | dash stages | shortcut | search | surgical_rgn | surgical_snr
  c.fine_tune_mode = 'standard'  # standard | side_tune | low_rank_adapt
  c.regularization = 'standard'  # standard | previous | previous_l1 | fisher | fisher_all (EWC, sequential)
  c.ablate_init = False  # start fine-tuning from a fresh initialisation
  c.side_layer_sizes = ''  # side_tune modules: '' = one 3x3 conv + BN, 'block' = a copy of the block, '8,16' = widths
  c.all_layers_efficient = False  # side modules / adapters for conv1 and fc too (instead of new copies)
  c.adapter_rank = 4  # low_rank_adapt rank r
  c.adapter_mode = 'add'  # low_rank_adapt: add (W0 + A_o A_i) | multiply (W0 * A_o A_i)
  c.learning_rate_decay = 'exponential'  # sequential_fine_tune: none | linear | exponential

  # Joint model (joint_model, original.md S2F §4).
  c.joint = ml_collections.ConfigDict()
  c.joint.separate_layers = 'all'  # 'all' or per-target-step comma groups separated by ':' (e.g. 'conv1,layer1:fc')
  c.joint.adjacent_reg_type = 'l2'  # none | l2 | l1 | l2_fisher | l2_high | l2_very_high (β grid per type, §4.2)
  c.joint.last_step_loss_weight = 3.0  # α of the final step (1 for the others)
  c.joint.loss_weight_increasing = False  # α_t = 1/(T - t) instead
  c.joint.weight_l2_by_time = False  # ω_t = 1/(t+1) on the L2 term and ν_t = 1/(T-t) on the adjacent term
  c.joint.loss_samples = 'all'  # all | nearest neighbors | optimal matching (historical samples chained from the final)
  c.joint.mode = 'separate'  # separate | side_tune | low_rank_adapt (side_layer_sizes, all_layers_efficient, adapter_*)
  c.joint.adjacent = ()  # β grid; empty = adjacent_reg_type's (original.md S2F §4.2)
  c.joint.ablate = False  # every step runs step 0's model: ERM on all steps with the joint batch plan
  c.joint.sweep_efficient_reg = False  # side_tune/low_rank_adapt: β = 0.1, side/adapter L2 over 1e-5..1, best per value
  c.joint.resume_epochs = 0  # continue the selected model for this many more epochs (patience 10)
  c.joint.grid = 'full'  # full: grid.* × β | released: lr 1e-3, λ 1e-4, dropout 0.5 × β (the released code, §4.2)
  c.joint.unroll_steps = False  # steps' forwards one after another, not vmapped: faster epochs on CPU, ~2× compile

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

  # Robust objectives (dro_*, irm_*).
  c.dro_eta = 0.01  # Group DRO step size of the exponentiated-gradient group weights
  c.irm_penalty = 10.0  # IRMv1 penalty weight once annealing is over
  c.irm_anneal_steps = 100  # iterations with penalty weight 1 before irm_penalty applies

  c.debug = ml_collections.ConfigDict()
  c.debug.joint_mirror = 'none'  # none | standard_using_joint[_with_init][_with_prev_reg] (JOINT_MIRRORS)
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
  first (`apply_presets`)."""
  apply_presets(config)
  from s2f_jax.methods import METHODS
  from s2f_jax.models.registry import MODELS
  from s2f_jax.data.sources import is_source, source_names
  methods = methods_of(config)
  if not methods:
    raise choices_error('method', config.method, sorted(METHODS))
  for m in methods:
    if m not in METHODS:
      raise choices_error('method', m, sorted(METHODS))
  if config.model.name not in MODELS:
    raise choices_error('model', config.model.name, tuple(MODELS))
  name = config.data.name
  if not is_source(name):
    raise choices_error('dataset', name, source_names())
  if config.data.input_scaling not in INPUT_SCALINGS:
    raise choices_error('data.input_scaling', config.data.input_scaling, INPUT_SCALINGS)
  if config.learning_rate_decay not in LR_DECAYS:
    raise choices_error('learning_rate_decay', config.learning_rate_decay, LR_DECAYS)
  _positive(config, 'model.num_blocks', 'model.width', 'data.image_size', 'train.batch_size',
            'train.eval_batch_size')
  _validate_fine_tuning(config, methods)
  from s2f_jax.data.loss_samples import MODES as LOSS_SAMPLES
  if config.joint.loss_samples not in LOSS_SAMPLES:
    raise choices_error('joint.loss_samples', config.joint.loss_samples, LOSS_SAMPLES)
  _validate_joint(config)
  _validate_constraint(config)
  _non_negative(config, 'seed', 'num_epochs', 'train.patience', 'train.parallel_runs', 'train.lanes',
                'irm_anneal_steps')
  if config.seed >= 2 ** 32:  # numpy's legacy seeding (original.md S2F §1.5) takes 32-bit seeds
    raise UserError(f'seed={config.seed} must be below 2**32 = {2 ** 32}')
  for key in ('dro_eta', 'irm_penalty'):
    if not isinstance(config[key], (int, float)) or config[key] < 0:
      raise UserError(f'{key}={config[key]!r} must be a non-negative number')
  for key in ('learning_rate', 'weight_decay', 'dropout', 'adjacent'):
    values = tuple(config.grid[key]) if isinstance(config.grid[key], (tuple, list)) else (config.grid[key],)
    if not values:
      raise UserError(f'grid.{key} is empty; give at least one value')
    if any(not isinstance(v, (int, float)) or v < 0 for v in values):
      raise UserError(f'grid.{key}={values} must hold non-negative numbers')
    if key == 'dropout' and any(v >= 1 for v in values):
      raise UserError(f'grid.dropout={values}: dropout rates must be in [0, 1)')


def _validate_joint(config: ml_collections.ConfigDict) -> None:
  from s2f_jax.methods.joint import ADJACENT_GRIDS, MODES, vanishing_adjacent
  j = config.joint
  if j.mode not in MODES:
    raise choices_error('joint.mode', j.mode, MODES)
  if j.grid not in JOINT_GRIDS:
    raise choices_error('joint.grid', j.grid, JOINT_GRIDS)
  if j.adjacent_reg_type not in ADJACENT_GRIDS:
    raise choices_error('joint.adjacent_reg_type', j.adjacent_reg_type, tuple(ADJACENT_GRIDS))
  betas = tuple(j.adjacent) if isinstance(j.adjacent, (tuple, list)) else (j.adjacent,)
  if any(not isinstance(v, (int, float)) or v < 0 for v in betas):
    raise UserError(f'joint.adjacent={betas} must hold non-negative numbers')
  unused = vanishing_adjacent(config) or ('joint.sweep_efficient_reg (β = 0.1)' if j.sweep_efficient_reg else None)
  if betas and unused and 'joint_model' in methods_of(config):
    raise UserError(f'joint.adjacent={betas} is not used with {unused}; leave it empty')
  w = j.last_step_loss_weight
  if isinstance(w, bool) or not isinstance(w, (int, float)) or not w > 0:
    raise UserError(f'joint.last_step_loss_weight={w!r} must be a positive number')
  _non_negative(config, 'joint.resume_epochs')


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


def _validate_fine_tuning(config: ml_collections.ConfigDict, methods: list[str]) -> None:
  from s2f_jax.methods import layers_spec
  from s2f_jax.methods.adapted import side_layer_sizes
  from s2f_jax.methods.fine_tune import REGULARIZATIONS, joint_mirror
  if config.fine_tune_mode in JOINT_MIRRORS[1:]:
    raise UserError(f'fine_tune_mode={config.fine_tune_mode} is a debug mirror through the joint model: set '
                    f'debug.joint_mirror={config.fine_tune_mode} instead')
  if config.fine_tune_mode not in FINE_TUNE_MODES:
    raise choices_error('fine_tune_mode', config.fine_tune_mode, FINE_TUNE_MODES)
  mirror = joint_mirror(config)
  if mirror not in JOINT_MIRRORS:
    raise choices_error('debug.joint_mirror', mirror, JOINT_MIRRORS)
  if config.regularization not in REGULARIZATIONS:
    raise choices_error('regularization', config.regularization, REGULARIZATIONS)
  if config.adapter_mode not in ADAPTER_MODES:
    raise choices_error('adapter_mode', config.adapter_mode, ADAPTER_MODES)
  _positive(config, 'adapter_rank')
  side_layer_sizes(config)
  spec = config.fine_tune_layers
  if not isinstance(spec, str) or not spec.strip():
    raise UserError(f'fine_tune_layers={spec!r} must be a non-empty string')
  if config.regularization == 'fisher_all' and any(m.endswith('_fine_tune') and m != 'sequential_fine_tune'
                                                    for m in methods):
    raise UserError('regularization=fisher_all (EWC over earlier steps) applies to sequential_fine_tune only; '
                    'erm/irm/dro_fine_tune take standard, previous, previous_l1 or fisher')
  if mirror != 'none' and (config.fine_tune_mode != 'standard' or any(
      m.endswith('_fine_tune') and m != 'erm_fine_tune' for m in methods)):
    raise UserError(f'debug.joint_mirror={mirror} (erm_fine_tune through the frozen joint model) applies to '
                    f'erm_fine_tune with fine_tune_mode=standard only')
  if config.fine_tune_mode != 'standard' or mirror != 'none':
    changed = [k for k, default in (('fine_tune_layers', 'all'), ('regularization', 'standard'),
                                    ('ablate_init', False)) if config[k] != default]
    if changed:
      raise UserError(f"{', '.join(changed)} apply to fine_tune_mode=standard; side_tune and low_rank_adapt train "
                      'their own new modules, and debug.joint_mirror sets them itself')
  options = [k for k, on in (('constraint.norm', config.constraint.norm != 'none'),
                              ('label_noise.correction', config.label_noise.correction != 'none')) if on]
  if options and (config.fine_tune_mode != 'standard' or mirror != 'none' or not any(
      m in ('erm_fine_tune', 'irm_fine_tune', 'dro_fine_tune') for m in methods)):
    raise UserError(f"{', '.join(options)} apply to the fine-tuning stage of erm/irm/dro_fine_tune with "
                    f'fine_tune_mode=standard; got method={config.method}, fine_tune_mode={config.fine_tune_mode}')
  parts = spec.split(':') if 'sequential_fine_tune' in methods else []
  if any(m.endswith('_fine_tune') and m != 'sequential_fine_tune' for m in methods):
    parts.append(spec)  # erm/irm/dro_fine_tune take one spec (no ':')
  for part in parts:
    layers_spec.layer_plan(part, config.model.num_blocks)


def validate_for_sequence(config: ml_collections.ConfigDict, num_steps: int) -> None:
  """Checks that need the sequence length (per-step `fine_tune_layers` specs, learning-rate schedules)."""
  from s2f_jax.methods import fine_tune, layers_spec
  if 'sequential_fine_tune' in methods_of(config):
    layers_spec.step_plans(config.fine_tune_layers, num_steps, config.model.num_blocks)
    if config.fine_tune_mode == 'standard':
      fine_tune.check_schedule(config.learning_rate_decay, num_steps)


def _lookup(config, dotted: str):
  value = config
  for part in dotted.split('.'):
    value = value[part]
  return value


def _positive(config, *keys: str) -> None:
  for k in keys:
    v = _lookup(config, k)
    if not isinstance(v, int) or v < 1:
      raise UserError(f'{k}={v!r} must be a positive integer')


def _non_negative(config, *keys: str) -> None:
  for k in keys:
    v = _lookup(config, k)
    if not isinstance(v, int) or v < 0:
      raise UserError(f'{k}={v!r} must be a non-negative integer')
