"""Determinism, and a long training run through exactly cancelling batches."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gradops_jax
from tests import cases as cases_lib
from tests import jitting
from tests.registry import METHODS


@pytest.mark.parametrize("method", sorted(METHODS))
def test_same_inputs_and_seed_give_bit_identical_output(method):
  """Two transforms built alike (same seed for the random task orders), run
  twice over the same steps, in separate jitted functions: identical bits."""
  matrices = [cases_lib.hard_cases(seed)["conflicting_T5"] for seed in (0, 1, 2)]
  params = cases_lib.split_into_pytree(np.zeros((1, matrices[0].shape[1]), np.float32))
  params = jax.tree.map(lambda leaf: jnp.asarray(leaf[0]), params)

  def run():
    tx = METHODS[method][0](5)
    step = jax.jit(tx.update)
    state, outputs = tx.init(params), []
    for matrix in matrices:
      updates, state = step(jax.tree.map(jnp.asarray, cases_lib.split_into_pytree(matrix)), state, params)
      outputs.append(updates)
    return outputs, state

  first, first_state = run()
  second, second_state = run()
  chex.assert_trees_all_equal(first, second, strict=True)
  chex.assert_trees_all_equal(first_state, second_state, strict=True)


NUM_TASKS = 3
CANCEL_EVERY = 300
NUM_STEPS = 10_000
# Per-task losses are MIXING @ (the three base losses). On a cancelling batch
# task 1's loss is exactly minus task 0's (negation is exact in floating
# point, so its gradient is too) and task 2 repeats task 0: each projected
# gradient is zero and GradOPS must fall back to MGDA, whose min-norm point
# of {g, -g} is 0.
IDENTITY = np.eye(NUM_TASKS, dtype=np.float32)
CANCELLING = np.array([[1, 1, 1], [-1, -1, -1], [1, 1, 1]], np.float32) / 3


def _init_mlp(key):
  k1, k2 = jax.random.split(key)
  return {
    "hidden": {"kernel": jax.random.normal(k1, (4, 16)) / 2, "bias": jnp.zeros(16)},
    "out": {"kernel": jax.random.normal(k2, (16, NUM_TASKS)) / 4, "bias": jnp.zeros(NUM_TASKS)},
  }


def _base_losses(params, x, y):
  hidden = jnp.tanh(x @ params["hidden"]["kernel"] + params["hidden"]["bias"][None, :])
  prediction = hidden @ params["out"]["kernel"] + params["out"]["bias"][None, :]
  return jnp.mean((prediction - y) ** 2, axis=0)


@pytest.mark.slow
def test_ten_thousand_steps_through_cancelling_batches():
  """10,000 jitted GradOPS + Adam steps on a stream in which every 300th batch
  has exactly cancelling tasks: the run stays finite, keeps learning, and the
  state's fallback counter counts exactly the cancelling batches."""
  true_weights = jax.random.normal(jax.random.key(1), (4, NUM_TASKS))
  tx = optax.chain(gradops_jax.scale_by_gradops(NUM_TASKS), optax.adam(1e-3))
  params = _init_mlp(jax.random.key(0))

  def task_losses(params, x, y, mixing):
    return mixing @ _base_losses(params, x, y)

  value_and_task_grads = gradops_jax.value_and_task_grads(task_losses)

  def step(carry, index):
    params, state = carry
    x = jax.random.normal(jax.random.fold_in(jax.random.key(2), index), (32, 4))
    y = jnp.sin(x @ true_weights)
    cancelling = index % CANCEL_EVERY == CANCEL_EVERY - 1
    mixing = jnp.where(cancelling, CANCELLING, IDENTITY)
    losses, task_grads = value_and_task_grads(params, x, y, mixing)
    updates, state = tx.update(task_grads, state, params)
    params = optax.apply_updates(params, updates)
    return (params, state), (_base_losses(params, x, y), jnp.max(jnp.abs(losses)))

  run = jax.jit(lambda params, state: jax.lax.scan(step, (params, state), jnp.arange(NUM_STEPS)))
  (params, state), (base_losses, _) = run(params, tx.init(params))
  chex.assert_tree_all_finite((params, state, base_losses))
  assert int(state[0].fallback_count) == NUM_STEPS // CANCEL_EVERY
  base_losses = np.asarray(base_losses).sum(axis=1)
  assert base_losses[-500:].mean() < 0.5 * base_losses[:500].mean()


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_runs_under_strict_dtype_promotion(method):
  """jax_numpy_dtype_promotion='strict' (no implicit promotion): bfloat16 gradients go through the
  combine's accumulation dtype and the min-norm solver's zero-task branch, which promoted before."""
  tree = {"w": jnp.asarray(cases_lib.hard_cases()["zero_task"], jnp.bfloat16)}
  params = {"w": jnp.zeros(tree["w"].shape[1], jnp.bfloat16)}
  with jax.numpy_dtype_promotion("strict"):
    tx = METHODS[method][0](5)
    updates, _ = jax.jit(tx.update)(tree, tx.init(params), params)
  chex.assert_tree_all_finite(updates)


def test_empty_aggregation_is_no_step_and_no_fallback():
  tx = gradops_jax.scale_by_gradops(2)
  state = tx.init({})
  for _ in range(3):
    updates, state = tx.update({}, state, {})
  assert updates == {} and int(state.fallback_count) == 0 and not bool(state.used_fallback)
  params = {"head": jnp.zeros(3)}
  with pytest.warns(UserWarning, match="no parameter is marked shared"):
    shared = gradops_jax.aggregate_shared(gradops_jax.scale_by_gradops(2), 2, {"head": False})
    state = shared.init(params)
  for _ in range(3):
    updates, state = shared.update({"head": jnp.ones((2, 3))}, state, params)
  np.testing.assert_array_equal(updates["head"], 2.0)
  assert int(optax.tree.get(state, "fallback_count")) == 0


@pytest.mark.parametrize("method", sorted(METHODS))
def test_eager_update_compiles_once_per_shape(method):
  """Calling ``update`` without jit compiles on the first call only, and gives the jitted result."""
  compiles = []

  def listener(event, duration, **kwargs):
    if "backend_compile" in event:
      compiles.append(event)

  tx = METHODS[method][0](3)
  params = {"w": jnp.zeros(8), "b": jnp.zeros(())}
  state = tx.init(params)
  steps = [{"w": jax.random.normal(jax.random.key(seed), (3, 8)), "b": jnp.arange(3.0) - seed} for seed in range(3)]
  jitted_state, jitted = state, []
  for grads in steps:
    updates, jitted_state = jax.jit(tx.update)(grads, jitted_state, params)
    jitted.append(updates)
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    for index, grads in enumerate(steps):
      compiles.clear()
      updates, state = tx.update(grads, state, params)
      jax.block_until_ready(updates)
      if index:
        assert not compiles, f"eager call {index} compiled {len(compiles)} programs"
      chex.assert_trees_all_close(updates, jitted[index], rtol=1e-6, atol=1e-7)
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)


# Methods whose update is exactly zero for collinear tasks of both signs (Pareto-stationary).
STATIONARY_ZERO = ("gradops", "gradops_alpha-2", "mgda", "upgrad", "pcgrad", "gradvac", "imtl_g")


@pytest.mark.parametrize("method", STATIONARY_ZERO)
def test_pareto_stationary_tasks_give_an_exactly_zero_update(method):
  """``g2 = -0.3 g1`` in float32: the exact combination is zero, and so must the update be, not
  rounding noise in a random direction that Adam would turn into a full step."""
  g1 = np.random.default_rng(0).standard_normal(1000).astype(np.float32)
  cases = [np.stack([g1, np.float32(-0.3) * g1]), np.stack([g1, np.float32(-0.3) * g1, np.float32(0.7) * g1])]
  for matrix in cases:
    tx = METHODS[method][0](matrix.shape[0])
    step = jax.jit(tx.update)
    params = {"w": jnp.zeros(1000), "b": jnp.zeros(())}
    grads = {"w": jnp.asarray(matrix), "b": jnp.zeros(matrix.shape[0])}
    updates, _ = step(grads, tx.init(params), params)
    assert not np.any(np.asarray(updates["w"])), np.linalg.norm(np.asarray(updates["w"])) / np.linalg.norm(g1)
    # A conflict far above rounding is kept: the update is not zeroed.
    tilted = matrix.copy()
    tilted[1, :10] += 1e-3
    updates, _ = step({"w": jnp.asarray(tilted), "b": grads["b"]}, tx.init(params), params)
    assert np.linalg.norm(np.asarray(updates["w"])) > 1e-6 * np.linalg.norm(g1)


def _valid_but_degenerate(kind):
  rng = np.random.default_rng(4)
  g = rng.standard_normal((2, 30)).astype(np.float32)
  partner = {"duplicate": g[0], "opposite": -g[0], "zero": 0 * g[0]}[kind]
  return jnp.asarray(np.stack([g[0], partner, g[1]]))


@pytest.mark.parametrize("method", sorted(METHODS))
def test_jax_debug_nans_stays_silent_on_valid_input(method):
  """jax_debug_nans, with and without jit, on duplicate, opposite and zero tasks: no NaN is made
  by design (item 10 of issue 25)."""
  factory, _ = METHODS[method]
  tx = factory(3)
  for kind in ("duplicate", "opposite", "zero"):
    grads = _valid_but_degenerate(kind)
    with jax.debug_nans(True):
      jitted, _ = jitting.update(factory, grads)
      with jax.disable_jit():
        eager, _ = tx.update(grads, tx.init(jnp.zeros(30)))
    assert bool(jnp.all(jnp.isfinite(jitted))) and bool(jnp.all(jnp.isfinite(eager))), kind


F32_MAX = float(np.finfo(np.float32).max)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_finite_update_wherever_the_combination_stays_in_range(method):
  r"""Near float32's largest number (item 8 of issue 25), the documented range holds.

  The update :math:`\sum_k \beta_k g_k` is finite whenever
  :math:`\sum_k |\beta_k|\,\|g_k\|_\infty` is below float32's largest number (every partial sum of
  the combine is then in range); beyond it an entry may overflow to ±inf, or NaN where two
  overflowing terms of opposite signs meet. The sweep reaches the bound for the methods that sum
  the tasks (and Nash-MTL, whose weights on opposite tasks are 1e4 times the others).
  """
  factory, _ = METHODS[method]
  rng = np.random.default_rng(8)
  g = rng.standard_normal((2, 30))
  g /= np.max(np.abs(g))
  shapes = {
    "opposite": np.stack([g[0], -g[0], g[1]]),
    "conflict": np.stack([g[0], -0.5 * g[0] + 0.1 * g[1], g[1]]),
    "aligned": np.stack([g[0], g[0], g[0]]),
    "zero": np.stack([g[0], 0 * g[0], g[1]]),
  }
  inside = 0
  for scale in (1e30, 1e34, 1e36, 1e37, 1e38, 2e38, 3e38):
    for grads in shapes.values():
      grads32 = (grads * scale).astype(np.float32)
      out, state = jitting.update(factory, jnp.asarray(grads32))
      weights = np.full(3, 1 / 3) if method == "linear_scalarization" else np.asarray(state.weights, np.float64)
      bound = np.sum(np.abs(weights) * np.max(np.abs(grads32.astype(np.float64)), axis=1))
      if bound < F32_MAX:
        inside += 1
        assert bool(jnp.all(jnp.isfinite(out))), (scale, bound, out)
  assert inside >= 12


def _smooth_problem():
  rng = np.random.default_rng(12)
  grads = rng.standard_normal((3, 20))
  grads[1] = -0.4 * grads[0] + 0.5 * grads[1]  # a conflict, away from any switching point
  return grads, rng.standard_normal((3, 20))


@pytest.mark.parametrize("method", sorted(METHODS))
def test_forward_mode_matches_finite_differences(method):
  """jax.jvp through update (float64 gradients), against a central difference (item 12 of issue 25)."""
  grads, direction = _smooth_problem()
  with jax.enable_x64(True):
    tx = METHODS[method][0](3)
    state = tx.init(jnp.zeros(20))
    step = 1e-6

    def tangent_and_difference(g, t):
      def update(g):
        return tx.update(g, state)[0]

      _, tangent = jax.jvp(update, (g,), (t,))
      return tangent, (update(g + step * t) - update(g - step * t)) / (2 * step)

    tangent, difference = jax.jit(tangent_and_difference)(jnp.asarray(grads), jnp.asarray(direction))
    np.testing.assert_allclose(tangent, difference, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(difference))))


@pytest.mark.parametrize("method", sorted(METHODS))
def test_reverse_mode_names_forward_mode_or_works(method):
  """Reverse mode: a TypeError naming forward mode, except for linear scalarisation (item 12)."""
  grads, _ = _smooth_problem()
  tx = METHODS[method][0](3)
  state = tx.init(jnp.zeros(20))

  def loss(g):
    return jnp.sum(tx.update(g, state)[0] ** 2)

  if method == "linear_scalarization":
    chex.assert_tree_all_finite(jax.grad(loss)(jnp.asarray(grads, jnp.float32)))
    return
  for differentiate in (jax.grad(loss), jax.jit(jax.grad(loss))):
    with pytest.raises(TypeError, match="reverse-mode.*jax.jvp or jax.jacfwd"):
      differentiate(jnp.asarray(grads, jnp.float32))


def test_forward_mode_with_respect_to_alpha():
  """Meta-learning GradOPS's alpha: jax.jvp through a transform built from a traced alpha."""
  grads, _ = _smooth_problem()
  with jax.enable_x64(True):
    grads = jnp.asarray(grads)
    state = gradops_jax.scale_by_gradops(3).init(jnp.zeros(20))

    def update(alpha):
      return gradops_jax.scale_by_gradops(3, alpha=alpha).update(grads, state)[0]

    for differentiate in (jax.jvp, jax.jit(jax.jvp, static_argnums=0)):
      _, tangent = differentiate(update, (jnp.asarray(-1.0),), (jnp.asarray(1.0),))
      difference = (update(jnp.asarray(-1.0 + 1e-6)) - update(jnp.asarray(-1.0 - 1e-6))) / 2e-6
      np.testing.assert_allclose(tangent, difference, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(difference))))
