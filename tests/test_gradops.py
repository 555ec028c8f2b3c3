"""GradOPS against a literal float64 reading of Algorithm 1, and its guarantees."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gradops_jax
from gradops_jax import default_rank_rtol

# White-box: the one-inverse fast path against the general per-task path.
from gradops_jax._src import linalg
from gradops_jax._src.methods.gradops import _project_all_tasks
from gradops_jax._src.methods.gradops import _project_all_tasks_rank_revealing
from gradops_jax._src.methods.gradops import dependency_threshold
from tests import cases as cases_lib
from tests import jitting
from tests import reference

CASES = cases_lib.hard_cases()
ALPHAS = (0.0, 2.0, -1.0, -3.0)


def _to_tree(matrix):
  if matrix.shape[1] >= 13:
    return jax.tree.map(jnp.asarray, cases_lib.split_into_pytree(matrix))
  return {"w": jnp.asarray(matrix)}


def _params_like(task_tree):
  return jax.tree.map(lambda leaf: jnp.zeros(leaf.shape[1:], leaf.dtype), task_tree)


def _flatten_update(tree):
  return np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(tree)])


def _flatten_tasks(tree, num_tasks):
  return np.concatenate(
    [np.asarray(x, np.float64).reshape(num_tasks, -1) for x in jax.tree.leaves(tree)],
    axis=1,
  )


def _run(matrix, alpha=0.0, tx=None):
  num_tasks = matrix.shape[0]
  tree = _to_tree(matrix)
  params = _params_like(tree)
  if tx is None:
    updates, state = jitting.update(gradops_jax.scale_by_gradops, tree, alpha=alpha)
  else:
    updates, state = jax.jit(tx.update)(tree, tx.init(params), params)
  chex.assert_trees_all_equal_shapes_and_dtypes(updates, params)
  return _flatten_update(updates), state, _flatten_tasks(tree, num_tasks)


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_float64_reference(name, alpha):
  matrix = CASES[name]
  num_tasks = matrix.shape[0]
  update, state, grads = _run(matrix, alpha)
  rtol = default_rank_rtol(num_tasks, jnp.float32)
  expected, info = reference.gradops_reference(grads, alpha, rtol)
  # Error relative to the size of the terms being combined: float32 rounding of
  # the inputs and of the output are of that size.
  scale = np.sum(np.abs(info["weights"]) * np.linalg.norm(grads, axis=1))
  assert np.all(np.isfinite(update))
  np.testing.assert_allclose(update, expected, rtol=0, atol=1e-5 * max(scale, 1e-300))
  np.testing.assert_array_equal(np.asarray(state.projected), info["projected"])
  assert bool(state.used_fallback) == info["used_fallback"]
  if info["used_fallback"]:
    # Min-norm weights are not unique when the hull's min-norm point is
    # reached by several combinations; the point itself is checked above.
    assert np.all(np.asarray(state.alpha_weights) >= 0)
    np.testing.assert_allclose(np.sum(state.alpha_weights), 1.0, rtol=1e-6)
  else:
    np.testing.assert_allclose(state.alpha_weights, info["weights"], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", sorted(CASES))
def test_projected_gradients_do_not_conflict_theorem(name):
  """Every g'_i has a non-negative inner product with every g_j (Sec. 3.1)."""
  grads = CASES[name].astype(np.float64)
  rank_rtol = default_rank_rtol(grads.shape[0], jnp.float32)  # the data is float32
  with jax.enable_x64(True):
    solve = jax.jit(lambda gram: gradops_jax.gradops_solve(gram, rank_rtol=rank_rtol))
    solution = solve(jnp.asarray(grads @ grads.T))
    projection = np.asarray(solution.projection)
  projected = projection @ grads
  inner = projected @ grads.T
  norms = np.linalg.norm(grads, axis=1)
  # "To rounding" of the float32 data: a direction shorter than rank_rtol is
  # indistinguishable from rounding and is not projected out.
  rounding = rank_rtol * np.outer(np.linalg.norm(projected, axis=1) + norms, norms)
  assert np.all(inner >= -rounding)


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("name", sorted(CASES))
def test_update_does_not_conflict_with_any_task(name, alpha):
  update, _, grads = _run(CASES[name], alpha)
  norms = np.linalg.norm(grads, axis=1)
  assert np.all(grads @ update >= -1e-5 * norms * max(np.linalg.norm(update), norms.max()))


def test_two_tasks_alpha_zero_is_pcgrad():
  rng = np.random.default_rng(1)
  for _ in range(20):
    matrix = rng.standard_normal((2, 40)).astype(np.float32)
    update, _, grads = _run(matrix, 0.0)
    expected = reference.pcgrad_reference(grads, [0, 1])
    np.testing.assert_allclose(update, expected, atol=1e-5 * np.abs(grads).sum(1).max())


def test_task_permutation_equivariance():
  matrix = CASES["conflicting_T8"]
  permutation = np.random.default_rng(2).permutation(8)
  update, state, _ = _run(matrix, -1.0)
  permuted_update, permuted_state, _ = _run(matrix[permutation], -1.0)
  np.testing.assert_allclose(update, permuted_update, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(state.alpha_weights)[permutation], permuted_state.alpha_weights, rtol=1e-5)


@pytest.mark.parametrize("factor", [1e-15, 3.0, 1e15])
def test_positive_scale_equivariance(factor):
  matrix = CASES["conflicting_T5"]
  update, _, _ = _run(matrix, 2.0)
  scaled_update, _, _ = _run((matrix * np.float32(factor)).astype(np.float32), 2.0)
  np.testing.assert_allclose(scaled_update / factor, update, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_output_dtype_equals_input_dtype(dtype):
  grads = {"a": jnp.asarray(CASES["conflicting_T3"][:, :12].reshape(3, 3, 4), dtype)}
  params = {"a": jnp.zeros((3, 4), dtype)}
  tx = gradops_jax.scale_by_gradops(3)
  updates, _ = tx.update(grads, tx.init(params), params)
  chex.assert_trees_all_equal_shapes_and_dtypes(updates, params)
  chex.assert_tree_all_finite(updates)


def test_float64_inputs_with_x64():
  with jax.enable_x64(True):
    matrix = CASES["conflicting_T5"].astype(np.float64)
    grads = {"a": jnp.asarray(matrix)}
    params = {"a": jnp.zeros(matrix.shape[1], jnp.float64)}
    tx = gradops_jax.scale_by_gradops(5, alpha=-1.0)
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    assert updates["a"].dtype == jnp.float64
    expected, _ = reference.gradops_reference(matrix, -1.0, default_rank_rtol(5, jnp.float64))
    np.testing.assert_allclose(np.asarray(updates["a"]), expected, rtol=1e-10, atol=1e-12)


def _per_task_residuals(cosine, active, rank_rtol):
  """Residual of each active unit task on the others, one thresholded eigendecomposition per task."""
  num_tasks = cosine.shape[0]
  threshold = dependency_threshold(num_tasks, rank_rtol, cosine.dtype)

  def one_task(task):
    others = active & (jnp.arange(num_tasks) != task)
    target = jnp.where(others, cosine[:, task], 0.0)
    pseudo_inverse, _ = linalg.thresholded_pseudo_inverse(linalg.masked_block(cosine, others), threshold)
    least_squares = pseudo_inverse @ target
    return jax.nn.one_hot(task, num_tasks, dtype=cosine.dtype) - least_squares

  return jnp.where(active[:, None], jax.vmap(one_task)(jnp.arange(num_tasks)), 0.0)


def _residual_grads(kind, num_tasks):
  rng = np.random.default_rng(num_tasks)
  if kind == "well_conditioned":
    grads = rng.standard_normal((num_tasks, 8 * num_tasks))
  else:  # more tasks than dimensions, with a duplicated and an opposite pair
    grads = rng.standard_normal((num_tasks, max(2, num_tasks // 2)))
    grads[1] = grads[0]
    grads[3] = -0.5 * grads[2]
  if num_tasks > 4:
    grads[num_tasks // 2] = 0.0
  return grads


@pytest.mark.parametrize(
  "kind, num_tasks", [("well_conditioned", t) for t in (2, 5, 64)] + [("rank_deficient", t) for t in (5, 8, 64)]
)
def test_one_factorisation_gives_the_per_task_projections(kind, num_tasks):
  """The residuals from one Cholesky inverse (taken when the cosine matrix's smallest
  eigenvalue exceeds 1e-3) and from one eigendecomposition (otherwise), against one
  eigendecomposition per task, as vectors (their length, through the cosine matrix)."""
  grads = _residual_grads(kind, num_tasks)
  with jax.enable_x64(True):
    norms, _, cosine = gradops_jax.cosine_from_gram(jnp.asarray(grads @ grads.T))
    active = norms > 0
    rank_rtol = default_rank_rtol(num_tasks, jnp.float32)
    per_task = _per_task_residuals(cosine, active, rank_rtol)
    computed = [_project_all_tasks_rank_revealing(cosine, active, rank_rtol)]
    smallest = jnp.linalg.eigvalsh(linalg.masked_block(cosine, active))[0]
    assert (smallest > 1e-3) == (kind == "well_conditioned")
    if kind == "well_conditioned":
      computed.append(_project_all_tasks(cosine, active))
    for residuals in computed:
      difference = np.asarray(residuals - per_task)
      lengths = np.sqrt(np.maximum(np.einsum("ij,jk,ik->i", difference, np.asarray(cosine), difference), 0))
      np.testing.assert_array_less(lengths, 1e-7)
  assert not np.allclose(per_task, np.eye(num_tasks))  # some rows are projections
  if kind == "rank_deficient":  # every task is in the span of the others
    assert np.all(np.asarray(computed[0]) == 0)


# No retrace on new values: see tests/test_battery.py (every method, GradOPS included).


def test_state_counts_fallbacks():
  tx = gradops_jax.scale_by_gradops(2)
  params = {"a": jnp.zeros(3)}
  state = tx.init(params)
  g = jnp.array([1.0, -2.0, 0.5])
  update = jax.jit(tx.update)
  for _ in range(2):
    updates, state = update({"a": jnp.stack([g, -g])}, state)
  np.testing.assert_array_equal(updates["a"], np.zeros(3))
  assert int(state.fallback_count) == 2 and bool(state.used_fallback)
  _, state = update({"a": jnp.stack([g, g])}, state)
  assert int(state.fallback_count) == 2 and not bool(state.used_fallback)


def test_chained_with_adam_reaches_pareto_stationary_point():
  """Two convex quadratics; GradOPS + Adam ends where a convex combination of
  the task gradients vanishes (the MGDA min-norm point is ~0)."""
  centres = jnp.array([[1.0, 2.0, 0.0], [-1.0, 0.5, 3.0]])
  scales = jnp.array([1.0, 4.0])

  def losses(x):
    return scales * jnp.sum((x[None, :] - centres) ** 2, axis=1)

  tx = gradops_jax.gradops(learning_rate=0.05, num_tasks=2)
  x = jnp.array([5.0, -5.0, 5.0])
  state = tx.init(x)

  @jax.jit
  def step(x, state):
    _, grads = gradops_jax.value_and_task_grads(losses)(x)
    updates, state = tx.update(grads, state, x)
    return optax.apply_updates(x, updates), state

  for _ in range(3000):
    x, state = step(x, state)
  _, grads = gradops_jax.value_and_task_grads(losses)(x)
  grads = np.asarray(grads, np.float64)
  weights = reference.min_norm_point_weights(grads)
  assert np.linalg.norm(weights @ grads) < 1e-2 * np.linalg.norm(grads, axis=1).max()
  # And x lies on the Pareto set: the segment between the two centres.
  c = np.asarray(centres)
  t = np.clip((np.asarray(x) - c[0]) @ (c[1] - c[0]) / np.sum((c[1] - c[0]) ** 2), 0, 1)
  assert np.linalg.norm(np.asarray(x) - (c[0] + t * (c[1] - c[0]))) < 1e-2


def test_gradops_alias_is_gradops_then_adam():
  matrix = CASES["conflicting_T3"]
  tree = _to_tree(matrix)
  params = _params_like(tree)
  chained = optax.chain(gradops_jax.scale_by_gradops(3, -2.0), optax.adam(1e-3))
  alias = gradops_jax.gradops(1e-3, 3, alpha=-2.0)
  expected, _ = chained.update(tree, chained.init(params), params)
  actual, _ = alias.update(tree, alias.init(params), params)
  chex.assert_trees_all_close(actual, expected)


def test_inject_hyperparams_changes_alpha_without_retrace():
  tx = optax.inject_hyperparams(gradops_jax.scale_by_gradops, static_args=("num_tasks",))(
    num_tasks=3, alpha=jnp.asarray(0.0)
  )
  tree = _to_tree(CASES["conflicting_T3"])
  params = _params_like(tree)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(state):
    return tx.update(tree, state, params)

  state = tx.init(params)
  updates_alpha0, state = step(state)
  state.hyperparams["alpha"] = jnp.asarray(-3.0, jnp.float32)
  updates_alpha3, state = step(state)
  direct, _, _ = _run(CASES["conflicting_T3"], -3.0)
  np.testing.assert_allclose(_flatten_update(updates_alpha3), direct, rtol=1e-6, atol=1e-7)
  assert not np.allclose(_flatten_update(updates_alpha0), direct)
