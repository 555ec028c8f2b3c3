"""MGDA min-norm solver and simplex projection against exact references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gradops_jax
from tests import reference


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("num_tasks,dim", [(2, 5), (3, 2), (5, 3), (8, 20), (10, 4)])
def test_min_norm_matches_exhaustive_reference(seed, num_tasks, dim):
  grads = np.random.default_rng(seed).standard_normal((num_tasks, dim))
  grads[0] *= 10.0 ** (seed - 3)
  gram = grads @ grads.T
  with jax.enable_x64(True):
    weights = np.asarray(jax.jit(gradops_jax.weightings.mgda)(jnp.asarray(gram)))
  expected = reference.min_norm_point_weights(grads)
  assert np.all(weights >= 0) and abs(weights.sum() - 1) < 1e-12
  scale = np.max(np.diag(gram))
  assert weights @ gram @ weights <= expected @ gram @ expected + 1e-10 * scale
  np.testing.assert_allclose(weights @ grads, expected @ grads, atol=1e-6 * np.sqrt(scale))


@pytest.mark.parametrize("seed", range(10))
@pytest.mark.parametrize("size", [1e-7, 1e-8, 1e-9])
def test_min_norm_near_duplicate_tasks(seed, size):
  """Two tasks a relative ``size`` apart, whose cosine rounds to 1 below
  1.5e-8: the curvature between them is lost in the Gram matrix, but their
  cosines with a third task differ resolvably, and the optimum keeps only the
  better one (a singular KKT solve split the weight between them)."""
  rng = np.random.default_rng(seed)
  grads = rng.standard_normal((3, 6)) * np.array([[1.0], [1.6], [1.6]])
  noise = rng.standard_normal(6)
  grads[2] = grads[1] + size * np.linalg.norm(grads[1]) * noise / np.linalg.norm(noise)
  with jax.enable_x64(True):
    weights = np.asarray(jax.jit(gradops_jax.weightings.mgda)(jnp.asarray(grads @ grads.T)))
  d = weights @ grads
  # Optimality g_j . d >= ||d||^2, to rounding.
  assert np.min(grads @ d) >= (1 - 1e-12) * (d @ d)
  expected = reference.min_norm_point_weights(grads) @ grads
  np.testing.assert_allclose(d, expected, rtol=0, atol=1e-12 * np.abs(grads).max())


def test_min_norm_all_zero_is_uniform():
  with jax.enable_x64(True):
    weights = gradops_jax.weightings.mgda(jnp.zeros((4, 4)))
  np.testing.assert_array_equal(weights, np.full(4, 0.25))


def test_project_onto_simplex():
  rng = np.random.default_rng(0)
  for _ in range(20):
    v = rng.standard_normal(6) * 3
    w = np.asarray(gradops_jax.project_onto_simplex(jnp.asarray(v)))
    assert np.all(w >= 0) and abs(w.sum() - 1) < 1e-5
    # Optimality: v - w = theta on the support, <= theta off it.
    residual = v - w
    theta = residual[w > 0]
    np.testing.assert_allclose(theta, theta[0], atol=1e-5)
    assert np.all(residual[w == 0] <= theta[0] + 1e-5)
