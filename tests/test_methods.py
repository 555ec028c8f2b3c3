"""The other aggregation methods against float64 readings of their papers."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gradops_jax
from gradops_jax import default_rank_rtol
from gradops_jax import weightings

from tests import cases as cases_lib
from tests import jitting
from tests import reference

RIDGE = 1e-8  # Nash-MTL's documented ridge (docs/methods/nash_mtl.md)

CASES = cases_lib.hard_cases()
SMALL = sorted(name for name, g in CASES.items() if g.shape[0] <= 8)


def _apply(tx, matrix):
  tree = {"w": jnp.asarray(matrix)}
  params = {"w": jnp.zeros(matrix.shape[1:], matrix.dtype)}
  updates, state = jax.jit(tx.update)(tree, tx.init(params), params)
  chex.assert_trees_all_equal_shapes_and_dtypes(updates, params)
  chex.assert_tree_all_finite(updates)
  return np.asarray(updates["w"], np.float64), state


def _apply_traced(factory, matrix, **hyperparameters):
  """The update with traced hyperparameters: one compiled program for every value swept."""
  updates, _ = jitting.update(factory, {"w": jnp.asarray(matrix)}, **hyperparameters)
  chex.assert_tree_all_finite(updates)
  return np.asarray(updates["w"], np.float64)


def _assert_close(update, expected, grads, coefficients, rtol=1e-5):
  scale = np.sum(np.abs(coefficients) * np.linalg.norm(grads, axis=1))
  np.testing.assert_allclose(update, expected, rtol=0, atol=rtol * max(scale, 1e-300))


@pytest.mark.parametrize("name", SMALL)
def test_mgda_matches_exhaustive_min_norm(name):
  grads = CASES[name].astype(np.float64)
  update, state = _apply(gradops_jax.scale_by_mgda(grads.shape[0]), CASES[name])
  weights = reference.min_norm_point_weights(grads)
  _assert_close(update, weights @ grads, grads, np.ones(grads.shape[0]))
  # Optimality (KKT) of the returned weights: d . g_j >= ||d||^2 for all j.
  w = np.asarray(state.weights, np.float64)
  d = w @ grads
  assert np.all(w >= 0) and abs(w.sum() - 1) < 1e-6
  norms = np.linalg.norm(grads, axis=1)
  assert np.all(grads @ d >= d @ d - 1e-6 * norms.max() ** 2)


@pytest.mark.parametrize("name", SMALL)
def test_upgrad_matches_dual_cone_projections(name):
  grads = CASES[name].astype(np.float64)
  update, state = _apply(gradops_jax.scale_by_upgrad(grads.shape[0]), CASES[name])
  expected = reference.upgrad_reference(grads)
  _assert_close(update, expected, grads, np.asarray(state.weights, np.float64) + 1.0 / len(grads))
  # The guarantee: the update conflicts with no task.
  norms = np.linalg.norm(grads, axis=1)
  assert np.all(grads @ update >= -1e-5 * norms * np.linalg.norm(grads, axis=1).max())


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("name", SMALL)
def test_pcgrad_matches_reference_with_same_order(name, seed):
  grads = CASES[name].astype(np.float64)
  num_tasks = grads.shape[0]
  update, state = _apply(gradops_jax.scale_by_pcgrad(num_tasks, seed=seed), CASES[name])
  _, order_key = jax.random.split(jax.random.key(seed))
  order = list(np.asarray(jax.random.permutation(order_key, num_tasks)))
  expected = reference.pcgrad_reference(grads, order)
  _assert_close(update, expected, grads, np.asarray(state.weights, np.float64) + 1.0)


def test_pcgrad_key_advances_and_two_tasks_equal_gradops():
  matrix = CASES["conflicting_T2"]
  tx = gradops_jax.scale_by_pcgrad(2)
  params = {"w": jnp.zeros(matrix.shape[1])}
  state = tx.init(params)
  update, new_state = tx.update({"w": jnp.asarray(matrix)}, state, params)
  assert not np.array_equal(state.key, new_state.key)
  gradops_update, _ = _apply(gradops_jax.scale_by_gradops(2), matrix)
  np.testing.assert_allclose(update["w"], gradops_update, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", SMALL)
def test_imtl_g_matches_closed_form(name):
  grads = CASES[name].astype(np.float64)
  norms = np.linalg.norm(grads, axis=1)
  update, state = _apply(gradops_jax.scale_by_imtl_g(grads.shape[0]), CASES[name])
  active = norms > 0
  alpha = np.asarray(state.weights, np.float64)
  scale = np.sum((np.abs(alpha) + 1.0) * norms)
  if not active.any():
    np.testing.assert_array_equal(update, 0.0)
    return
  # Zero tasks are dropped: the closed form on the others.
  expected, condition = reference.imtl_g_reference(grads[active])
  if condition < 1e6:
    np.testing.assert_allclose(update, expected, rtol=0, atol=1e-5 * scale)
  else:
    # Singular D U^T (opposite, duplicated or dependent tasks): the closed form
    # is undefined; check the defining equations where they can hold.
    units = grads[active] / norms[active, None]
    projections = units @ update
    np.testing.assert_allclose(projections, projections[0], rtol=0, atol=1e-5 * scale)


@pytest.mark.parametrize("name", ["random_T3", "conflicting_T5", "mixed_scales_1e-20_1e20"])
def test_imtl_g_equal_projections(name):
  grads = CASES[name].astype(np.float64)
  update, state = _apply(gradops_jax.scale_by_imtl_g(grads.shape[0]), CASES[name])
  units = grads / np.linalg.norm(grads, axis=1, keepdims=True)
  projections = units @ update
  np.testing.assert_allclose(projections, projections[0], rtol=1e-4)
  np.testing.assert_allclose(np.sum(state.weights), 1.0, rtol=1e-5)


def test_linear_scalarization_mean_and_weights():
  matrix = CASES["conflicting_T3"]
  update, _ = _apply(gradops_jax.scale_by_linear_scalarization(3), matrix)
  np.testing.assert_allclose(update, matrix.astype(np.float64).mean(0), rtol=1e-6, atol=1e-6)
  weights = [0.2, 0.0, 3.0]
  update, _ = _apply(gradops_jax.scale_by_linear_scalarization(3, weights), matrix)
  np.testing.assert_allclose(update, np.asarray(weights) @ matrix, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="shape"):
    gradops_jax.scale_by_linear_scalarization(3, [1.0, 2.0])


@pytest.mark.parametrize("name", SMALL)
def test_gradvac_matches_reference_over_steps(name):
  grads = CASES[name].astype(np.float64)
  num_tasks = grads.shape[0]
  beta = 0.3
  tx = gradops_jax.scale_by_gradvac(num_tasks, beta=beta, seed=1)
  params = {"w": jnp.zeros(grads.shape[1])}
  state = tx.init(params)
  key, targets = jax.random.key(1), np.zeros((num_tasks, num_tasks))
  rng = np.random.default_rng(0)
  update_fn = jax.jit(tx.update)
  for _ in range(3):
    step_grads = (grads * rng.uniform(0.5, 1.5, size=(num_tasks, 1))).astype(np.float32)
    update, state = update_fn({"w": jnp.asarray(step_grads)}, state, params)
    key, order_key = jax.random.split(key)
    order = list(np.asarray(jax.random.permutation(order_key, num_tasks)))
    expected, targets = reference.gradvac_reference(
      step_grads, order, targets, beta, default_rank_rtol(num_tasks, jnp.float32)
    )
    _assert_close(
      np.asarray(update["w"], np.float64),
      expected,
      step_grads.astype(np.float64),
      np.abs(np.asarray(state.weights, np.float64)) + 1.0,
    )
    np.testing.assert_allclose(state.targets, targets, atol=1e-5)


def test_gradvac_first_step_is_pcgrad():
  matrix = CASES["conflicting_T5"]
  gradvac, _ = _apply(gradops_jax.scale_by_gradvac(5, seed=3), matrix)
  pcgrad, _ = _apply(gradops_jax.scale_by_pcgrad(5, seed=3), matrix)
  np.testing.assert_allclose(gradvac, pcgrad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("c", [0.0, 0.5, 2.0])
@pytest.mark.parametrize("name", SMALL)
def test_cagrad_is_at_least_as_good_as_official_slsqp(name, c):
  """CAGrad's primal: maximise min_i g_i . d over ||d - g0|| <= c ||g0||."""
  grads = CASES[name].astype(np.float64)
  update = _apply_traced(gradops_jax.scale_by_cagrad, CASES[name], c=c)
  expected, _ = reference.cagrad_reference(grads, c)
  d, d_ref = update * (1 + c**2), expected * (1 + c**2)
  g0 = grads.mean(axis=0)
  norms = np.linalg.norm(grads, axis=1)
  tol = 1e-5 * norms.max() * max(np.linalg.norm(g0), norms.max())
  assert np.linalg.norm(d - g0) <= c * np.linalg.norm(g0) + 1e-5 * norms.max()
  assert np.min(grads @ d) >= np.min(grads @ d_ref) - tol
  if c == 0.0:
    np.testing.assert_allclose(update, g0, rtol=0, atol=1e-6 * norms.max())


@pytest.mark.parametrize("c", [0.0, 0.3, 0.7, 1.0])
@pytest.mark.parametrize("name", SMALL)
def test_conicgrad_optimality_conditions(name, c):
  """Feasible (cone and ball), and its worst-task improvement equals the dual
  minimum found independently by SLSQP: zero duality gap, so optimal."""
  from scipy.optimize import minimize

  grads = CASES[name].astype(np.float64)
  num_tasks = grads.shape[0]
  update = _apply_traced(gradops_jax.scale_by_conicgrad, CASES[name], c=c)
  g0 = grads.mean(axis=0)
  radius = np.linalg.norm(g0)
  norms = np.linalg.norm(grads, axis=1)
  if norms.max() == 0:
    np.testing.assert_array_equal(update, 0.0)
    return
  tol = 1e-5 * norms.max() * max(radius, 1e-300)
  d_norm = np.linalg.norm(update)
  assert d_norm <= radius * (1 + 1e-5)
  assert g0 @ update >= c * radius * d_norm - tol
  primal = np.min(grads @ update)
  starts = np.concatenate([np.eye(num_tasks), np.full((1, num_tasks), 1.0 / num_tasks)])
  # The dual is homogeneous of degree 2 in the gradients: let SLSQP see O(1).
  unit = grads / norms.max()
  dual = norms.max() ** 2 * min(
    minimize(
      lambda w: _cone_support(w @ unit, unit.mean(axis=0), c),
      start,
      bounds=[(0, 1)] * num_tasks,
      constraints=({"type": "eq", "fun": lambda w: 1 - np.sum(w)},),
      method="SLSQP",
      options={"ftol": 1e-15, "maxiter": 500},
    ).fun
    for start in starts
  )
  assert primal <= dual + tol  # weak duality
  assert primal >= dual - 1e-4 * norms.max() * max(radius, 1e-300)
  if c == 1.0 and np.min(grads @ g0) > 0:  # unique optimum: the mean gradient
    np.testing.assert_allclose(update, g0, rtol=0, atol=1e-5 * norms.max())


def _cone_support(v, g0, c):
  radius = np.linalg.norm(g0)
  if radius == 0:
    return 0.0
  unit = g0 / radius
  along = v @ unit
  norm = np.linalg.norm(v)
  across = np.sqrt(max(norm**2 - along**2, 0.0))
  if along >= c * norm:
    return radius * norm
  return radius * max(along * c + across * np.sqrt(1 - c**2), 0.0)


@pytest.mark.parametrize("name", SMALL)
def test_aligned_mtl_matches_algorithm_1(name):
  grads = CASES[name].astype(np.float64)
  num_tasks = grads.shape[0]
  update, state = _apply(gradops_jax.scale_by_aligned_mtl(num_tasks), CASES[name])
  expected = reference.aligned_mtl_reference(grads, num_tasks * np.finfo(np.float32).eps)
  _assert_close(update, expected, grads, np.abs(np.asarray(state.weights, np.float64)) + 1.0 / num_tasks, rtol=1e-4)


@pytest.mark.parametrize("name", SMALL)
def test_nash_mtl_solves_the_bargaining_equation(name):
  grads = CASES[name].astype(np.float64)
  num_tasks = grads.shape[0]
  gram = grads @ grads.T
  frobenius = np.sqrt(np.sum(gram**2))
  with jax.enable_x64(True):
    alpha = np.asarray(weightings.nash_mtl(jnp.asarray(gram)))
  update, state = _apply(gradops_jax.scale_by_nash_mtl(num_tasks), CASES[name])
  if frobenius == 0:
    np.testing.assert_array_equal(update, 0.0)
    return
  assert np.all(alpha > 0)
  quadratic = gram / frobenius + RIDGE * np.eye(num_tasks)
  # Q alpha cancels when alpha is large (no exact solution without the
  # ridge): its float64 rounding is about eps * alpha_max^2.
  np.testing.assert_allclose(alpha * (quadratic @ alpha), 1.0, rtol=0, atol=1e-10 + 1e-15 * alpha.max() ** 2)
  np.testing.assert_allclose(state.weights, alpha, rtol=1e-6)
  # The update is d = sum_k alpha_k g_k, so g_i . d = (K alpha)_i, which the
  # equation makes ||K||_F (1/alpha_i - ridge alpha_i) > 0 on well-posed
  # inputs; checked up to the float32 rounding of the combination.
  norms = np.linalg.norm(grads, axis=1)
  bound = 1e-6 * norms * np.sum(alpha * norms)
  assert np.all(np.abs(grads @ update - gram @ alpha) <= bound)
