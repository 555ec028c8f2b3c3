"""The registry covers the public API: a new transform cannot skip the batteries."""

import gradops_jax
from tests import registry


def test_every_public_transform_is_registered():
  public = {
    name for name in gradops_jax.__all__ if name.startswith("scale_by_") and callable(getattr(gradops_jax, name))
  }
  registered = {spec.public.__name__ for spec in registry.SPECS}
  assert public <= registered, f"not in tests/registry.py: {sorted(public - registered)}"


def test_every_registered_reference_exists():
  from tests import reference

  for spec in registry.SPECS:
    assert spec.reference is None or callable(getattr(reference, spec.reference)), spec.name


def test_every_weighting_has_its_transform():
  names = {spec.public.__name__.removeprefix("scale_by_") for spec in registry.SPECS}
  missing = [name for name in gradops_jax.weightings.__all__ if name != "mean" and name not in names]
  assert not missing, missing
