"""Every Example in the package's docstrings runs and prints what it says."""

import doctest
import importlib
import pkgutil

import pytest

import gradops_jax

MODULES = sorted(info.name for info in pkgutil.walk_packages(gradops_jax.__path__, prefix="gradops_jax."))


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
  module = importlib.import_module(name)
  result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE, verbose=False)
  assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"


def test_every_public_function_has_an_example():
  missing = [
    name
    for name in gradops_jax.__all__
    if callable(getattr(gradops_jax, name))
    and not isinstance(getattr(gradops_jax, name), type)
    and ">>>" not in (getattr(gradops_jax, name).__doc__ or "")
  ]
  assert not missing, f"public functions without an Example: {missing}"
