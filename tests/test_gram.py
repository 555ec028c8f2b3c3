"""The Gram-matrix reduction: exactness, and why float64 accumulation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gradops_jax
from tests import cases


def _projection_error(gram, grads):
  """Relative error of g'_3 (projection of task 3 off span{g1, g2}) from a Gram."""
  coefficients = np.linalg.solve(gram[:2, :2], gram[:2, 2])
  exact_basis, _ = np.linalg.qr(grads[:2].T)
  exact = grads[2] - exact_basis @ (exact_basis.T @ grads[2])
  approx = grads[2] - coefficients @ grads[:2]
  return np.linalg.norm(approx - exact) / np.linalg.norm(grads[2])


def test_gram_is_exact_for_float32_inputs():
  matrix = cases.hard_cases()["mixed_scales_1e-20_1e20"]
  tree = {"a": jnp.asarray(matrix[:, :40].reshape(4, 5, 8)), "b": jnp.asarray(matrix[:, 40:])}
  with jax.enable_x64(True):
    gram = np.asarray(jax.jit(gradops_jax.task_gram, static_argnums=1)(tree, 4))
  exact = matrix.astype(np.float64) @ matrix.astype(np.float64).T
  np.testing.assert_allclose(gram, exact, rtol=1e-13)


def test_float64_gram_is_accurate_where_float32_gram_and_qr_are_not():
  """Two tasks at cosine 1 - 1e-6, a third projected off their span."""
  grads32 = cases._near_collinear(np.random.default_rng(0), 100_000).astype(np.float32)
  grads = grads32.astype(np.float64)
  with jax.enable_x64(True):
    gram64 = np.asarray(gradops_jax.task_gram({"g": jnp.asarray(grads32)}, 3))
  gram32 = np.asarray(jnp.matmul(jnp.asarray(grads32), jnp.asarray(grads32).T, precision="highest"), np.float64)
  r_factor = np.asarray(jnp.linalg.qr(jnp.asarray(grads32).T, mode="r"), np.float64)
  error64 = _projection_error(gram64, grads)
  error32 = _projection_error(gram32, grads)
  error_qr = _projection_error(r_factor.T @ r_factor, grads)
  assert error64 < 1e-8
  assert error_qr > 100 * error64 and error32 > 100 * error64


@pytest.mark.parametrize(
  "shape",
  [
    (),  # scalar parameter
    (7, 5301),  # a matrix: several scanned blocks
    (2, 3, 50, 70),  # four axes contracted at once
    (40000,),  # one long axis
    (30011,),  # prime length: whole scanned blocks and a remainder
    (2, 30011),
  ],
)
def test_every_gram_form_and_combine_are_exact(shape):
  """Every form of the Gram pass (CPU kernel, scanned, partitionable) and the combine are exact."""
  rng = np.random.default_rng(5)
  size = int(np.prod(shape))
  matrix = rng.standard_normal((3, size)).astype(np.float32)
  tree = {"leaf": jnp.asarray(matrix.reshape(3, *shape)), "small": jnp.asarray(matrix[:, :1])}
  exact = matrix.astype(np.float64)
  with jax.enable_x64(True):
    gram = np.asarray(jax.jit(gradops_jax.task_gram, static_argnums=1)(tree, 3))
    coefficients = jnp.asarray([0.5, -2.0, 1e-3])
    combined = jax.jit(gradops_jax.combine)(tree, coefficients)
    leaf_grams = [
      np.asarray(jax.jit(form)(tree["leaf"]))
      for form in (
        gradops_jax.leaf_gram,
        lambda leaf: gradops_jax.leaf_gram(leaf, implementation="scan"),
        lambda leaf: gradops_jax.leaf_gram(leaf, implementation="partitionable"),
      )
    ]
  expected_gram = exact @ exact.T + exact[:, :1] @ exact[:, :1].T
  # float64 summation error of a dot product, bounded by |g_i| |g_j| (Cauchy-Schwarz).
  norms = np.sqrt(np.diag(expected_gram))
  np.testing.assert_array_less(np.abs(gram - expected_gram), 1e-13 * np.outer(norms, norms))
  leaf_norms = np.linalg.norm(exact, axis=1)
  for leaf_gram in leaf_grams:
    np.testing.assert_array_less(np.abs(leaf_gram - exact @ exact.T), 1e-13 * np.outer(leaf_norms, leaf_norms) + 1e-300)
  expected = np.asarray(coefficients) @ exact
  assert combined["leaf"].shape == shape
  np.testing.assert_allclose(
    np.asarray(combined["leaf"], np.float64).ravel(),
    expected,
    rtol=0,
    atol=1e-6 * np.abs(expected).max(),
  )


def test_numpy_leaves_outside_jit():
  grads = {"w": np.array([[1.0, 0.0], [-1.0, 1.0]], np.float32)}
  with jax.enable_x64(True):
    gram = gradops_jax.task_gram(grads, 2)
    combined = gradops_jax.combine(grads, jnp.asarray([0.5, 2.0]))
  np.testing.assert_array_equal(gram, grads["w"].astype(np.float64) @ grads["w"].T.astype(np.float64))
  np.testing.assert_array_equal(combined["w"], [-1.5, 2.0])
