r"""Model stitching (Balogh & Jelasity 2025) on the embedded digits: two ConvNet-2 donors, every layer pair.

Donors: ConvNet-2 (width 16) trained by ERM on 800 clean 32×32 digits from two initialisations; stitches rc2c_pre
(bilinear resize + 1×1 conv) between conv1, layer1 and layer2 of donor A (front) and donor B (end): direct matching
on 100 images, task-loss matching for 10 epochs, energy detectors per end layer with rotated digits as outliers,
CKA / PWCCA / Procrustes on pooled activations, and the sensitivity (with DM and TLM self-stitches) and specificity
tests (`s2f_jax/stitching/layer_pairs.py`). The donors select their epochs on 50 of the 200 source valid images; the
other 150 are the evaluation split. `--config.stitching.seeds=1,2,3` runs one study per seed and the mean ± std.

  python experiments/main.py --config=configs/stitching.py --workdir=runs/stitching

Runtime: 7 min 43 s on 2 idle CPU cores before the sensitivity self-stitches (docs/results.md); they add up to 17
short TLM trainings, 3 compilations (`--config.stitching.self_stitch=False` skips them).
"""
from s2f_jax.config import base_config
from s2f_jax.stitching.layer_pairs import stitching_config


def get_config():
  c = base_config()
  c.experiment = 'stitching'
  c.num_epochs = 15
  c.data.name, c.data.image_size = 'digits', 32
  c.data.source_size, c.data.test_size = 1000, 200
  c.model.name, c.model.num_blocks, c.model.width = 'convnet', 2, 16
  c.train.batch_size = 50
  c.grid.learning_rate, c.grid.weight_decay, c.grid.dropout = (1e-3,), (1e-4,), (0.0,)
  c.stitching = stitching_config()
  c.stitching.similarity_samples = 150  # the whole evaluation split (valid split of 200 less 50 selecting the donors)
  c.stitching.tlm_learning_rate = 1e-2  # 130 TLM steps (10 epochs of 640 images) instead of the original's ~6000
  return c
