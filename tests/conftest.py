"""Strict settings for the whole suite.

* Rank promotion raises (warnings are errors too: ``filterwarnings`` in
  ``pyproject.toml``).
* x64 stays off: float64 is exercised separately, inside
  ``jax.enable_x64(True)`` blocks of the tests that need it.
* Compiled programs are cached on disk for the run (``GRADOPS_JAX_TEST_CACHE``,
  default a directory under the system's temporary directory): many tests
  compile the same update, and xdist workers share the cache.
* Hypothesis profiles (``HYPOTHESIS_PROFILE`` or ``--hypothesis-profile``):
  ``ci`` (the default: 25 examples per property, derandomised, plus every
  stored regression example), ``full`` (300, derandomised: the pre-release
  run) and ``thorough`` (10,000, random).
* ``-m slow`` selects the long runs (10,000-step stress, benchmark smoke run);
  the default run skips them: ``pytest -m slow tests`` runs them alone.
"""

import os
import tempfile

# Tests compile thousands of small programs: LLVM's optimisation passes are most of XLA:CPU's
# compile time and buy nothing for programs that run once. Results stay IEEE arithmetic either
# way (no fast-math); GRADOPS_JAX_TEST_OPTIMIZED=1 keeps XLA's default level.
if os.environ.get("GRADOPS_JAX_TEST_OPTIMIZED") != "1":
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

import jax
from hypothesis import HealthCheck
import pytest
from hypothesis import settings

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update(
  "jax_compilation_cache_dir",
  os.environ.get("GRADOPS_JAX_TEST_CACHE", os.path.join(tempfile.gettempdir(), "gradops_jax_test_xla_cache")),
)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)

_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("ci", max_examples=25, derandomize=True, print_blob=True, **_COMMON)
settings.register_profile("full", max_examples=300, derandomize=True, print_blob=True, **_COMMON)
settings.register_profile("thorough", max_examples=10_000, print_blob=True, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


# Every XLA:CPU executable holds memory maps, and a process may hold 65,530 (vm.max_map_count):
# a worker that has compiled a few thousand programs fails its next mmap, inside a compile, and
# crashes. So every 25 tests a worker with more than 40,000 maps drops its compiled programs
# (the persistent cache above makes compiling them again cheap).
_MAX_MAPS = 40_000
_tests_run = [0]


def _memory_maps() -> int:
  try:
    with open("/proc/self/maps", "rb") as maps:
      return sum(1 for _ in maps)
  except OSError:  # not Linux
    return 0


@pytest.fixture(autouse=True)
def _release_executables():
  yield
  _tests_run[0] += 1
  if _tests_run[0] % 25 == 0 and _memory_maps() > _MAX_MAPS:
    from tests import jitting

    jitting.clear()
    jax.clear_caches()


def pytest_collection_modifyitems(config, items):
  """Skips ``slow`` tests unless they are selected with ``-m``."""
  if config.getoption("-m"):
    return
  skip = pytest.mark.skip(reason="long run: select it with `pytest -m slow`")
  for item in items:
    if "slow" in item.keywords:
      item.add_marker(skip)
