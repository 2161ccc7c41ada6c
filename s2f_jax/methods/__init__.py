"""The method registry: name → `Method` (an unknown name is a UserError listing these)."""
from s2f_jax.methods import erm, fine_tune, joint, robust
from s2f_jax.methods.base import Method, RunContext, Selection

METHODS: dict[str, Method] = {**erm.METHODS, **fine_tune.METHODS, **robust.METHODS, **joint.METHODS}


def method_name(method: str, config) -> str:
  """The name a method runs under with this config (its 'Method' column and directory)."""
  name = METHODS[method].name
  return method if name is None else name(config)


def register_method(name: str, method: Method) -> None:
  """Makes `method=<name>` run `method` (a config file can register one before the run; docs/design.md)."""
  METHODS[name] = method
