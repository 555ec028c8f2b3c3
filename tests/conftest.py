"""Strict settings for the whole suite.

* Rank promotion raises (warnings are errors too: ``filterwarnings`` in
  ``pyproject.toml``).
* x64 stays off: float64 is exercised separately, inside
  ``jax.enable_x64(True)`` blocks of the tests that need it.
* Hypothesis profiles: ``ci`` (the default; 300 examples per property,
  derandomised so that CI is reproducible) and ``thorough`` (10,000 examples
  per property, random): ``pytest --hypothesis-profile=thorough`` or
  ``HYPOTHESIS_PROFILE=thorough``.
"""

import os

import jax
from hypothesis import HealthCheck
from hypothesis import settings

jax.config.update("jax_numpy_rank_promotion", "raise")

_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("ci", max_examples=300, derandomize=True, print_blob=True, **_COMMON)
settings.register_profile("thorough", max_examples=10_000, print_blob=True, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
