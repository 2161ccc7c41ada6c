"""The method registry: name → `Method` (an unknown name is a UserError listing these)."""
from s2f_jax.methods import erm, fine_tune
from s2f_jax.methods.base import Method, RunContext, Selection

METHODS: dict[str, Method] = {**erm.METHODS, **fine_tune.METHODS}
