"""The `fine_tune.layers` grammar (original.md S2F §3.4): which layers each fine-tuning stage trains.

- `all` or a comma set (`layer4,fc`): one stage;
- a dash list (`fc-all`): stages trained one after another, each from the previous stage's winner;
- shortcuts: `linear_probe_fine_tune` = `fc-all` (LP-FT); `gradual_unfreeze_first_to_last` adds one layer per stage
  from the input side (conv1 - conv1,layer1 - … - all: N+2 stages, the README's list; the original code skipped
  the stage before `all`, N+1 stages: `compat_stages`); `gradual_unfreeze_last_to_first` likewise from the output
  side;
- selectors: `search` (every non-empty subset of the layers), `surgical_rgn`, `surgical_snr` (the top-k layers by a
  gradient score, k = 1..N+2); the candidate with the best validation accuracy wins;
- `sequential_fine_tune` takes colon-separated per-step specs (one per target step, or one for all).
"""
from __future__ import annotations

import itertools

from s2f_jax.errors import UserError, choices_error
from s2f_jax.models import layer_names

SHORTCUTS = ('linear_probe_fine_tune', 'gradual_unfreeze_first_to_last', 'gradual_unfreeze_last_to_first')
SELECTORS = ('search', 'surgical_rgn', 'surgical_snr')

Plan = list  # a list of stages (tuples of layer names), or a selector name (str)


def layer_set(spec: str, num_blocks: int) -> tuple[str, ...]:
  """Layers of one stage: 'all' or a comma set such as 'layer4,fc' (in model order)."""
  names = layer_names(num_blocks)
  spec = spec.strip()
  if spec == 'all':
    return names
  chosen = [s.strip() for s in spec.split(',')]
  for name in chosen:
    if name not in names:
      raise choices_error('layer in fine_tune.layers', name, ('all',) + names + SHORTCUTS + SELECTORS)
  return tuple(n for n in names if n in chosen)


def layer_plan(spec: str, num_blocks: int, compat_stages: bool = False) -> list[tuple[str, ...]] | str:
  """One step's plan: the list of stages (each the tuple of tuned layers), or a selector name. `compat_stages`:
  gradual unfreezing without the stage before `all`, as the original code."""
  spec = spec.strip()
  names = layer_names(num_blocks)
  if spec in SELECTORS:
    return spec
  if spec == 'linear_probe_fine_tune':
    return [('fc',), names]
  if spec in ('gradual_unfreeze_first_to_last', 'gradual_unfreeze_last_to_first'):
    order = names if spec.endswith('first_to_last') else names[::-1]
    sizes = [k for k in range(1, len(names) + 1) if not (compat_stages and k == len(names) - 1)]
    return [tuple(n for n in names if n in order[:k]) for k in sizes]
  if ':' in spec:
    raise UserError(f"fine_tune.layers={spec!r}: ':' separates per-step specs, which only sequential_fine_tune takes")
  return [layer_set(part, num_blocks) for part in spec.split('-')]


def step_plans(spec: str, num_steps: int, num_blocks: int, compat_stages: bool = False) -> list:
  """Plans of steps 1..T−1 for sequential fine-tuning: colon-separated, one per target step or one for all."""
  parts = spec.split(':')
  if len(parts) == 1:
    parts = parts * (num_steps - 1)
  if len(parts) != num_steps - 1:
    raise UserError(f'fine_tune.layers={spec!r} has {len(parts)} per-step specs; the sequence has '
                    f'{num_steps - 1} target steps (give one spec, or one per target step)')
  return [layer_plan(p, num_blocks, compat_stages) for p in parts]


def stage_tag(layers: tuple[str, ...], num_blocks: int) -> str:
  """'all' for every layer, else the layers joined by '_' (file-name safe)."""
  return 'all' if tuple(layers) == layer_names(num_blocks) else '_'.join(layers)


def all_subsets(num_blocks: int) -> list[tuple[str, ...]]:
  """Every non-empty subset of the layers (2^(N+2) − 1), by size then model order; the full set last."""
  names = layer_names(num_blocks)
  return [c for k in range(1, len(names) + 1) for c in itertools.combinations(names, k)]


def top_k_sets(scores: dict[str, float], num_blocks: int) -> list[tuple[str, ...]]:
  """Surgical candidates: the top-1, top-2, …, all layers by descending score (each in model order)."""
  names = layer_names(num_blocks)
  ranked = sorted(names, key=lambda n: -scores[n])
  return [tuple(n for n in names if n in ranked[:k]) for k in range(1, len(names) + 1)]
