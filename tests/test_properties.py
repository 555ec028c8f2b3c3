"""Property-based tests of every transform on hypothesis-drawn trouble.

For every transform and every drawn example (``tests/strategies.py``):

* the update is finite and has the parameters' structure, shapes and dtypes;
* the method's own guarantee holds (GradOPS and UPGrad: no task conflicts
  with the update; MGDA: the optimality conditions of the min-norm point;
  ConicGrad: the update lies in its cone; CAGrad: its ball constraint);
* where the inputs are float32 or float64 values in float32's normal range,
  the update agrees with the float64 oracle of ``tests/reference.py``.

Tolerances follow from the dtype. The update is :math:`\\sum_k \\beta_k g_k`,
accumulated in float32 (float64 for float64 leaves) over T terms and rounded
once to the leaf dtype, so its error is at most
:math:`\\delta S` with :math:`S = \\sum_k |\\beta_k| \\|g_k\\|` and
:math:`\\delta = (T + 1)\\,\\epsilon_{acc} + \\epsilon_{out}`; we allow
:math:`4 \\delta S`. The task-space solves run in float64 and add at most
``SOLVE_RTOL`` of S. Methods that drop directions below a rank tolerance
(GradOPS) keep components of that relative size, which enter their guarantee
as :math:`\\sqrt{T}\\,` ``rank_rtol`` times the size of the weighted tasks.
Backends flush subnormal numbers to zero, so each entry of a task gradient
may be read, and each of the T terms :math:`\\beta_k g_k` of the combination
computed, with an error up to the dtype's smallest normal number: a guarantee
:math:`g_j \\cdot d \\ge 0` then holds up to :math:`\\sqrt{D}` times that
number times :math:`2\\|d\\| + T \\|g_j\\|` (``_flush_error``). A task that
reads as zero can also change a solve as a whole; GradOPS's S is the larger of
the solves on the example and on its flushed values.

Profiles (``tests/conftest.py``): ``ci`` (default, 300 examples per
transform, derandomised) and ``thorough`` (10,000 per transform):
``pytest tests/test_properties.py --hypothesis-profile=thorough``. Inputs on
which a thorough run found a bug are replayed on every run as explicit
examples (``tests/regressions.py``).
"""

import functools
import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example
from hypothesis import given

import gradops_jax
from gradops_jax import default_rank_rtol
from tests import reference
from tests import registry
from tests import regressions
from tests import strategies
from tests.registry import METHODS

SOLVE_RTOL = 1e-9


@pytest.fixture(autouse=True)
def _release_executables():
  """Each property compiles up to ~50 shape variants; free them afterwards
  (a process holding thousands of executables exhausts its memory maps)."""
  yield
  _jitted_update.cache_clear()
  _jitted_gradops_solve.cache_clear()
  jax.clear_caches()


@functools.lru_cache(maxsize=None)
def _jitted_update(method, num_tasks):
  tx = METHODS[method][0](num_tasks)
  return tx, jax.jit(tx.update)


@functools.lru_cache(maxsize=None)
def _jitted_gradops_solve(alpha, rank_rtol):
  return jax.jit(lambda gram: gradops_jax.gradops_solve(gram, alpha, rank_rtol))


def _run(method, example):
  """The jitted update of ``method`` on the example: (flat float64 update, state)."""
  tx, update = _jitted_update(method, example.num_tasks)
  with jax.enable_x64(example.dtype == "float64"):
    tree = jax.tree.map(jnp.asarray, example.tree)
    params = jax.tree.map(lambda leaf: jnp.zeros(leaf.shape[1:], leaf.dtype), tree)
    updates, state = update(tree, tx.init(params), params)
  chex.assert_trees_all_equal_shapes_and_dtypes(updates, params)
  chex.assert_tree_all_finite(updates)
  chex.assert_tree_all_finite(state)
  flat = np.concatenate([np.asarray(leaf, np.float64).ravel() for leaf in jax.tree.leaves(updates)])
  return flat, state


def _delta(example):
  """Relative rounding of the combination (see the module docstring)."""
  accumulation = np.promote_types(np.float32, np.float64 if example.dtype == "float64" else np.float32)
  output = float(jnp.finfo(example.dtype).eps)
  return 4 * ((example.num_tasks + 1) * float(np.finfo(accumulation).eps) + output) + SOLVE_RTOL


def _flush_norm(example):
  """Largest norm of the change of a task gradient whose subnormal entries read as zero."""
  return float(jnp.finfo(example.dtype).tiny) * np.sqrt(example.matrix.shape[1])


def _flushed(example):
  """The example's (T, D) matrix with its subnormal entries read as zero."""
  matrix = example.matrix
  return np.where(np.abs(matrix) < float(jnp.finfo(example.dtype).tiny), 0.0, matrix)


def _flush_error(example, update, norms):
  """Largest change of g_j . d (or of mean . d and c ||mean|| ||d||) from
  flushing: of the inputs (norms: ||g_j|| or ||mean||), and of the T terms
  beta_k g_k of the combination, each of which may underflow."""
  return _flush_norm(example) * (2 * np.linalg.norm(update) + example.num_tasks * norms)


def _size(coefficients, grads):
  """S = sum_k |beta_k| ||g_k||."""
  return float(np.sum(np.abs(coefficients) * np.linalg.norm(grads, axis=1)))


def _comparable(example, max_num_tasks):
  return example.dtype != "bfloat16" and example.num_tasks <= max_num_tasks and example.within_float32_normal_range()


def _gram_resolves_rank_decisions(grads, rank_rtol):
  """Whether every projection's rank decision is resolvable from the Gram matrix.

  The package sees residual lengths through the float64 Gram matrix: the
  residual of a task off the span of the others is resolved only to about
  sqrt(eps_64) / sigma, sigma the smallest kept singular value of the others'
  unit gradients. Where that is not ten times below ``rank_rtol`` (nearly
  dependent others), a residual of rounding noise may land on either side of
  the tolerance, and the package and the vector-space oracle may both be right.
  """
  norms = np.linalg.norm(grads, axis=1)
  units = grads[norms > 0] / norms[norms > 0, None]
  for task in range(units.shape[0]):
    singular_values = np.linalg.svd(np.delete(units, task, axis=0), compute_uv=False)
    kept = singular_values[singular_values > rank_rtol]
    if kept.size and 10 * np.sqrt(np.finfo(np.float64).eps) / kept.min() >= rank_rtol:
      return False
  return True


def _gram_schmidt_agrees_on_rank(grads, rank_rtol, info):
  """Whether the literal reading's Gram-Schmidt of Eq. 1, in task order
  (``info`` of ``reference.gradops_reference``), and the order-free
  projection onto the others' singular directions above ``rank_rtol`` make
  the same zero / non-zero decision on every projected task's residual.

  They differ where a kept Gram-Schmidt vector is short (a task nearly in the
  span of the earlier ones): its direction carries the components that the
  rank tolerance drops, amplified by one over its length, and a residual of
  rounding can then exceed ``rank_rtol``. Found by the thorough run: float32,
  8 tasks of rank 3; a kept vector of relative length 0.005 turned 6e-8 of
  float32 rounding into a residual of 6.8e-6, above rank_rtol = 3.4e-6, so the
  literal reading projects a task that the package (and the order-free
  reading) finds in the span of the others, and the MGDA fallback fires in
  one reading only. Both readings are the paper's Eq. 1 with a tolerance.
  """
  for task in np.flatnonzero(info["projected"]):
    others = np.delete(grads, task, axis=0)
    other_norms = np.linalg.norm(others, axis=1)
    units = others[other_norms > 0] / other_norms[other_norms > 0, None]
    _, singular_values, vectors = np.linalg.svd(units, full_matrices=False)
    span = vectors[singular_values > rank_rtol]
    order_free = grads[task] - span.T @ (span @ grads[task])
    kept = np.linalg.norm(order_free) > rank_rtol * reference.residual_size(others, grads[task], rank_rtol)
    if kept != np.any(info["projected_grads"][task] != 0):
      return False
  return True


def _gram_resolves_dependencies(grads):
  """Whether every near-dependency of the unit task gradients is either exact
  or resolvable from the float64 Gram matrix.

  The Gram matrix sees a near-dependency of relative size sigma (a singular
  value of the unit gradients) as sigma^2 against its rounding eps_64: only
  where eps_64 / sigma^2 is below float32's eps (sigma >~ 4e-5; we take 1e-4)
  is it resolved to the precision of the comparison. Between that and the
  oracles' exact-dependency cut (1e-12), the answer itself may jump: the
  float32 rounding of two exactly opposite tasks turns the hyperplane
  g_1 . x = 0 into a thin wedge that also bounds the directions orthogonal to
  both, and a Gram-matrix solve and a vector-space oracle may then both be
  right about different problems.

  With more tasks than dimensions the whole set is dependent anyway and its
  singular values hide a near-dependency of a few of its tasks (two nearly
  opposite tasks among 8 in 6 dimensions), so every subset of at most as many
  tasks as dimensions is checked then (the caller's T <= 8 keeps that at
  most 247 small SVDs).
  """
  norms = np.linalg.norm(grads, axis=1)
  units = grads[norms > 0] / norms[norms > 0, None]
  num_units, dim = units.shape
  if num_units == 0:
    return True
  sizes = [num_units] if num_units <= dim else range(2, dim + 1)
  for size in sizes:
    for subset in itertools.combinations(range(num_units), size):
      singular_values = np.linalg.svd(units[list(subset)], compute_uv=False)
      relative = singular_values / singular_values.max()
      if np.any((relative > 1e-12) & (relative < 1e-4)):
        return False
  return True


def _assert_no_conflict(grads, update, tol):
  """g_j . d >= -tol_j for every task j."""
  margins = grads @ update
  assert np.all(margins >= -tol), (margins, tol)


def _assert_agrees(example, update, expected, tol):
  """Agreement up to tol, plus T flushed terms of the combination per entry."""
  flushed = example.num_tasks * float(jnp.finfo(example.dtype).tiny)
  np.testing.assert_allclose(update, expected, rtol=0, atol=tol + flushed)


@pytest.mark.parametrize("method", ["gradops", "gradops_alpha-2"])
@given(example=strategies.task_gradients())
@example(example=regressions.load("gradops_fallback_tiny_task"))
@example(example=regressions.load("gradops_near_duplicate_tiny_task"))
@example(example=regressions.load("mgda_near_duplicates"))
@example(example=regressions.load("gradops_gram_schmidt_order"))
@example(example=regressions.load("gradops_flushed_near_duplicate_t8"))
@example(example=regressions.load("gradops_flushed_task_changes_solve_t8"))
def test_gradops(method, example):
  update, state = _run(method, example)
  grads, num_tasks = example.matrix, example.num_tasks
  alpha = 0.0 if method == "gradops" else -2.0
  rank_rtol = default_rank_rtol(num_tasks, example.dtype)
  solve = _jitted_gradops_solve(alpha, rank_rtol)
  with jax.enable_x64(True):
    solution = solve(jnp.asarray(grads @ grads.T))
    # The backend may read subnormal entries as zero, which can change the
    # solve (a task turns zero) and so the size of the combination it forms.
    flushed = _flushed(example)
    flushed_coefficients = np.asarray(solve(jnp.asarray(flushed @ flushed.T)).weights)
  coefficients = np.asarray(solution.weights)
  norms = np.linalg.norm(grads, axis=1)
  weighted = float(np.sum(np.abs(np.asarray(state.alpha_weights, np.float64)) * norms))
  size = max(_size(coefficients, grads), _size(flushed_coefficients, flushed))
  tol = norms * (_delta(example) * size + np.sqrt(num_tasks) * rank_rtol * weighted)
  tol += _flush_error(example, update, norms)
  _assert_no_conflict(grads, update, tol)
  # The solve itself: every g'_i has g'_i . g_j >= 0 (the paper's Sec. 3.1).
  projection = np.asarray(solution.projection)
  projected_dots = projection @ (grads @ grads.T)
  projected_sizes = np.abs(projection) @ norms
  assert np.all(
    projected_dots
    >= -2 * np.sqrt(num_tasks) * rank_rtol * np.outer(norms, norms)
    - _flush_norm(example)
    * (np.outer(projected_sizes, np.ones(num_tasks)) + np.outer(norms, norms) / np.maximum(norms, 1e-300))
  )
  if not _comparable(example, max_num_tasks=8):  # the MGDA oracle enumerates supports
    return
  if not _gram_resolves_rank_decisions(grads, rank_rtol):
    return
  expected, info = reference.gradops_reference(grads, alpha, rank_rtol)
  if not _gram_schmidt_agrees_on_rank(grads, rank_rtol, info):
    return
  np.testing.assert_array_equal(np.asarray(state.projected), info["projected"])
  assert bool(state.used_fallback) == info["used_fallback"]
  # Both readings drop directions of relative length below rank_rtol, in
  # different bases (eigenvectors here, Gram-Schmidt there): they may differ
  # by that much of the weighted tasks.
  rank_error = np.sqrt(num_tasks) * rank_rtol * weighted
  _assert_agrees(example, update, expected, _delta(example) * _size(coefficients, grads) + rank_error)


@given(example=strategies.task_gradients())
@example(example=regressions.load("upgrad_duplicate_t64"))
@example(example=regressions.load("upgrad_near_duplicates_t64"))
@example(example=regressions.load("upgrad_rounded_opposite_t8"))
@example(example=regressions.load("upgrad_scaled_opposite"))
def test_upgrad(example):
  update, state = _run("upgrad", example)
  grads, num_tasks = example.matrix, example.num_tasks
  # d = G^T (w + 1/T): the mean of the projections.
  size = _size(np.asarray(state.weights, np.float64) + 1.0 / num_tasks, grads)
  norms = np.linalg.norm(grads, axis=1)
  tol = norms * _delta(example) * size + _flush_error(example, update, norms)
  _assert_no_conflict(grads, update, tol)
  if _comparable(example, max_num_tasks=8) and _gram_resolves_dependencies(grads):
    _assert_agrees(example, update, reference.upgrad_reference(grads), _delta(example) * size)


@given(example=strategies.task_gradients())
@example(example=regressions.load("mgda_near_duplicates"))
@example(example=regressions.load("mgda_near_duplicate_and_flip"))
@example(example=regressions.load("gradops_fallback_tiny_task"))
def test_mgda(example):
  update, state = _run("mgda", example)
  grads = example.matrix
  weights = np.asarray(state.weights, np.float64)
  assert np.all(weights >= 0) and abs(weights.sum() - 1) < 1e-5
  # Optimality of the min-norm point d of the hull: g_j . d >= ||d||^2.
  norms = np.linalg.norm(grads, axis=1)
  size = _size(weights, grads)
  tol = _delta(example) * size * (norms + size) + _flush_error(example, update, norms)
  assert np.all(grads @ update >= update @ update - tol)
  if _comparable(example, max_num_tasks=8):
    expected = reference.min_norm_point_weights(grads) @ grads
    # The Frank-Wolfe gap of the returned point, checked small just above,
    # bounds ||d - d*||^2 (the solver stops at a gap of 1e-12 n_min^2, or
    # after max_iters steps on ill-conditioned hulls).
    solver_error = np.sqrt(max(update @ update - np.min(grads @ update), 0.0))
    _assert_agrees(example, update, expected, _delta(example) * size + solver_error)


@pytest.mark.parametrize("c", [0.5])
@given(example=strategies.task_gradients())
def test_conicgrad_stays_in_its_cone(c, example):
  update, state = _run("conicgrad", example)
  grads = example.matrix
  mean = grads.mean(axis=0)
  size = _size(np.asarray(state.weights, np.float64), grads)
  tol = _delta(example) * size * np.linalg.norm(mean) * (1 + c) + _flush_error(example, update, np.linalg.norm(mean))
  assert mean @ update >= c * np.linalg.norm(mean) * np.linalg.norm(update) - tol


@given(example=strategies.task_gradients(max_num_tasks=16))
@example(example=regressions.load("cagrad_near_duplicates"))
@example(example=regressions.load("mgda_near_duplicates"))
@example(example=regressions.load("cagrad_cancelling_pair"))
@example(example=regressions.load("cagrad_zero_task_t8"))
def test_cagrad(example):
  update, state = _run("cagrad", example)
  grads = example.matrix
  c = 0.5
  d = update * (1 + c**2)  # the official rescaling, undone
  mean = grads.mean(axis=0)
  size = _size(np.asarray(state.weights, np.float64), grads) * (1 + c**2)
  tol = _delta(example) * size + (1 + c) * _flush_norm(example)
  assert np.linalg.norm(d - mean) <= c * np.linalg.norm(mean) + tol
  if _comparable(example, max_num_tasks=8):
    # SLSQP is the oracle; we must reach at least its worst-task improvement.
    expected, _ = reference.cagrad_reference(grads, c)
    norms = np.linalg.norm(grads, axis=1)
    assert np.min(grads @ d) >= np.min(grads @ (expected * (1 + c**2))) - 1e-6 * norms.max() * max(size, 1e-300)


@given(example=strategies.task_gradients(max_num_tasks=16))
def test_pcgrad(example):
  update, state = _run("pcgrad", example)
  grads, num_tasks = example.matrix, example.num_tasks
  if _comparable(example, max_num_tasks=16):
    _, order_key = jax.random.split(jax.random.key(0))
    order = list(np.asarray(jax.random.permutation(order_key, num_tasks)))
    size = _size(np.asarray(state.weights, np.float64), grads) + _size(np.ones(num_tasks), grads)
    _assert_agrees(example, update, reference.pcgrad_reference(grads, order), _delta(example) * size)


@given(example=strategies.task_gradients())
def test_aligned_mtl(example):
  update, state = _run("aligned_mtl", example)
  grads, num_tasks = example.matrix, example.num_tasks
  if _comparable(example, max_num_tasks=16):
    expected = reference.aligned_mtl_reference(grads, num_tasks * float(jnp.finfo(example.dtype).eps))
    size = _size(np.asarray(state.weights, np.float64), grads) + _size(np.full(num_tasks, 1 / num_tasks), grads)
    _assert_agrees(example, update, expected, _delta(example) * size)


@given(example=strategies.task_gradients())
def test_linear_scalarization(example):
  update, _ = _run("linear_scalarization", example)
  grads, num_tasks = example.matrix, example.num_tasks
  expected = grads.mean(axis=0)
  _assert_agrees(example, update, expected, _delta(example) * _size(np.full(num_tasks, 1 / num_tasks), grads))


@pytest.mark.parametrize("method", [spec.name for spec in registry.SPECS if spec.guarantee == "finite"])
@given(example=strategies.task_gradients())
def test_finite_and_shaped(method, example):
  """The methods without a guarantee checkable on every input (IMTL-G's
  closed form and Nash-MTL's bargaining equation need independent gradients;
  GradVac only moves cosines towards targets) are checked against their
  oracles on fixed cases in ``test_methods.py``; here, finiteness and shapes."""
  _run(method, example)
