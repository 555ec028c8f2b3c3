"""Every method at T = 128 and 256: its guarantee, and its float64 reading where one scales.

Instance-wise risk minimisation makes every example of a batch a task, so T
reaches the batch size. The cases are full rank (D = 1000 > T) and rank
deficient (D = 10 < T), each with a duplicated pair, an opposite pair (one
task -0.5 times another) and a zero task among conflicting gradients. T = 128
runs in the default suite; T = 256 is ``slow`` (``pytest -m slow``), as is
GradOPS's literal Gram-Schmidt reading at either T (seconds of Python loops).
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gradops_jax
from tests import jitting
from tests import reference
from tests.registry import BY_NAME

DIMS = {"full_rank": 1000, "rank_deficient": 10}
CASES = [
  pytest.param(num_tasks, kind, marks=[pytest.mark.slow] if num_tasks > 128 else [])
  for num_tasks in (128, 256)
  for kind in DIMS
]
# Sums of T float32 terms: the update's rounding is this times sum_k |beta_k| ||g_k||.
RTOL = 1e-5


def _case(num_tasks, kind, seed=0):
  rng = np.random.default_rng(seed)
  dim = DIMS[kind]
  signs = rng.choice([-1.0, 1.0], size=(num_tasks, 1))
  matrix = 0.8 * signs * rng.standard_normal(dim) + rng.standard_normal((num_tasks, dim))
  matrix[1] = matrix[0]  # duplicated
  matrix[3] = -0.5 * matrix[2]  # opposite
  matrix[4] = 0.0  # zero
  return matrix.astype(np.float32)


def _run(method, matrix, **hyperparameters):
  updates, state = jitting.update(BY_NAME[method].factory, {"w": jnp.asarray(matrix)}, **hyperparameters)
  chex.assert_tree_all_finite((updates, state))
  return np.asarray(updates["w"], np.float64), state


def _size(coefficients, grads):
  """sum_k |beta_k| ||g_k||: the scale of the combination's rounding."""
  return float(np.sum(np.abs(np.asarray(coefficients, np.float64)) * np.linalg.norm(grads, axis=1)))


def _upgrad_nnls_reference(grads):
  """UPGrad by one float64 NNLS per task (Lawson and Hanson, scipy): the
  projection of g_i onto {x : U x >= 0} (U the unit gradients) is
  g_i + U^T w with w = argmin_{w >= 0} ||U^T w + g_i||."""
  from scipy.optimize import nnls

  norms = np.linalg.norm(grads, axis=1)
  units = grads[norms > 0] / norms[norms > 0, None]
  projections = [g + units.T @ nnls(units.T, -g, maxiter=50 * units.shape[0])[0] for g in grads]
  return np.mean(projections, axis=0)


@pytest.mark.parametrize("num_tasks, kind", CASES)
@pytest.mark.parametrize("method", ["gradops", "gradops_alpha-2", "upgrad"])
def test_no_conflict(method, num_tasks, kind):
  grads = _case(num_tasks, kind).astype(np.float64)
  update, state = _run(method, grads.astype(np.float32))
  coefficients = np.asarray(state.weights, np.float64) + (1.0 / num_tasks if method == "upgrad" else 0.0)
  norms = np.linalg.norm(grads, axis=1)
  assert np.all(grads @ update >= -RTOL * norms * _size(coefficients, grads))
  if method == "upgrad":
    np.testing.assert_allclose(update, _upgrad_nnls_reference(grads), rtol=0, atol=RTOL * _size(coefficients, grads))


@pytest.mark.slow
@pytest.mark.parametrize("num_tasks", [128, 256])
@pytest.mark.parametrize("alpha", [0.0, -2.0])
def test_gradops_matches_gram_schmidt(num_tasks, alpha):
  """Full rank only: with T > D every task is in the span of the others, the
  MGDA fallback fires, and the exhaustive MGDA reading does not scale."""
  grads = _case(num_tasks, "full_rank").astype(np.float64)
  method = "gradops" if alpha == 0 else "gradops_alpha-2"
  update, state = _run(method, grads.astype(np.float32))
  expected, info = reference.gradops_reference(grads, alpha, gradops_jax.default_rank_rtol(num_tasks, jnp.float32))
  np.testing.assert_array_equal(np.asarray(state.projected), info["projected"])
  assert not info["used_fallback"] and not bool(state.used_fallback)
  np.testing.assert_allclose(update, expected, rtol=0, atol=RTOL * _size(state.weights, grads))


@pytest.mark.parametrize("num_tasks, kind", CASES)
def test_mgda_is_the_min_norm_point(num_tasks, kind):
  """d in the hull with g_j . d >= ||d||^2 for every j certifies the min-norm point."""
  grads = _case(num_tasks, kind).astype(np.float64)
  update, state = _run("mgda", grads.astype(np.float32))
  weights = np.asarray(state.weights, np.float64)
  assert np.all(weights >= 0) and abs(weights.sum() - 1) < 1e-5
  size = _size(weights, grads)
  norms = np.linalg.norm(grads, axis=1)
  assert np.all(grads @ update >= update @ update - RTOL * size * (norms + size))


@pytest.mark.parametrize("num_tasks, kind", CASES)
def test_cone_and_ball_methods(num_tasks, kind):
  grads = _case(num_tasks, kind).astype(np.float64)
  mean = grads.mean(axis=0)
  c = 0.5
  update, state = _run("conicgrad", grads.astype(np.float32))
  tol = RTOL * _size(state.weights, grads) * np.linalg.norm(mean) * (1 + c)
  assert mean @ update >= c * np.linalg.norm(mean) * np.linalg.norm(update) - tol
  update, state = _run("cagrad", grads.astype(np.float32))
  d = update * (1 + c**2)  # the official rescaling, undone
  assert np.linalg.norm(d - mean) <= c * np.linalg.norm(mean) + RTOL * _size(state.weights, grads) * (1 + c**2)


@pytest.mark.parametrize("num_tasks, kind", CASES)
def test_closed_forms_match_their_readings(num_tasks, kind):
  grads = _case(num_tasks, kind).astype(np.float64)
  mean_size = _size(np.full(num_tasks, 1.0 / num_tasks), grads)
  update, _ = _run("linear_scalarization", grads.astype(np.float32))
  np.testing.assert_allclose(update, grads.mean(axis=0), rtol=0, atol=RTOL * mean_size)
  update, state = _run("aligned_mtl", grads.astype(np.float32))
  expected = reference.aligned_mtl_reference(grads, num_tasks * float(jnp.finfo(jnp.float32).eps))
  np.testing.assert_allclose(update, expected, rtol=0, atol=RTOL * (_size(state.weights, grads) + mean_size))
  update, state = _run("pcgrad", grads.astype(np.float32))
  _, order_key = jax.random.split(jax.random.key(0))
  order = list(np.asarray(jax.random.permutation(order_key, num_tasks)))
  size = _size(state.weights, grads) + _size(np.ones(num_tasks), grads)
  np.testing.assert_allclose(update, reference.pcgrad_reference(grads, order), rtol=0, atol=RTOL * size)


@pytest.mark.parametrize("num_tasks, kind", CASES)
@pytest.mark.parametrize("method", ["imtl_g", "nash_mtl", "gradvac"])
def test_finite(method, num_tasks, kind):
  """No guarantee to check on dependent tasks (IMTL-G's closed form and
  Nash-MTL's equation need independent gradients; GradVac moves cosines
  towards targets): finite, and, for the solve, converged."""
  _, state = _run(method, _case(num_tasks, kind))
  if method == "nash_mtl":
    assert bool(state.converged)
