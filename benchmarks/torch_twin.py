"""PyTorch eager twin of the original code's block models and grid fit (original.md S2F §2, §3.2–§3.3), for the
cost benchmarks only (`original_cost.py`, `accelerator.py`); the library and its tests never import torch.

Models: the same layer shapes and parameter counts as `s2f_jax.models` (conv1, layer1..layerN, fc; `width` scales
every channel count by width/64, 64 = paper), PyTorch's default init, functional dropout after every layer but fc.
The ConvNet blocks have no ReLU, as the original (`relu=True` adds one, as the library's default).

Fit, as the original's `tune_hyperparameters_for_model` / `fit_single_model`: the 8-point grid lr × λ × dropout
in `product` order, each point a fresh model trained with Adam (torch defaults, no decoupled decay) on mean CE +
λ·Σw² over conv weights and the fc weight and bias; batch 100 from a shuffled `DataLoader` over float 0–255 NCHW
inputs (last partial batch kept); after every epoch the full train and valid sets are evaluated in eval mode; the
best epoch by valid accuracy (strictly better, epoch 0 included) is kept as a `state_dict` deep copy; early stopping
counts epochs whose valid accuracy is ≤ the previous epoch's and stops when the count exceeds 5. The winner (highest
valid accuracy, first on ties) is saved gzip-compressed and evaluated on the test set.

  python benchmarks/torch_twin.py --data=FINAL_STEP.npz --model=resnet --blocks=1 [--width=64 --epochs=5
      --device=cpu --out=result.json]

FINAL_STEP.npz holds uint8 NHWC train_images, valid_images, test_images and int train_labels, valid_labels,
test_labels. The result (JSON) holds train seconds (epochs 1.. of every run: optimisation passes and the per-epoch
evaluations; epoch 0 and the test evaluation excluded), examples per second over them, epochs per run, valid and
test accuracies and parameter counts.
"""
from __future__ import annotations

import argparse
import copy
import gzip
import io
import itertools
import json
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

PAPER_WIDTH = 64
GRID = {'learning_rate': (1e-3, 1e-4), 'weight_decay': (1e-4, 1e-2), 'dropout': (0.0, 0.5)}
PATIENCE = 5
BATCH_SIZE = 100


def scaled(channels: int, width: int) -> int:
  return channels * width // PAPER_WIDTH


def block_dims(num_blocks: int, width: int) -> list[tuple[int, int]]:
  """(out_channels, stride) of each ConvNet/ResNet block (original.md S2F §2.2), scaled to `width`."""
  if num_blocks <= 3:
    out, strides = {1: [512], 2: [128, 512], 3: [128, 256, 512]}[num_blocks], [2] * num_blocks
  else:
    out, strides = [64, 128, 256] + [512] * (num_blocks - 3), [1] * (num_blocks - 3) + [2] * 3
  return [(scaled(o, width), s) for o, s in zip(out, strides)]


def conv(cin: int, cout: int, kernel: int, stride: int = 1) -> nn.Conv2d:
  return nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False)


def stem(width: int) -> nn.Sequential:
  """conv1: conv 7×7 s2 → BN → ReLU → max-pool 3×3 s2 pad 1. [B, 3, H, W] -> [B, width, H/4, W/4]."""
  return nn.Sequential(conv(3, width, 7, 2), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(3, 2, 1))


def pooled_head(features: int, num_classes: int, pre_norm: bool = False) -> nn.Sequential:
  """fc: [BN → ReLU →] global average pool → Linear. [B, C, H, W] -> [B, num_classes]."""
  norm = [nn.BatchNorm2d(features), nn.ReLU()] if pre_norm else []
  return nn.Sequential(*norm, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(features, num_classes))


class BasicBlock(nn.Module):
  """torchvision's BasicBlock: conv 3×3 → BN → ReLU → conv 3×3 → BN → (+ shortcut) → ReLU; the shortcut is conv 1×1
  → BN when the stride or the channel count changes."""

  def __init__(self, cin: int, cout: int, stride: int = 1):
    super().__init__()
    self.conv1, self.bn1 = conv(cin, cout, 3, stride), nn.BatchNorm2d(cout)
    self.conv2, self.bn2 = conv(cout, cout, 3), nn.BatchNorm2d(cout)
    self.downsample = (nn.Sequential(conv(cin, cout, 1, stride), nn.BatchNorm2d(cout))
                       if stride != 1 or cin != cout else None)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
    return F.relu(y + (x if self.downsample is None else self.downsample(x)))


class DenseLayer(nn.Module):
  """torchvision's _DenseLayer: BN → ReLU → conv 1×1 (→ 4·growth) → BN → ReLU → conv 3×3 (→ growth), concatenated."""

  def __init__(self, cin: int, growth: int):
    super().__init__()
    self.body = nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU(), conv(cin, 4 * growth, 1), nn.BatchNorm2d(4 * growth),
                              nn.ReLU(), conv(4 * growth, growth, 3))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, self.body(x)], 1)


def dense_block(cin: int, num_layers: int, growth: int, transition: bool) -> tuple[nn.Sequential, int]:
  """(block, its output channels): dense layers, then (transition) BN → ReLU → conv 1×1 (f → f//2) → avg-pool 2."""
  layers = [DenseLayer(cin + i * growth, growth) for i in range(num_layers)]
  f = cin + num_layers * growth
  if transition:
    layers += [nn.BatchNorm2d(f), nn.ReLU(), conv(f, f // 2, 1), nn.AvgPool2d(2, 2)]
    f //= 2
  return nn.Sequential(*layers), f


def dense_layer_counts(num_blocks: int) -> list[int]:
  if num_blocks <= 2:
    return [6, 16][2 - num_blocks:]
  return [6, 12] + [24] * (num_blocks - 3) + [16]


class BlockModel(nn.Module):
  """conv1 → layer1..layerN → fc with functional dropout (rate `dropout`) on every layer's output but fc's.
  forward: float [B, 3, H, W] -> logits [B, num_classes]."""

  def __init__(self, layers: list[nn.Module], dropout: float = 0.0):
    super().__init__()
    self.layers, self.dropout = nn.ModuleList(layers), dropout

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    for layer in self.layers[:-1]:
      x = F.dropout(layer(x), self.dropout, self.training)
    return self.layers[-1](x)


def make_twin(name: str, num_blocks: int, num_classes: int = 10, width: int = PAPER_WIDTH, dropout: float = 0.0,
              relu: bool = False) -> BlockModel:
  """The torch twin of `s2f_jax.models.make_model(name, num_blocks, num_classes, width)`; relu: ConvNet only."""
  if name == 'densenet':
    counts, blocks, f = dense_layer_counts(num_blocks), [], width
    for i, n in enumerate(counts):
      block, f = dense_block(f, n, width // 2, i < len(counts) - 1)
      blocks.append(block)
    return BlockModel([stem(width), *blocks, pooled_head(f, num_classes, pre_norm=True)], dropout)
  blocks, cin = [], width
  for cout, stride in block_dims(num_blocks, width):
    if name == 'convnet':
      blocks.append(nn.Sequential(conv(cin, cout, 3, stride), nn.BatchNorm2d(cout), *([nn.ReLU()] if relu else [])))
    elif name == 'resnet':
      blocks.append(nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout)))
    else:
      raise ValueError(f'unknown model {name!r}; valid: convnet, resnet, densenet')
    cin = cout
  return BlockModel([stem(width), *blocks, pooled_head(cin, num_classes)], dropout)


def decay_params(model: BlockModel) -> list[torch.Tensor]:
  """The original's `compute_param_norm` set: every conv weight (ResNet downsample convs included), fc weight, bias."""
  fc = model.layers[-1][-1]
  return [m.weight for m in model.modules() if isinstance(m, nn.Conv2d)] + [fc.weight, fc.bias]


def count_params(model: nn.Module) -> int:
  """Trainable scalars (BN scales and biases included), as `s2f_jax.models.count_params` of the params."""
  return sum(p.numel() for p in model.parameters())


def loader(images: np.ndarray, labels: np.ndarray, shuffle: bool) -> torch.utils.data.DataLoader:
  """Batches of 100 of float 0–255 NCHW images, as the original (uint8 NHWC in)."""
  x = torch.from_numpy(images).float().permute(0, 3, 1, 2).contiguous()
  data = torch.utils.data.TensorDataset(x, torch.from_numpy(labels.astype(np.int64)))
  return torch.utils.data.DataLoader(data, batch_size=BATCH_SIZE, shuffle=shuffle)


def evaluate(model: nn.Module, batches: torch.utils.data.DataLoader, device: torch.device) -> tuple[float, float]:
  """(mean CE, accuracy) in eval mode."""
  model.eval()
  loss, correct, n = 0.0, 0, 0
  with torch.no_grad():
    for x, y in batches:
      x, y = x.to(device), y.to(device)
      logits = model(x)
      loss += F.cross_entropy(logits, y, reduction='sum').item()
      correct += (logits.argmax(1) == y).sum().item()
      n += len(y)
  return loss / n, correct / n


def train_pass(model: BlockModel, batches: torch.utils.data.DataLoader, optimizer: torch.optim.Optimizer,
               weight_decay: float, device: torch.device) -> None:
  model.train()
  for x, y in batches:
    x, y = x.to(device), y.to(device)
    optimizer.zero_grad()
    penalty = sum(p.square().sum() for p in decay_params(model))
    (F.cross_entropy(model(x), y) + weight_decay * penalty).backward()
    optimizer.step()


def synchronized(device: torch.device) -> float:
  """time.perf_counter() after the device's queued work has finished."""
  if device.type == 'cuda':
    torch.cuda.synchronize(device)
  return time.perf_counter()


def fit_single_model(model: BlockModel, lr: float, weight_decay: float, train, valid, epochs: int,
                     device: torch.device) -> dict:
  """One grid point: {'state': best state_dict, 'valid_accuracy', 'epochs' run, 'seconds' (epochs 1..), 'pass_seconds'
  (their optimisation passes alone)}."""
  optimizer = torch.optim.Adam(model.parameters(), lr=lr)
  evaluate(model, train, device)  # the original evaluates (and logs) the train set every epoch, epoch 0 included
  best_acc = previous = evaluate(model, valid, device)[1]
  best_state, counter, seconds, pass_seconds, epoch = copy.deepcopy(model.state_dict()), 0, 0.0, 0.0, 0
  while epoch < epochs and counter <= PATIENCE:
    epoch += 1
    tic = synchronized(device)
    train_pass(model, train, optimizer, weight_decay, device)
    pass_seconds += synchronized(device) - tic
    evaluate(model, train, device)  # as at epoch 0: only its cost matters here
    acc = evaluate(model, valid, device)[1]
    if acc > best_acc:
      best_acc, best_state = acc, copy.deepcopy(model.state_dict())
    counter = counter + 1 if acc <= previous else 0
    previous = acc
    seconds += synchronized(device) - tic
  return {'state': best_state, 'valid_accuracy': best_acc, 'epochs': epoch, 'seconds': seconds,
          'pass_seconds': pass_seconds}


def fit_grid(name: str, num_blocks: int, width: int, data: dict[str, np.ndarray], epochs: int, device: str = 'cpu',
             seed: int = 1007, save_dir: str | None = None) -> dict:
  """The original's tuned fit of one stage on `data` (the npz arrays); returns the JSON-able result (module doc)."""
  torch.manual_seed(seed)
  dev = torch.device(device)
  num_classes = int(max(data['train_labels'].max(), data['valid_labels'].max(), data['test_labels'].max())) + 1
  train = loader(data['train_images'], data['train_labels'], shuffle=True)
  valid, test = (loader(data[f'{s}_images'], data[f'{s}_labels'], shuffle=False) for s in ('valid', 'test'))
  runs, best = [], None
  for lr, wd, rate in itertools.product(*GRID.values()):
    model = make_twin(name, num_blocks, num_classes, width, rate).to(dev)
    run = fit_single_model(model, lr, wd, train, valid, epochs, dev)
    runs.append(dict(learning_rate=lr, weight_decay=wd, dropout=rate, **{k: v for k, v in run.items() if k != 'state'}))
    if best is None or run['valid_accuracy'] > best[1]['valid_accuracy']:
      best = (model, run)
  model, run = best
  model.load_state_dict(run['state'])
  if save_dir:  # the original caches the winner as a gzip-compressed state_dict
    blob = io.BytesIO()
    torch.save(run['state'], blob)
    with gzip.open(os.path.join(save_dir, 'best_model.pt.gz'), 'wb') as f:
      f.write(blob.getvalue())
  seconds = sum(r['seconds'] for r in runs)
  pass_seconds = sum(r['pass_seconds'] for r in runs)
  examples = len(data['train_labels']) * sum(r['epochs'] for r in runs)
  return {'train_seconds': seconds, 'examples_per_second': examples / seconds,
          'pass_examples_per_second': examples / pass_seconds, 'epochs': [r['epochs'] for r in runs],
          'valid_accuracy': [r['valid_accuracy'] for r in runs], 'test_accuracy': evaluate(model, test, dev)[1],
          'num_params': count_params(model), 'num_decay_params': sum(p.numel() for p in decay_params(model)),
          'torch_threads': torch.get_num_threads(), 'device': str(dev), 'torch_version': torch.__version__}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--data', required=True, help='npz of the final step (module docstring)')
  parser.add_argument('--model', required=True, choices=('convnet', 'resnet', 'densenet'))
  parser.add_argument('--blocks', type=int, required=True)
  parser.add_argument('--width', type=int, default=PAPER_WIDTH)
  parser.add_argument('--epochs', type=int, default=100)
  parser.add_argument('--device', default='cpu')
  parser.add_argument('--seed', type=int, default=1007)
  parser.add_argument('--out', help='write the result JSON here (default: stdout)')
  args = parser.parse_args()
  with np.load(args.data) as f:
    data = dict(f)
  save_dir = os.path.dirname(os.path.abspath(args.out)) if args.out else None
  result = json.dumps(fit_grid(args.model, args.blocks, args.width, data, args.epochs, args.device, args.seed,
                               save_dir))
  if args.out:
    with open(args.out, 'w') as f:
      f.write(result + '\n')
  else:
    print(result)


if __name__ == '__main__':
  main()
