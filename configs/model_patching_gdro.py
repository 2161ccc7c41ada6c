"""Model patching on the embedded digits, the GDRO baseline only (see configs/model_patching.py).

  python experiments/main.py --config=configs/model_patching_gdro.py --workdir=runs/model_patching_gdro

Runtime: about 1 min on 2 CPU cores (a fraction of the full comparison's 8 min, docs/results.md).
"""
from configs import model_patching


def get_config():
  return model_patching.get_config('gdro')
