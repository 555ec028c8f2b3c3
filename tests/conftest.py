"""Strict JAX settings for the whole suite (x64 is tested separately)."""

import jax

jax.config.update("jax_numpy_rank_promotion", "raise")
