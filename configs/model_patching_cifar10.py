r"""Model patching on real CIFAR-10 at a CPU scale: vehicle vs animal with a spurious red tint.

10 000 base training images (5 000 train, 5 000 valid), P(z = y) = 0.98 (z = 1: two recolour blocks), the balanced test
split from the 10 000 test images (each clean and tinted); ConvNet-2 width 32; 15 stage-2 epochs; stage-1 CycleGANs of
100 epochs per class. Needs the CIFAR-10 files under data.root:

  python experiments/main.py --config=configs/model_patching_cifar10.py \
      --workdir=runs/model_patching_cifar10 --config.data.root=../shared/data

Runtime: 30 min on 2 CPU cores (docs/results.md; stage 1's two CycleGANs and CAMEL take most of it).
"""
from configs import model_patching


def get_config():
  c = model_patching.get_config()
  c.data.name = 'cifar10'
  c.model.width = 32
  p = c.patching
  p.class_task, p.correlation, p.size = 'vehicle_animal', 0.98, 10000
  p.num_epochs = 15
  p.stage1.num_epochs = 100
  return c
