"""FitBatcher's scheduling, with stand-in requests and a stand-in `fit_together` (the merged fit itself is tested in
loop_test and sweep_test): fits waited for at the same time merge by key, and a failing merged fit is retried per
request so that only the task whose own fit fails sees the error."""
from __future__ import annotations

import dataclasses

import pytest

from s2f_jax.training import merged


@dataclasses.dataclass(frozen=True)
class Request:
  name: str
  key: str = 'a'
  bad: bool = False

  def merge_key(self):
    return self.key


@pytest.fixture
def calls(monkeypatch):
  """Replaces fit_together: records each call's request names; fails when a bad request is among them."""
  log = []

  def fake(requests):
    log.append(tuple(sorted(r.name for r in requests)))  # threads queue in any order
    if any(r.bad for r in requests):
      raise FloatingPointError(f'NaN loss in {[r.name for r in requests if r.bad]}')
    return [f'result {r.name}' for r in requests]

  monkeypatch.setattr(merged, 'fit_together', fake)
  return log


def task(*requests):
  """A task that asks for its requests' fits one after another and returns their results."""
  return lambda batcher: [batcher.fit(r) for r in requests]


def test_waiting_fits_merge_by_key(calls):
  outcomes = merged.FitBatcher().run([task(Request('s0-a'), Request('s0-b', key='b')),
                                      task(Request('s1-a'), Request('s1-b', key='b')),
                                      task(Request('s2-c', key='c'))])
  assert outcomes == [(['result s0-a', 'result s0-b'], None), (['result s1-a', 'result s1-b'], None),
                      (['result s2-c'], None)]
  # round 1: every task waits for its first fit: keys a (two tasks) and c; round 2: the two b fits
  assert sorted(calls) == [('s0-a', 's1-a'), ('s0-b', 's1-b'), ('s2-c',)]
  assert calls[-1] == ('s0-b', 's1-b')


def test_failing_merged_fit_retries_each_alone(calls):
  outcomes = merged.FitBatcher().run([task(Request('s0'), Request('s0-next')), task(Request('s1', bad=True)),
                                      task(Request('s2'))])
  assert calls[0] == ('s0', 's1', 's2') and sorted(calls[1:4]) == [('s0',), ('s1',), ('s2',)]
  assert outcomes[0] == (['result s0', 'result s0-next'], None)
  assert outcomes[2] == (['result s2'], None)
  value, error = outcomes[1]
  assert value is None and isinstance(error, FloatingPointError) and str(error) == "NaN loss in ['s1']"
  assert calls[4:] == [('s0-next',)]
