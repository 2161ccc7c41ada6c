"""TensorBoard event files hold exactly the per-epoch metrics of history.jsonl; `tensorboard=False` writes none."""
import glob
import json
import os
import struct
import subprocess
import sys

from tensorboardX.proto import event_pb2

from conftest import ROOT, run_small


def _scalars(folder: str) -> dict[tuple[str, int], float]:
  """{(tag, step): value} of every event file in `folder`, read record by record (TFRecord framing: u64 length,
  u32 crc, payload, u32 crc)."""
  out = {}
  for path in glob.glob(os.path.join(folder, 'events.out.tfevents.*')):
    data = open(path, 'rb').read()
    pos = 0
    while pos < len(data):
      (length,) = struct.unpack('<Q', data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
      pos += 12 + length + 4
      for value in event.summary.value:
        out[(value.tag, event.step)] = value.simple_value
  return out


def test_event_files_match_history(tmp_path):
  run_small(tmp_path, **{'grid.learning_rate': (1e-3, 1e-4)})
  method_dir = tmp_path / 'erm_fine_tune'
  history = [json.loads(line) for line in open(method_dir / 'history.jsonl')]
  own = [h for h in history if h['stage'] == 'fine_tune_all']
  assert len(own) == 2 * 3  # 2 runs × epochs 0, 1, 2
  for h in own:
    folder = method_dir / 'tensorboard' / 'fine_tune_all' / (
        f'run{h["run"]}_learning_rate={h["learning_rate"]:g}_weight_decay={h["weight_decay"]:g}'
        f'_dropout={h["dropout"]:g}')
    scalars = _scalars(str(folder))
    for key in ('train_loss', 'train_accuracy', 'valid_loss', 'valid_accuracy'):
      tag = key.replace('_', '/', 1)
      assert abs(scalars[(tag, h['epoch'])] - h[key]) <= 1e-6 * max(1.0, abs(h[key])), (tag, h['epoch'])
  # the shared history stage writes its curves beside the shared cache's history.jsonl
  shared = glob.glob(str(tmp_path / 'shared' / '*' / 'tensorboard' / '*' / 'run0_*'))
  assert shared and _scalars(shared[0])


def test_tensorboard_off_writes_no_event_files(tmp_path):
  run_small(tmp_path, tensorboard=False)
  assert not glob.glob(str(tmp_path / '**' / 'events.out.tfevents.*'), recursive=True)
  assert (tmp_path / 'erm_fine_tune' / 'history.jsonl').exists()


def test_writer_leaves_torch_unimported(tmp_path):
  """tensorboardX imports torch whenever it is installed; a stand-in torch package on the path shows that writing
  event files does not load it, and that it still imports afterwards."""
  (tmp_path / 'torch').mkdir()
  (tmp_path / 'torch' / '__init__.py').write_text('Tensor = object\n')
  code = ('import sys, numpy as np\n'
          'from s2f_jax.results import tensorboard\n'
          "writer = tensorboard.EpochWriter(sys.argv[1], {'learning_rate': np.array([1e-3])})\n"
          "writer({'epoch': 0, 'train_loss': np.array([0.5])})\n"
          'writer.close()\n'
          "print('torch' in sys.modules)\n"
          'import torch\n'
          'print(torch.__file__)\n')
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), ROOT]), JAX_PLATFORMS='cpu')
  done = subprocess.run([sys.executable, '-c', code, str(tmp_path / 'events')], env=env, capture_output=True,
                        text=True, timeout=120)
  assert done.returncode == 0, done.stderr[-3000:]
  assert done.stdout.splitlines() == ['False', str(tmp_path / 'torch' / '__init__.py')]
  (folder,) = glob.glob(str(tmp_path / 'events' / 'run0_*'))
  assert _scalars(folder) == {('train/loss', 0): 0.5}
