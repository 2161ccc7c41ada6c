r"""Model stitching between two donors at every layer pair (Balogh & Jelasity 2025; s2f_jax.stitching).

  python experiments/stitching.py --config=configs/stitching.py [--workdir=DIR] [--config.KEY=VALUE ...]

Trains the two donors, then per front × end layer pair the DM and TLM stitches with their accuracy, structural
error and OOD AUROC, and the similarity indices; per layer the sensitivity test; and the specificity test. Prints
the pair table and writes pairs.{jsonl,csv}, sensitivity.{jsonl,csv}, specificity.json, table.md and heatmaps.pdf
to <workdir>/stitching/ (a finished experiment is read back).
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402

from s2f_jax import cli  # noqa: E402
from s2f_jax.stitching import layer_pairs  # noqa: E402

_CONFIG = cli.define_config('configs/stitching.py')
_WORKDIR = flags.DEFINE_string('workdir', 'runs/stitching', 'Output folder.')


def main(argv):
  if len(argv) > 1:
    raise cli.UserError(f'unexpected arguments {argv[1:]}; use --config.KEY=VALUE')
  config = cli.config_value(_CONFIG)
  if 'stitching' not in config:
    raise cli.UserError('the config has no stitching section; use configs/stitching.py or add '
                        's2f_jax.stitching.layer_pairs.stitching_config() as config.stitching')
  out = layer_pairs.run(config, _WORKDIR.value)
  print(layer_pairs.markdown(out['pairs']))
  layers = tuple(dict.fromkeys(r['front_layer'] for r in out['pairs']))
  print(json.dumps({k: v['hit_rate'] for k, v in layer_pairs.specificity(out['pairs'], layers).items()}))
  print(os.path.join(_WORKDIR.value, 'stitching'))


if __name__ == '__main__':
  cli.run_app(main)
