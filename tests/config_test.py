"""The run config: the keys every run shares, plus one section per method family (its defaults and its checks)."""
import json

import pytest

from s2f_jax import config as config_lib
from s2f_jax.errors import UserError
from s2f_jax.methods import CONFIG_SECTIONS
from s2f_jax.results import writer

from conftest import tiny_config

SHARED = {'experiment', 'method', 'seed', 'num_epochs', 'distributed', 'compilation_cache_dir', 'tensorboard', 'data',
          'model', 'train', 'grid', 'constraint', 'label_noise', 'debug', 'compat'}


def test_methods_own_their_sections():
  c = config_lib.base_config()
  assert set(CONFIG_SECTIONS) == {'fine_tune', 'adapter', 'robust', 'joint'}
  assert set(c) == SHARED | set(CONFIG_SECTIONS)  # no method option at the top level
  for name, section in CONFIG_SECTIONS.items():
    assert c[name].to_dict() == section.defaults().to_dict()
  assert (c.fine_tune.layers, c.fine_tune.mode, c.fine_tune.learning_rate_decay) == ('all', 'standard', 'exponential')
  assert (c.adapter.rank, c.adapter.mode, c.robust.dro_eta, c.robust.irm_penalty) == (4, 'add', 0.01, 10.0)


@pytest.mark.parametrize('overrides,words', [
    ({'fine_tune.mode': 'side'}, ["unknown fine_tune.mode 'side'", 'low_rank_adapt']),
    ({'fine_tune.layers': ' '}, ['fine_tune.layers', 'non-empty']),
    ({'fine_tune.learning_rate_decay': 'cosine'}, ['fine_tune.learning_rate_decay', 'exponential']),
    ({'fine_tune.mode': 'side_tune', 'fine_tune.ablate_init': True}, ['fine_tune.ablate_init', 'standard']),
    ({'adapter.mode': 'scale'}, ["unknown adapter.mode 'scale'", 'multiply']),
    ({'adapter.rank': 0}, ['adapter.rank=0', 'positive integer']),
    ({'adapter.side_layer_sizes': '8,x'}, ['adapter.side_layer_sizes', 'block']),
    ({'robust.irm_penalty': -1.0}, ['robust.irm_penalty=-1.0', 'non-negative']),
    ({'robust.irm_anneal_steps': -1}, ['robust.irm_anneal_steps=-1', 'non-negative integer']),
    ({'joint.grid': 'half'}, ["unknown joint.grid 'half'", 'released']),
])
def test_each_section_checks_its_own_keys(overrides, words):
  with pytest.raises(UserError) as e:
    config_lib.validate(tiny_config(**overrides))
  assert all(w in str(e.value) for w in words), str(e.value)


def test_configs_written_before_the_sections_are_read_with_their_keys_moved(tmp_path):
  new = config_lib.base_config().to_dict()
  old = {k: v for k, v in new.items() if k not in ('fine_tune', 'adapter', 'robust')}
  for old_key, (section, key) in writer.MOVED_KEYS.items():
    old[old_key] = new[section][key]
  path = tmp_path / 'config.json'
  path.write_text(json.dumps({'config': old}))
  assert writer.read_config(str(path)) == json.loads(json.dumps(new))  # every key of the sections had an old name
