"""Energy-based OOD detectors on representations (original.md Stitching §8) and the AUROC / AUPR / FPR95 metrics.

A detector is a block model (`s2f_jax.models.make_model`) trained on a donor network's layer representations: first
supervised cross-entropy on (representation, label) pairs, then energy fine-tuning (Liu et al. 2020) that pushes the
energy E(x) = −logsumexp(logits) of in-distribution (ID) representations below `m_in` and that of auxiliary outliers
above `m_out`. Its score is −E (higher = more in-distribution); metrics treat ID as the positive class.

Representations are float arrays, channel-last: conv [n, H, W, C], or vectors [n, D] treated as [n, 1, 1, D]. They
are optionally resized bilinearly (PyTorch `align_corners=False`, no antialiasing) to `DetectorOptions.input_size`
before the detector (the original upsamples to the image size, e.g. 32×32 for CIFAR).

`train_detector` compiles both phases (epochs × shuffled mini-batches, nested `lax.scan`) into one jitted call on
device-resident arrays; it is deterministic per `DetectorOptions.seed`.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from s2f_jax.errors import TrainingDiverged, UserError, choices_error
from s2f_jax.models import make_model
from s2f_jax.models.registry import MODELS
from s2f_jax.stitching.layers import resize_bilinear
from s2f_jax.training.objective import cross_entropy

TPR_PERCENT = 95  # FPR is read at the threshold accepting this percentage of ID scores
LR_DROP = 0.1  # fine-tuning learning-rate factor from epoch finetune_epochs // 2 on

Variables = dict  # {'params', 'batch_stats'} of the detector block model


# --------------------------------------------------------------------------------------------------------------------
# Metrics


def _check_scores(name: str, scores) -> np.ndarray:
  """`scores` as a finite float64 [n ≥ 1] array, or a `UserError`."""
  s = np.asarray(scores)
  if s.ndim != 1 or s.size == 0 or s.dtype.kind not in 'fiu':
    raise UserError(f'{name} must be a non-empty 1-D real array; got dtype {s.dtype}, shape {s.shape}')
  if not np.all(np.isfinite(s)):
    raise UserError(f'{name} contain NaN/inf ({int(np.sum(~np.isfinite(s)))} of {s.size})')
  return s.astype(np.float64)


def ood_metrics(id_scores, ood_scores) -> dict[str, float]:
  """OOD-detection metrics with ID as the positive class; scores: 1-D real arrays, higher = more in-distribution.

  auroc: area under the ROC curve = P(s_id > s_ood) + ½·P(s_id = s_ood) (scikit-learn `roc_auc_score`).
  aupr: average precision Σ_k (R_k − R_{k−1})·P_k over the distinct score thresholds in decreasing order, a tied
    group entering all at once (scikit-learn `average_precision_score`).
  fpr95: fraction of OOD scores ≥ t, where t is the k-th largest ID score with k = ⌈0.95·n_id⌉, i.e. the highest
    threshold that accepts (score ≥ t) at least 95 % of the ID scores; ties at t are accepted on both sides (an ID
    group straddling rank k makes the accepted ID fraction exceed 0.95, an OOD score equal to t is a false positive).
    The Hendrycks/Liu code instead takes the ID score whose recall is *closest* to 0.95 (possibly below it) and
    also counts the OOD scores between it and the next lower ID score as false positives; they differ by O(1/n).
  All values are Python floats in [0, 1].
  """
  s_id, s_ood = _check_scores('ID scores', id_scores), _check_scores('OOD scores', ood_scores)
  is_id = np.concatenate([np.ones(s_id.size), np.zeros(s_ood.size)])
  scores = np.concatenate([s_id, s_ood])
  # One ROC point per distinct score t, in decreasing t: tpr = #{s_id ≥ t} / n_id (k / n_id rounds to ≥ 0.95 exactly
  # when k ≥ 0.95·n_id), fpr = #{s_ood ≥ t} / n_ood; the first point reaching the TPR is at the documented t.
  fpr, tpr, _ = roc_curve(is_id, scores, drop_intermediate=False)
  return {'auroc': float(roc_auc_score(is_id, scores)), 'aupr': float(average_precision_score(is_id, scores)),
          'fpr95': float(fpr[np.argmax(tpr >= TPR_PERCENT / 100)])}


def ood_direction(auroc: float) -> int:
  """Which way an `ood_metrics` AUROC (ID positive, score −E) points, read as measured rather than folded:
  +1 if AUROC > 0.5 (the other set scores lower than the ID set: flagged as out of distribution), −1 if AUROC < 0.5
  (the other set scores *higher*, i.e. the detector rates it more in-distribution than genuine ID data; still a
  separable, different distribution when AUROC is near 0), 0 if exactly 0.5. NaN → 0."""
  return 0 if not auroc == auroc or auroc == 0.5 else (1 if auroc > 0.5 else -1)


# --------------------------------------------------------------------------------------------------------------------
# Energy


def energy(logits: jax.Array, temperature: float = 1.0) -> jax.Array:
  """Energy −T·logsumexp(logits / T) over the last axis: logits [n, K] → float32 [n] (nats·T; lower = more ID)."""
  if isinstance(temperature, (int, float)) and not (math.isfinite(temperature) and temperature > 0):
    raise UserError(f'energy temperature must be a positive finite number; got {temperature!r}')
  logits = jnp.asarray(logits, jnp.float32)
  return -temperature * jax.nn.logsumexp(logits / temperature, axis=-1)


def energy_loss(logits_in: jax.Array, labels_in: jax.Array, logits_out: jax.Array, m_in: float = -25.0,
                m_out: float = -7.0, weight: float = 0.1) -> jax.Array:
  """Scalar fine-tuning loss of Liu et al. (2020), in nats:

      mean CE(logits_in, labels_in) + weight·(mean relu(E_in − m_in)² + mean relu(m_out − E_out)²),

  E = `energy` at T = 1. logits_in [b_in, K] with int labels_in [b_in]; logits_out [b_out, K] of outliers.
  """
  ce = jnp.mean(cross_entropy(logits_in, labels_in))
  hinge_in = jnp.mean(jnp.square(jax.nn.relu(energy(logits_in) - m_in)))
  hinge_out = jnp.mean(jnp.square(jax.nn.relu(m_out - energy(logits_out))))
  return ce + weight * (hinge_in + hinge_out)


# --------------------------------------------------------------------------------------------------------------------
# Detector


def _int_at_least(value, minimum: int = 1) -> bool:
  return not isinstance(value, bool) and isinstance(value, (int, np.integer)) and value >= minimum


def _finite(value) -> bool:
  return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


@dataclasses.dataclass(frozen=True)
class DetectorOptions:
  """How `train_detector` builds and fits a detector. Epoch/batch defaults follow the original README example.

  Both phases use Adam (β 0.9/0.999, ε 1e-8) with coupled L2 as PyTorch's `Adam(weight_decay=...)`: weight_decay·θ
  is added to the gradient of every parameter (BN scale/bias included) before Adam. Fine-tuning starts a fresh Adam
  state and multiplies the learning rate by 0.1 from epoch finetune_epochs // 2 on (stepped per epoch, as intended;
  the original steps its scheduler every iteration, so almost all of its fine-tuning runs at learning_rate / 10;
  `compat_lr_drop_per_iteration` reproduces that).
  """
  model: str = 'convnet'  # block model of `s2f_jax.models.registry.MODELS`
  num_blocks: int = 1
  width: int = 16  # channel scale of the block model (64 = the paper's widths)
  input_size: tuple[int, int] | None = None  # (H, W) the representation is bilinearly resized to; None = as is
  learning_rate: float = 1e-3  # Adam step size in both phases (before the fine-tuning drop)
  weight_decay: float = 1e-5  # coupled L2 coefficient
  batch_size: int = 512  # examples per step: phase 1 all ID; phase 2 batch_size // 2 ID + batch_size // 2 outliers
  pretrain_epochs: int = 100  # phase 1: supervised cross-entropy
  finetune_epochs: int = 10  # phase 2: energy fine-tuning
  m_in: float = -25.0  # ID energies are pushed below this
  m_out: float = -7.0  # outlier energies are pushed above this
  energy_weight: float = 0.1  # weight of the two squared hinges
  eval_batch_size: int = 1000  # examples per forward pass in `detector_scores`
  seed: int = 0  # initialisation and shuffles
  compat_lr_drop_per_iteration: bool = False  # the original: drop after finetune_epochs // 2 *iterations*

  def validate(self) -> DetectorOptions:
    """Returns self, or raises `UserError` naming the first bad field."""
    if self.model not in MODELS:
      raise choices_error('detector model', self.model, tuple(MODELS))
    for name, minimum in (('num_blocks', 1), ('width', 2), ('batch_size', 2), ('eval_batch_size', 1),
                          ('pretrain_epochs', 0), ('finetune_epochs', 0)):
      value = getattr(self, name)
      if not _int_at_least(value, minimum):
        raise UserError(f'detector option {name} must be an integer ≥ {minimum}; got {value!r}')
    if self.input_size is not None and not (
        isinstance(self.input_size, (tuple, list)) and len(self.input_size) == 2
        and all(_int_at_least(s) for s in self.input_size)):
      raise UserError(f'detector option input_size must be None or two positive integers (H, W); '
                      f'got {self.input_size!r}')
    if not (_finite(self.learning_rate) and self.learning_rate > 0):
      raise UserError(f'detector option learning_rate must be a positive finite number; got {self.learning_rate!r}')
    for name in ('weight_decay', 'energy_weight'):
      value = getattr(self, name)
      if not (_finite(value) and value >= 0):
        raise UserError(f'detector option {name} must be a finite number ≥ 0; got {value!r}')
    for name in ('m_in', 'm_out'):
      if not _finite(getattr(self, name)):
        raise UserError(f'detector option {name} must be a finite number; got {getattr(self, name)!r}')
    if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)):
      raise UserError(f'detector option seed must be an integer; got {self.seed!r}')
    return self

  def arch(self) -> tuple:
    """Hashable (model, num_blocks, width, input_size): what fixes the compiled detector."""
    return self.model, int(self.num_blocks), int(self.width), None if self.input_size is None else (
        int(self.input_size[0]), int(self.input_size[1]))


def _inputs(reps: jax.Array, input_size: tuple[int, int] | None) -> jax.Array:
  """Detector input float32 [b, H', W', C] from reps [b, H, W, C] or [b, D] (→ [b, 1, 1, D]), resized to
  input_size = (H', W') unless None."""
  x = reps.astype(jnp.float32)
  if x.ndim == 2:
    x = x[:, None, None, :]
  return x if input_size is None else resize_bilinear(x, input_size)


def _check_reps(name: str, reps) -> np.ndarray:
  """`reps` as finite float32 [n ≥ 1, H, W, C] or [n ≥ 1, D], or a `UserError`. Tokens [n, N, D] from a square
  patch grid (N = s², a ViT's row-major patches) come back as that grid [n, s, s, D]."""
  r = np.asarray(reps)
  side = int(round(np.sqrt(r.shape[1]))) if r.ndim == 3 else 0
  if r.ndim == 3 and side * side == r.shape[1]:
    r = r.reshape(r.shape[0], side, side, r.shape[2])
  if r.ndim not in (2, 4) or r.shape[0] < 1 or 0 in r.shape or r.dtype.kind not in 'fiu':
    raise UserError(f'{name} must be a non-empty real [n, H, W, C], [n, s², D] (tokens) or [n, D] array; got dtype '
                    f'{r.dtype}, shape {r.shape}')
  if not np.all(np.isfinite(r)):
    raise UserError(f'{name} contain NaN/inf; shape {r.shape}')
  return r.astype(np.float32)


@functools.partial(jax.jit, static_argnames=('arch', 'num_classes', 'pretrain_epochs', 'finetune_epochs', 'batch',
                                             'half'))
def _fit(key, reps, labels, outliers, hyper, *, arch, num_classes, pretrain_epochs, finetune_epochs, batch, half):
  """(variables, phase-1 mean CE per epoch [pretrain_epochs], phase-2 mean loss per epoch [finetune_epochs]) of a
  detector trained on device-resident reps [n, ...], labels int [n] and outliers [m, ...]; hyper: float32 scalars
  and the bool 'drop_per_iteration' (data, so that both scheduler counters share one program)."""
  name, num_blocks, width, input_size = arch
  model = make_model(name, num_blocks, num_classes, width)
  k_init, k_pre, k_ft = jax.random.split(key, 3)
  variables = model.init(k_init, _inputs(reps[:1], input_size), train=False)
  tx = optax.chain(optax.add_decayed_weights(hyper['weight_decay']), optax.scale_by_adam())

  def step(state, batch_loss, lr):
    """One Adam step on batch_loss(params, batch_stats) -> (loss, new batch_stats)."""
    params, stats, opt_state = state
    (loss, stats), grads = jax.value_and_grad(batch_loss, has_aux=True)(params, stats)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, jax.tree.map(lambda u: -lr * u, updates))
    return (params, stats, opt_state), loss

  def logits_train(params, stats, x):
    logits, new = model.apply({'params': params, 'batch_stats': stats}, _inputs(x, input_size), train=True,
                              mutable=['batch_stats'])
    return logits, new['batch_stats']

  def pre_epoch(state, key_e):
    steps = reps.shape[0] // batch
    idx = jax.random.permutation(key_e, reps.shape[0])[:steps * batch].reshape(steps, batch)

    def pre_step(state, i):
      def batch_loss(params, stats):
        logits, stats = logits_train(params, stats, reps[i])
        return jnp.mean(cross_entropy(logits, labels[i])), stats
      return step(state, batch_loss, hyper['learning_rate'])
    state, losses = jax.lax.scan(pre_step, state, idx)
    return state, jnp.mean(losses)

  def ft_epoch(state, xs):
    key_e, epoch = xs
    k_in, k_out = jax.random.split(key_e)
    steps = min(reps.shape[0], outliers.shape[0]) // half
    idx_in = jax.random.permutation(k_in, reps.shape[0])[:steps * half].reshape(steps, half)
    idx_out = jax.random.permutation(k_out, outliers.shape[0])[:steps * half].reshape(steps, half)
    # the scheduler's counter: epochs, or (the original's mistake) iterations
    count = jnp.where(hyper['drop_per_iteration'], epoch * steps + jnp.arange(steps), epoch)
    lrs = hyper['learning_rate'] * jnp.where(count >= finetune_epochs // 2, LR_DROP, 1.0)

    def ft_step(state, io):
      i, o, lr = io

      def batch_loss(params, stats):  # one train-mode pass: BN batch statistics over ID and outliers together
        logits, stats = logits_train(params, stats, jnp.concatenate([reps[i], outliers[o]]))
        return energy_loss(logits[:half], labels[i], logits[half:], hyper['m_in'], hyper['m_out'],
                           hyper['energy_weight']), stats
      return step(state, batch_loss, lr)
    state, losses = jax.lax.scan(ft_step, state, (idx_in, idx_out, lrs))
    return state, jnp.mean(losses)

  params, stats = variables['params'], variables['batch_stats']
  (params, stats, _), pre_losses = jax.lax.scan(pre_epoch, (params, stats, tx.init(params)),
                                                jax.random.split(k_pre, pretrain_epochs))
  (params, stats, _), ft_losses = jax.lax.scan(ft_epoch, (params, stats, tx.init(params)),
                                               (jax.random.split(k_ft, finetune_epochs), jnp.arange(finetune_epochs)))
  return {'params': params, 'batch_stats': stats}, pre_losses, ft_losses


def train_detector(reps_train, labels, outliers, num_classes: int,
                   options: DetectorOptions = DetectorOptions()) -> Variables:
  """Detector variables {'params', 'batch_stats'} (jax arrays) trained on ID representations reps_train
  [n, H, W, C] or [n, D] with int labels [n] in [0, num_classes), and outlier representations [m, same trailing
  shape].

  Phase 1 (pretrain_epochs): mean CE on shuffled batches of min(batch_size, n) ID examples. Phase 2
  (finetune_epochs): `energy_loss` on b/2 ID + b/2 outliers per step, b/2 = min(batch_size // 2, n, m); an epoch
  is min(n, m) // (b/2) steps drawn from fresh random permutations of both sets (the original draws disjoint
  subsets of a large ID set across epochs). Both phases drop an epoch's incomplete last batch.
  Raises `UserError` on bad input and `TrainingDiverged` when an epoch's mean loss or a weight is NaN/inf.
  """
  options.validate()
  reps, out = _check_reps('ID representations', reps_train), _check_reps('outlier representations', outliers)
  if out.shape[1:] != reps.shape[1:]:
    raise UserError(f'outlier representations must have the ID shape [m, {", ".join(map(str, reps.shape[1:]))}]; '
                    f'got {out.shape}')
  if not _int_at_least(num_classes, 2):
    raise UserError(f'num_classes must be an integer ≥ 2; got {num_classes!r}')
  y = np.asarray(labels)
  if y.shape != (reps.shape[0],) or y.dtype.kind not in 'iu':
    raise UserError(f'detector labels must be integers of shape ({reps.shape[0]},); got dtype {y.dtype}, '
                    f'shape {y.shape}')
  if y.min() < 0 or y.max() >= num_classes:
    raise UserError(f'detector labels must lie in [0, {num_classes}); got range [{y.min()}, {y.max()}]')
  hyper = {name: jnp.float32(getattr(options, name))
           for name in ('learning_rate', 'weight_decay', 'm_in', 'm_out', 'energy_weight')}
  hyper['drop_per_iteration'] = jnp.bool_(options.compat_lr_drop_per_iteration)
  variables, pre_losses, ft_losses = _fit(
      jax.random.PRNGKey(options.seed), jnp.asarray(reps), jnp.asarray(y, jnp.int32), jnp.asarray(out), hyper,
      arch=options.arch(), num_classes=int(num_classes), pretrain_epochs=int(options.pretrain_epochs),
      finetune_epochs=int(options.finetune_epochs), batch=min(int(options.batch_size), reps.shape[0]),
      half=min(int(options.batch_size) // 2, reps.shape[0], out.shape[0]))
  for phase, losses in (('pre-training', np.asarray(pre_losses)), ('energy fine-tuning', np.asarray(ft_losses))):
    bad = np.flatnonzero(~np.isfinite(losses))
    if bad.size:
      raise TrainingDiverged(f'detector training diverged: mean loss {losses[bad[0]]} in {phase} epoch {bad[0] + 1}'
                             f' (learning_rate {options.learning_rate}, energy_weight {options.energy_weight}); '
                             'lower learning_rate or energy_weight')
  if not all(bool(jnp.all(jnp.isfinite(v))) for v in jax.tree_util.tree_leaves(variables)):
    raise TrainingDiverged(f'detector training diverged: NaN/inf weights after the last step (learning_rate '
                           f'{options.learning_rate}); lower the learning rate')
  return variables


@functools.partial(jax.jit, static_argnames=('arch', 'eval_batch'))
def _eval_logits(variables, reps, *, arch, eval_batch):
  """Eval-mode logits float32 [n, K] of reps [n, ...], `eval_batch` examples per forward pass (`lax.map`)."""
  name, num_blocks, width, input_size = arch
  model = make_model(name, num_blocks, variables['params']['fc']['dense']['bias'].shape[0], width)
  n = reps.shape[0]
  chunks = -(-n // eval_batch)
  padded = jnp.pad(reps, [(0, chunks * eval_batch - n)] + [(0, 0)] * (reps.ndim - 1))
  logits = jax.lax.map(lambda x: model.apply(variables, _inputs(x, input_size), train=False),
                       padded.reshape((chunks, eval_batch) + reps.shape[1:]))
  return logits.reshape(chunks * eval_batch, -1)[:n]


def detector_logits(variables: Variables, reps, options: DetectorOptions = DetectorOptions()) -> jax.Array:
  """Eval-mode (BN running statistics) detector logits float32 [n, num_classes] of representations [n, H, W, C] or
  [n, D]; `options` must be those the detector was trained with (its architecture and input_size)."""
  options.validate()
  reps = _check_reps('representations', reps)
  channels = variables['params']['conv1']['conv']['kernel'].shape[2]  # every block model's stem conv
  if reps.shape[-1] != channels:
    raise UserError(f'the detector was trained on representations with {channels} channels; got shape {reps.shape}')
  return _eval_logits(variables, jnp.asarray(reps), arch=options.arch(),
                      eval_batch=min(int(options.eval_batch_size), reps.shape[0]))


def detector_scores(variables: Variables, reps, options: DetectorOptions = DetectorOptions()) -> np.ndarray:
  """OOD scores −E (T = 1) as float32 numpy [n]: higher = more in-distribution (feed `ood_metrics`)."""
  return np.asarray(-energy(detector_logits(variables, reps, options)))
