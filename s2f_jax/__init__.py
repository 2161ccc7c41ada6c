"""s2f_jax: the Seq-to-Final benchmark in JAX/Flax."""
__version__ = '0.1.0'
