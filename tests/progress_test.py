"""Tests of `s2f_jax.training.progress`: bars only on a terminal outside CI, with an ETA, and a quiet `fit`."""
import io
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
from s2f_jax.data.sources import load_digits
from s2f_jax.models import make_model
from s2f_jax.training import grid as grid_lib
from s2f_jax.training.loop import Examples, FitOptions, Learner, fit
from s2f_jax.training.objective import InputScaling
from s2f_jax.training.progress import progress_bar, progress_enabled


class _Terminal(io.StringIO):
  """A stderr that says it is a terminal and keeps what is written to it."""

  def isatty(self):
    return True


def _terminal(monkeypatch) -> _Terminal:
  """Unsets CI and makes stderr a terminal (in the test body: pytest's capture resets sys.stderr after setup)."""
  monkeypatch.delenv('CI', raising=False)
  stderr = _Terminal()
  monkeypatch.setattr(sys, 'stderr', stderr)
  return stderr


def test_enabled_only_on_a_terminal_outside_ci(monkeypatch):
  _terminal(monkeypatch)
  assert progress_enabled()
  for value in ('true', '1', 'yes'):
    monkeypatch.setenv('CI', value)
    assert not progress_enabled()
  for value in ('', '0', 'false', 'False'):
    monkeypatch.setenv('CI', value)
    assert progress_enabled()
  monkeypatch.delenv('CI')
  monkeypatch.setattr(sys, 'stderr', io.StringIO())  # not a terminal (e.g. redirected to a log file)
  assert not progress_enabled()


def test_disabled_bar_writes_nothing(monkeypatch):
  terminal = _terminal(monkeypatch)
  monkeypatch.setenv('CI', 'true')
  bar = progress_bar(3, 'stage')
  bar.update(3)
  bar.set_postfix(best_valid='0.5')
  bar.close()
  assert terminal.getvalue() == ''


def test_enabled_bar_shows_count_eta_and_postfix_then_clears(monkeypatch):
  terminal = _terminal(monkeypatch)
  bar = progress_bar(4, 'stage x')
  bar.update(1)
  bar.set_postfix(best_valid='0.500')
  out = terminal.getvalue()
  assert out.startswith('\rstage x:   0%|') and '| 0/4 [00:00<?, ?epoch/s]' in out
  assert re.search(r'stage x:  25%\|[^|]*\| 1/4 \[\d\d:\d\d<\d\d:\d\d, [^\]]*, best_valid=0\.500\]', out), out
  bar.close()  # leave=False: the line is blanked when the bar closes
  assert re.fullmatch(r'\r *\r', terminal.getvalue()[len(out):])


def _tiny_fit(num_epochs: int, checkpoint_dir: str | None = None):
  """One run of a width-8 ConvNet on 64 + 64 16×16 digits."""
  digits = load_digits(16)
  images, labels = digits.train_images[:128], digits.train_labels[:128].astype(np.int32)
  train, valid = (Examples(images[s], labels[s], np.ones(64, np.float32)) for s in (slice(64), slice(64, 128)))
  model = make_model('convnet', 1, 10, width=8)
  init = jax.jit(lambda k: model.init(k, jnp.zeros((1, 16, 16, 3)), train=False))(jax.random.key(0))
  grid = grid_lib.product_grid({'learning_rate': (1e-3,), 'weight_decay': (0.0,), 'dropout': (0.0,)})
  learner = Learner(model, InputScaling.standardise(train.images), ())
  options = FitOptions(num_epochs=num_epochs, patience=10, batch_size=32, description='tiny stage',
                       checkpoint_dir=checkpoint_dir, checkpoint_every_s=0)
  return fit(learner, grid_lib.stack(jax.device_get(init), 1), grid, jnp.stack([jax.random.key(1)]), train, valid,
             options)


def test_fit_is_silent_under_ci_or_without_a_terminal(monkeypatch, capfd):
  monkeypatch.setenv('CI', 'true')
  assert [h['epoch'] for h in _tiny_fit(2).history] == [0, 1, 2]
  assert capfd.readouterr().err == ''
  monkeypatch.delenv('CI')
  assert not sys.stderr.isatty()  # pytest's capture
  assert [h['epoch'] for h in _tiny_fit(1).history] == [0, 1]
  assert capfd.readouterr().err == ''


def test_fit_on_a_terminal_reports_every_epoch(monkeypatch, tmp_path):
  """Every epoch's refresh shows the count, an ETA and the best valid accuracy; a resumed fit counts on from its
  checkpoint's epoch."""
  terminal = _terminal(monkeypatch)
  result = _tiny_fit(2, str(tmp_path / 'ckpt'))
  out = terminal.getvalue()
  best = result.best_valid_accuracy[0]
  for epoch in (1, 2):
    assert re.search(rf'tiny stage: +\d+%\|[^|]*\| {epoch}/2 \[\d\d:\d\d<\d\d:\d\d, [^\]]*'
                     rf'best_valid=\d\.\d{{3}}, running=1\]', out), out
  assert f'best_valid={best:.3f}, running=1]' in out
  resumed = _tiny_fit(4, str(tmp_path / 'ckpt')).history
  assert [h['epoch'] for h in resumed] == [0, 1, 2, 3, 4]
  later = terminal.getvalue()[len(out):]
  assert '| 0/4 [' in later and '| 3/4 [' in later and '| 4/4 [' in later
  assert '| 1/4 [' not in later and '| 2/4 [' not in later  # epochs 1-2 were restored, not retrained
