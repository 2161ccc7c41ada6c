"""The method registry: name → `Method` (an unknown name is a UserError listing these), and the config sections the
method families own (name → `ConfigSection`; `config.base_config` adds them and `config.validate` runs their checks)."""
from s2f_jax.methods import adapted, erm, fine_tune, joint, robust
from s2f_jax.methods.base import ConfigSection, Method, RunContext, Selection

METHODS: dict[str, Method] = {**erm.METHODS, **fine_tune.METHODS, **robust.METHODS, **joint.METHODS}
CONFIG_SECTIONS: dict[str, ConfigSection] = {s.name: s for s in (fine_tune.CONFIG, adapted.CONFIG, robust.CONFIG,
                                                                 joint.CONFIG)}


def method_name(method: str, config) -> str:
  """The name a method runs under with this config (its 'Method' column and directory)."""
  name = METHODS[method].name
  return method if name is None else name(config)


def register_method(name: str, method: Method) -> None:
  """Makes `method=<name>` run `method` (a config file can register one before the run; docs/design.md)."""
  METHODS[name] = method


def register_config_section(section: ConfigSection) -> None:
  """Adds `section` to every later `config.base_config()` and its checks to `config.validate` (docs/extending.md)."""
  CONFIG_SECTIONS[section.name] = section
