"""The Gramian engine gives the stacked engine's update and state, in less memory.

The hard cases use losses linear in the parameters, ``L_t = <C_t, params>``,
whose Jacobian is exactly ``C``: both engines then see the same task
gradients, so the states agree and the updates differ only by the rounding of
the combination (a float32 weighted sum in both, summed in different orders).
"""

import functools

import chex
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gradops_jax
from benchmarks.engines import training_steps
from tests import cases
from tests import jitting
from tests.registry import SPECS

EPS32 = float(np.finfo(np.float32).eps)


def linear_losses(params, coefficients):
  """``L_t = <C_t, params>`` summed over the leaves: its Jacobian is ``C``."""
  return sum(jnp.tensordot(c, p, axes=p.ndim) for c, p in zip(jax.tree.leaves(coefficients), jax.tree.leaves(params)))


def _engine_cases():
  """(name, (4, 96) float32 matrix): the hard cases at T = 4, one compiled shape for all."""
  hard = cases.hard_cases()
  chosen = {
    name: hard[name]
    for name in (
      "rank_deficient_sum",
      "duplicated",
      "exactly_opposite_plus_others",
      "mixed_scales_1e-20_1e20",
      "one_task_1e10_larger",
      "conflicting_T5",
    )
  }
  chosen["conflicting_T5"] = chosen["conflicting_T5"][:4]
  rng = np.random.default_rng(1)
  for name in ("near_collinear", "near_collinear_1e-4"):
    chosen[f"{name}_plus_zero"] = np.concatenate([hard[name], np.zeros((1, 96), np.float32)])
  opposite = rng.standard_normal((1, 96)).astype(np.float32)
  chosen["opposite_ratio_0.3"] = np.concatenate([opposite, -0.3 * opposite, rng.standard_normal((2, 96))]).astype(
    np.float32
  )
  chosen["all_zero"] = np.zeros((4, 96), np.float32)
  return chosen


@functools.lru_cache(maxsize=None)
def _engine(factory, num_tasks):
  tx = factory(num_tasks)

  def run(coefficients):
    params = jax.tree.map(lambda c: jnp.zeros(c.shape[1:], c.dtype), coefficients)
    _, update, state = gradops_jax.value_and_aggregated_grad(linear_losses, tx)(tx.init(params), params, coefficients)
    return update, state

  return jax.jit(run)


def _combination_scale(state, task_grads, num_tasks):
  """Per leaf, ``max |sum_k |beta_k| |g_k||``: the size the combination's rounding is relative to."""
  weights = getattr(state, "weights", None)
  weights = np.full(num_tasks, 1.0 / num_tasks) if weights is None else np.asarray(weights, np.float64)
  return jax.tree.map(
    lambda g: float(np.max(np.tensordot(np.abs(weights), np.abs(np.asarray(g, np.float64)), axes=1))), task_grads
  )


@pytest.mark.parametrize("spec", SPECS, ids=lambda spec: spec.name)
def test_gramian_engine_equals_stacked_engine_on_hard_cases(spec):
  for name, matrix in _engine_cases().items():
    task_grads = jax.tree.map(jnp.asarray, cases.split_into_pytree(matrix))
    stacked_update, stacked_state = jitting.update(spec.factory, task_grads)
    update, state = _engine(spec.factory, 4)(task_grads)
    # The Gram matrix is the same, so the solve and the state are too.
    chex.assert_trees_all_equal(state, stacked_state, custom_message=name)
    scales = _combination_scale(state, task_grads, 4)
    for leaf, stacked_leaf, scale in zip(
      jax.tree.leaves(update), jax.tree.leaves(stacked_update), jax.tree.leaves(scales)
    ):
      difference = float(np.max(np.abs(np.asarray(leaf, np.float64) - np.asarray(stacked_leaf, np.float64))))
      assert difference <= 8 * 4 * EPS32 * scale, (name, difference, scale)
      assert np.all(np.isfinite(np.asarray(leaf)))


def _mlp(params, x):
  hidden = jnp.tanh(x @ params["w1"] + params["b1"][None, :])
  return hidden @ params["w2"]


def _mlp_losses(params, x, y):
  return jnp.mean((_mlp(params, x) - y) ** 2, axis=0)


def _mlp_problem(num_tasks=3, dtype=jnp.float32):
  keys = jax.random.split(jax.random.key(0), 4)
  params = {
    "w1": (jax.random.normal(keys[0], (5, 16)) / 2).astype(dtype),
    "b1": jnp.zeros(16, dtype),
    "w2": (jax.random.normal(keys[1], (16, num_tasks)) / 4).astype(dtype),
  }
  x = jax.random.normal(keys[2], (32, 5)).astype(dtype)
  y = jax.random.normal(keys[3], (32, num_tasks)).astype(dtype)
  return params, x, y


def _assert_close_to_stacked(update, stacked_update, rtol=1e-5):
  for leaf, stacked_leaf in zip(jax.tree.leaves(update), jax.tree.leaves(stacked_update)):
    assert leaf.dtype == stacked_leaf.dtype and leaf.shape == stacked_leaf.shape
    scale = float(jnp.max(jnp.abs(stacked_leaf.astype(jnp.float32))))
    np.testing.assert_allclose(
      np.asarray(leaf, np.float32), np.asarray(stacked_leaf, np.float32), atol=rtol * scale, rtol=0
    )


def test_has_aux_argnums_and_keyword_arguments():
  params, x, y = _mlp_problem()
  tx = gradops_jax.scale_by_gradops(3)

  def losses(x, params, *, y):
    out = _mlp(params, x)
    return jnp.mean((out - y) ** 2, axis=0), {"mean_output": jnp.mean(out)}

  (values, aux), update, state = jax.jit(gradops_jax.value_and_aggregated_grad(losses, tx, argnums=1, has_aux=True))(
    tx.init(params), x, params, y=y
  )
  (stacked_values, stacked_aux), task_grads = gradops_jax.value_and_task_grads(losses, argnums=1, has_aux=True)(
    x, params, y=y
  )
  stacked_update, stacked_state = jax.jit(tx.update)(task_grads, tx.init(params), params)
  chex.assert_trees_all_close(values, stacked_values)
  chex.assert_trees_all_close(aux, stacked_aux)
  chex.assert_trees_all_close(state, stacked_state, rtol=1e-6)
  _assert_close_to_stacked(update, stacked_update)

  # A sequence of argnums: a tuple of updates, one per differentiated argument.
  _, updates, _ = gradops_jax.value_and_aggregated_grad(_mlp_losses, tx, argnums=(0, 1))(
    tx.init((params, x)), params, x, y
  )
  assert isinstance(updates, tuple) and updates[1].shape == x.shape


def test_bfloat16_parameters_keep_their_dtype():
  params, x, y = _mlp_problem(dtype=jnp.bfloat16)
  tx = gradops_jax.scale_by_upgrad(3)

  def losses(params, x, y):
    return _mlp_losses(params, x, y).astype(jnp.float32)

  _, update, _ = jax.jit(gradops_jax.value_and_aggregated_grad(losses, tx))(tx.init(params), params, x, y)
  _, task_grads = gradops_jax.value_and_task_grads(losses)(params, x, y)
  stacked_update, _ = jax.jit(tx.update)(task_grads, tx.init(params), params)
  _assert_close_to_stacked(update, stacked_update, rtol=2e-2)


def test_aggregate_shared_and_layer_conflict_scores():
  params, x, y = _mlp_problem()
  shared = {"w1": True, "b1": True, "w2": False}
  for tx in (
    gradops_jax.aggregate_shared(gradops_jax.scale_by_gradops(3), 3, shared),
    optax.chain(gradops_jax.recon.layer_conflict_scores(3), gradops_jax.scale_by_mgda(3)),
  ):
    _, update, state = jax.jit(gradops_jax.value_and_aggregated_grad(_mlp_losses, tx))(tx.init(params), params, x, y)
    _, task_grads = gradops_jax.value_and_task_grads(_mlp_losses)(params, x, y)
    stacked_update, stacked_state = jax.jit(tx.update)(task_grads, tx.init(params), params)
    chex.assert_trees_all_close(state, stacked_state, rtol=1e-6)
    _assert_close_to_stacked(update, stacked_update)


@pytest.mark.parametrize(
  "make_aggregator",
  [
    lambda: gradops_jax.scale_by_pcgrad(3),
    lambda: optax.chain(gradops_jax.recon.layer_conflict_scores(3), gradops_jax.scale_by_gradvac(3)),
  ],
  ids=["pcgrad", "recon_scores_then_gradvac"],
)
def test_stateful_methods_over_steps_with_donated_buffers(make_aggregator):
  params, x, y = _mlp_problem()
  optimizer, tx = optax.adam(1e-2), make_aggregator()
  steps = training_steps(_mlp_losses, tx, optimizer)
  results = {}
  for name in ("stacked", "gramian"):
    compiled = jax.jit(steps[name], donate_argnums=(0, 1, 2))
    state = (jax.tree.map(jnp.copy, params), optimizer.init(params), tx.init(params))
    for _ in range(5):
      state = compiled(*state, x, y)
    results[name] = state
  chex.assert_trees_all_close(results["gramian"][0], results["stacked"][0], rtol=1e-4, atol=1e-6)
  chex.assert_trees_all_close(results["gramian"][2], results["stacked"][2], rtol=1e-4, atol=1e-6)


class _DropoutModel(nnx.Module):
  def __init__(self, rngs):
    self.hidden = nnx.Linear(4, 16, rngs=rngs)
    self.dropout = nnx.Dropout(0.5, rngs=rngs)
    self.out = nnx.Linear(16, 3, rngs=rngs)

  def __call__(self, x):
    return self.out(self.dropout(nnx.relu(self.hidden(x))))


def test_nnx_engine_writes_back_dropout_state_and_trains():
  x = jax.random.normal(jax.random.key(1), (16, 4))
  y = jax.random.normal(jax.random.key(2), (16, 3))

  def task_losses(model, x, y):
    out = model(x)
    return jnp.mean((out - y) ** 2, axis=0), jnp.mean(out)

  tx = gradops_jax.scale_by_gradops(3)
  engine_model, stacked_model = _DropoutModel(nnx.Rngs(0)), _DropoutModel(nnx.Rngs(0))
  agg_state = tx.init(nnx.state(engine_model, nnx.Param))
  (losses, aux), update, new_state = gradops_jax.nnx_value_and_aggregated_grad(task_losses, tx, has_aux=True)(
    agg_state, engine_model, x, y
  )
  (stacked_losses, _), task_grads = gradops_jax.nnx_value_and_task_grads(task_losses, has_aux=True)(stacked_model, x, y)
  stacked_update, stacked_state = tx.update(task_grads, agg_state, nnx.state(stacked_model, nnx.Param))
  chex.assert_trees_all_close(losses, stacked_losses)
  chex.assert_trees_all_close(new_state, stacked_state, rtol=1e-6)
  _assert_close_to_stacked(update, stacked_update)
  # The dropout stream advanced in both, by the same count.
  chex.assert_trees_all_equal(nnx.state(engine_model, nnx.RngState), nnx.state(stacked_model, nnx.RngState))

  optimizer = nnx.Optimizer(engine_model, optax.adam(1e-2), wrt=nnx.Param)
  step = gradops_jax.nnx_value_and_aggregated_grad(task_losses, tx, has_aux=True)

  @nnx.jit
  def train_step(model, optimizer, agg_state):
    (losses, _), update, agg_state = step(agg_state, model, x, y)
    optimizer.update(model, update)
    return jnp.sum(losses), agg_state

  engine_model.eval()  # deterministic losses, to see them fall
  first, agg_state = train_step(engine_model, optimizer, agg_state)
  for _ in range(30):
    last, agg_state = train_step(engine_model, optimizer, agg_state)
  assert float(last) < float(first)


def test_aggregator_that_is_not_a_combination_raises():
  params, x, y = _mlp_problem()
  for tx, match in (
    (gradops_jax.recon.layer_conflict_scores(3), "returned"),
    (optax.chain(gradops_jax.scale_by_gradops(3), optax.scale(-1.0)), "optimiser"),
  ):
    with pytest.raises(TypeError, match=match):
      gradops_jax.value_and_aggregated_grad(_mlp_losses, tx)(tx.init(params), params, x, y)


def test_wrong_number_of_tasks_names_the_leaf():
  params, x, y = _mlp_problem()
  tx = gradops_jax.scale_by_gradops(4)
  with pytest.raises(ValueError, match=r"\['b1'\] with shape \(3, 16\).*has 3 on axis 0"):
    gradops_jax.value_and_aggregated_grad(_mlp_losses, tx)(tx.init(params), params, x, y)


def _deep_mlp(depth, width, num_tasks):
  keys = jax.random.split(jax.random.key(0), depth + 1)
  params = [jax.random.normal(key, (width, width)) / np.sqrt(width) for key in keys[:-1]]
  params.append(jax.random.normal(keys[-1], (width, num_tasks)) / np.sqrt(width))
  return params


def _deep_losses(params, x, y):
  for kernel in params[:-1]:
    x = jax.nn.relu(x @ kernel)
  return jnp.mean((x @ params[-1] - y) ** 2, axis=0)


def test_temporary_memory_does_not_grow_with_the_tasks():
  """XLA's compiled memory analysis at T = 8: close to the summed loss's step, far below the stacked one's."""
  num_tasks, depth, width, batch = 8, 24, 256, 16
  params = _deep_mlp(depth, width, num_tasks)
  x = jax.random.normal(jax.random.key(1), (batch, width))
  y = jax.random.normal(jax.random.key(2), (batch, num_tasks))
  tx, optimizer = gradops_jax.scale_by_gradops(num_tasks), optax.adam(1e-3)

  buffer = 4 * sum(p.size for p in params)
  temp = {}
  for name, step in training_steps(_deep_losses, tx, optimizer).items():
    args = (params, optimizer.init(params), tx.init(params), x, y)
    compiled = jax.jit(step, donate_argnums=(0, 1, 2)).lower(*args).compile()
    temp[name] = compiled.memory_analysis().temp_size_in_bytes / buffer
  assert temp["gramian"] <= 2.0, temp
  assert temp["gramian"] <= temp["summed"] + 1.0, temp
  assert temp["stacked"] >= num_tasks - 1, temp  # what the engine saves
