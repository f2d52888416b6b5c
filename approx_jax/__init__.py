"""approx_jax: bit-exact simulation of approximate multipliers in JAX."""
