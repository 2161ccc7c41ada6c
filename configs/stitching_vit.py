r"""Model stitching between two small ViT donors on the embedded digits: token-to-token (`t2t`) stitches.

The study of configs/stitching.py with ViT donors (`model.name=vit`: 4×4 patches, width 32, 2 encoder blocks, so
every layer's activations are 64 tokens of 32 channels on 32×32 digits) and the `t2t` stitching layer, a linear map
of each token's channels. The OOD detectors see the tokens as their 8×8 patch grid; the similarity indices take the
mean over tokens.

  python experiments/main.py --config=configs/stitching_vit.py --workdir=runs/stitching_vit
"""
from configs import stitching


def get_config():
  c = stitching.get_config()
  c.model.name, c.model.num_blocks, c.model.width = 'vit', 2, 32
  c.stitching.kind = 't2t'
  return c
