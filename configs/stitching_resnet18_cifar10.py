r"""Model stitching between two CIFAR ResNet-18 donors on CIFAR-10, the stitching paper's setting at its architecture.

The study of configs/stitching.py with `model.name=resnet_cifar`, 4 blocks, width 64 (3×3 stem without pooling, so
layer1..layer4 are 32×32, 16×16, 8×8 and 4×4 feature maps on 32×32 images; 11.2 M parameters), `rc2c_pre` stitches
and CIFAR-10 from an image folder or the official archive under `data.root`. Sized for an accelerator: on 2 CPU cores
one donor epoch over 10 000 images takes minutes.

  python experiments/main.py --config=configs/stitching_resnet18_cifar10.py --config.data.root=<dir> \
      --workdir=runs/stitching_resnet18
"""
from configs import stitching


def get_config():
  c = stitching.get_config()
  c.data.name, c.data.image_size = 'cifar10', 32
  c.data.source_size, c.data.test_size = 10000, 1000
  c.model.name, c.model.num_blocks, c.model.width = 'resnet_cifar', 4, 64
  c.train.batch_size = 128
  c.num_epochs = 30
  c.stitching.similarity_samples = 1500  # the evaluation split: 2000 valid images less the 500 selecting the donors
  return c
