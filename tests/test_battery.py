"""One battery of properties applied to every aggregation method."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gradops_jax
from tests import cases as cases_lib
from tests import jitting
from tests.registry import METHODS

CASES = cases_lib.hard_cases()
BATTERY_CASES = [
  "random_T5",
  "conflicting_T8",
  "zero_task",
  "all_zero",
  "exactly_opposite_plus_others",
  "mixed_scales_1e-20_1e20",
  "huge_1e20",
  "tiny_1e-20",
  "more_tasks_than_dims",
  "duplicated",
  "rank_deficient_sum",
  "random_T1",
]


def _update(tx, tree):
  params = jax.tree.map(lambda leaf: jnp.zeros(leaf.shape[1:], leaf.dtype), tree)
  updates, _ = jax.jit(tx.update)(tree, tx.init(params), params)
  chex.assert_trees_all_equal_shapes_and_dtypes(updates, params)
  return updates


def _flat(tree):
  return np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(tree)])


@pytest.mark.parametrize("name", BATTERY_CASES)
@pytest.mark.parametrize("method", sorted(METHODS))
def test_finite_and_shaped_on_hard_inputs(method, name):
  matrix = CASES[name]
  tree = cases_lib.split_into_pytree(matrix) if matrix.shape[1] >= 13 else {"w": matrix}
  tree = jax.tree.map(jnp.asarray, tree)
  updates, _ = jitting.update(METHODS[method][0], tree)
  chex.assert_trees_all_equal_shapes_and_dtypes(updates, jax.tree.map(lambda leaf: leaf[0], tree))
  chex.assert_tree_all_finite(updates)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_low_precision_dtypes(method, dtype):
  tree = {"a": jnp.asarray(CASES["conflicting_T3"][:, :24].reshape(3, 4, 6), dtype)}
  chex.assert_tree_all_finite(_update(METHODS[method][0](3), tree))


@pytest.mark.parametrize("method", sorted(m for m, (_, deterministic) in METHODS.items() if deterministic))
def test_task_permutation_invariance(method):
  matrix = CASES["conflicting_T5"]
  permutation = np.random.default_rng(0).permutation(5)
  factory = METHODS[method][0]
  update = _flat(_update(factory(5), {"w": jnp.asarray(matrix)}))
  permuted = _flat(_update(factory(5), {"w": jnp.asarray(matrix[permutation])}))
  np.testing.assert_allclose(permuted, update, rtol=1e-4, atol=1e-5 * np.abs(update).max())


@pytest.mark.parametrize("method", ["gradops", "gradops_alpha-2", "upgrad"])
@pytest.mark.parametrize("name", BATTERY_CASES)
def test_non_conflicting_update(method, name):
  matrix = CASES[name]
  grads = matrix.astype(np.float64)
  update = _flat(jitting.update(METHODS[method][0], {"w": jnp.asarray(matrix)})[0])
  norms = np.linalg.norm(grads, axis=1)
  assert np.all(grads @ update >= -1e-5 * norms * max(np.linalg.norm(update), norms.max()))


@pytest.mark.parametrize("c", [0.2, 0.9])
@pytest.mark.parametrize("name", BATTERY_CASES)
def test_conicgrad_update_stays_in_its_cone(name, c):
  matrix = CASES[name]
  grads = matrix.astype(np.float64)
  update = _flat(jitting.update(gradops_jax.scale_by_conicgrad, {"w": jnp.asarray(matrix)}, c=c)[0])
  g0 = grads.mean(axis=0)
  tol = 1e-5 * np.linalg.norm(grads, axis=1).max() * np.linalg.norm(g0)
  assert g0 @ update >= c * np.linalg.norm(g0) * np.linalg.norm(update) - tol


@pytest.mark.parametrize("method", sorted(METHODS))
def test_no_retrace_on_second_call(method):
  chex.clear_trace_counter()  # the counter is shared across parametrisations
  tx = METHODS[method][0](3)
  params = {"a": jnp.zeros(6)}

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(grads, state):
    return tx.update(grads, state, params)

  state = tx.init(params)
  rng = np.random.default_rng(1)
  for _ in range(3):
    _, state = step({"a": jnp.asarray(rng.standard_normal((3, 6)), jnp.float32)}, state)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_misuse_is_a_clear_error(method):
  tx = METHODS[method][0](3)
  params = {"layer": {"kernel": jnp.zeros((2, 2))}}
  with pytest.raises(ValueError, match=r"\['layer'\]\['kernel'\].*\(2, 2, 2\)"):
    tx.update({"layer": {"kernel": jnp.zeros((2, 2, 2))}}, tx.init(params), params)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_checkpoint_round_trip_resumes_bit_identically(method):
  """The state survives flax.serialization and training resumes exactly."""
  import optax
  from flax import serialization

  tx = optax.chain(METHODS[method][0](3), optax.adam(1e-2))
  params = {"w": jnp.zeros(16)}
  rng = np.random.default_rng(2)
  batches = [{"w": jnp.asarray(rng.standard_normal((3, 16)), jnp.float32)} for _ in range(4)]
  step = jax.jit(tx.update)

  def run(state, batches):
    outputs = []
    for grads in batches:
      updates, state = step(grads, state, params)
      outputs.append(np.asarray(updates["w"]))
    return outputs, state

  straight, _ = run(tx.init(params), batches)
  _, middle = run(tx.init(params), batches[:2])
  restored = serialization.from_bytes(tx.init(params), serialization.to_bytes(middle))
  resumed, _ = run(restored, batches[2:])
  for expected, actual in zip(straight[2:], resumed):
    np.testing.assert_array_equal(actual, expected)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_non_finite_input_is_flagged_and_apply_if_finite_skips_the_step(method):
  """Chosen behaviour: a NaN or Inf in the task gradients makes the update
  non-finite, so optax.apply_if_finite placed after the aggregator skips the
  step. (It cannot wrap the aggregator itself: on rejection it returns zeros
  shaped like its input, which carries the task axis.)"""
  import optax

  grads = np.asarray(CASES["conflicting_T3"][:, :8])
  params = {"w": jnp.zeros(8)}
  for bad in (np.nan, np.inf):
    broken = grads.copy()
    broken[1, 3] = bad
    tx = METHODS[method][0](3)
    updates, _ = jax.jit(tx.update)({"w": jnp.asarray(broken)}, tx.init(params), params)
    assert not np.all(np.isfinite(np.asarray(updates["w"])))
    guarded = optax.chain(METHODS[method][0](3), optax.apply_if_finite(optax.adam(0.1), max_consecutive_errors=3))
    state = guarded.init(params)
    updates, state = jax.jit(guarded.update)({"w": jnp.asarray(broken)}, state, params)
    np.testing.assert_array_equal(updates["w"], np.zeros(8))
    assert int(state[1].notfinite_count) == 1
