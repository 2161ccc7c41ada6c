"""Costs of learning the transferability transforms (`s2f_jax.transfer.bound.learn_transforms`), side by side:

1. one optimisation step with the exact EMD coupling (POT network simplex on the host, via a callback) against the
   exact assignment solver (scipy) and entropic Sinkhorn (ott-jax, in the compiled step), at batch 500 and 1000;
2. the whole LearnedAll run at the small-scale defaults (1001 steps, batch 500, EMD).

Data: 10 Gaussian classes in d = 128 (source) and a rotated, shifted copy (target), 5000 examples each, standardised.
Per-step time = (time of 60 steps − time of 20 steps) / 40 with chunks of 20, so compilation cancels. Run:
PYTHONPATH=. python benchmarks/transfer_benchmark.py
"""
from __future__ import annotations

import time

import jax.numpy as jnp
import numpy as np
from timing import best_time

from s2f_jax.transfer.bound import TransferOptions, learn_transforms
from s2f_jax.transfer.features import Task, standardize
from s2f_jax.transfer.heads import HeadOptions, train_head

K, DIM, N = 10, 128, 5000


def tasks():
  rng = np.random.default_rng(0)
  y = np.arange(N) % K
  means = 3.0 * rng.normal(size=(K, DIM))
  source = Task((means[y] + rng.normal(size=(N, DIM))).astype(np.float32), y.astype(np.int32), K)
  rotation, _ = np.linalg.qr(rng.normal(size=(DIM, DIM)))
  target = Task((source.z @ rotation.T + 1.0).astype(np.float32), y.astype(np.int32), K)
  return standardize(source)[0], standardize(target)[0]


def per_step(head, source, target, **options) -> float:
  run = lambda steps: best_time(lambda: learn_transforms(head, source, target, TransferOptions(
      num_steps=steps, log_every=20, **options)), repeats=2)[0]
  return (run(60) - run(20)) / 40


def main():
  source, target = tasks()
  head = train_head(source.z, source.y, K, HeadOptions(tau=1.0, penalty='spectral', learning_rate=1e-2,
                                                       num_epochs=20))
  print('| batch | EMD s/step | assignment s/step | Sinkhorn s/step | EMD / Sinkhorn |')
  print('|---|---|---|---|---|')
  for batch in (500, 1000):
    emd = per_step(head, source, target, batch_size=batch, solver='emd')
    assignment = per_step(head, source, target, batch_size=batch, solver='assignment')
    sinkhorn = per_step(head, source, target, batch_size=batch, solver='sinkhorn', label_weight=10.0)
    print(f'| {batch} | {emd:.4f} | {assignment:.4f} | {sinkhorn:.4f} | {emd / sinkhorn:.2f}× |')
  start = time.perf_counter()
  params, _, history = learn_transforms(head, source, target, TransferOptions())
  seconds = time.perf_counter() - start
  print(f'\nLearnedAll, 1001 steps, batch 500, EMD: {seconds:.1f} s in all (compilation included); '
        f'final objective {history[-1]["objective"]:.4g}, ‖A‖_F = {float(jnp.linalg.norm(params["A"])):.3g}')


if __name__ == '__main__':
  main()
