"""Flax and optax integration: NNX and Linen models, partitions, optax wrappers, checkpoints."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen
from flax import nnx
from flax.training import train_state

import gradops_jax
from tests.registry import BY_NAME
from tests.registry import SPECS

NUM_TASKS = 3


class MultiHead(nnx.Module):
  """A shared trunk (with dropout) and one linear head per task."""

  def __init__(self, rngs, dropout=0.0):
    self.trunk = nnx.Linear(6, 16, rngs=rngs)
    self.dropout = nnx.Dropout(dropout, rngs=rngs)
    self.heads = nnx.List([nnx.Linear(16, 1, rngs=rngs) for _ in range(NUM_TASKS)])

  def __call__(self, x):
    hidden = self.dropout(nnx.relu(self.trunk(x)))
    return jnp.concatenate([head(hidden) for head in self.heads], axis=-1)


def _data(seed=0, batch=32):
  key_x, key_y = jax.random.split(jax.random.key(seed))
  return jax.random.normal(key_x, (batch, 6)), jax.random.normal(key_y, (batch, NUM_TASKS))


def _task_losses(model, x, y):
  return jnp.mean((model(x) - y) ** 2, axis=0)


def _is_shared(path):
  return not any(getattr(key, "key", None) == "heads" for key in path)


def _shared_mask(tree):
  return jax.tree_util.tree_map_with_path(lambda path, _: _is_shared(path), tree)


def _stacked_grads(seed=0):
  model = MultiHead(nnx.Rngs(seed))
  x, y = _data(seed)
  _, grads = gradops_jax.nnx_value_and_task_grads(_task_losses)(model, x, y)
  return model, nnx.state(model, nnx.Param), grads


# -- Per-task gradients of NNX models -------------------------------------------------


def test_nnx_task_grads_match_per_task_nnx_grad():
  model = MultiHead(nnx.Rngs(0))
  x, y = _data()
  losses, grads = nnx.jit(gradops_jax.nnx_value_and_task_grads(_task_losses))(model, x, y)
  chex.assert_trees_all_close(losses, _task_losses(model, x, y), rtol=1e-6)
  assert isinstance(grads, nnx.State)
  for task in range(NUM_TASKS):
    expected = nnx.grad(lambda m, task=task: _task_losses(m, x, y)[task])(model)
    chex.assert_trees_all_close(jax.tree.map(lambda g, task=task: g[task], grads), expected, atol=1e-6)
  chex.assert_shape(grads["trunk"]["kernel"][...], (NUM_TASKS, 6, 16))


def test_nnx_task_grads_advance_dropout_rngs_and_skip_non_params():
  model = MultiHead(nnx.Rngs(0, dropout=1), dropout=0.5)
  x, y = _data()
  step = nnx.jit(gradops_jax.nnx_value_and_task_grads(_task_losses))
  count = int(model.dropout.rngs.count[...])
  first, grads = step(model, x, y)
  second, _ = step(model, x, y)
  assert int(model.dropout.rngs.count[...]) == count + 2
  assert not np.allclose(first, second)  # a fresh dropout mask each step
  # Only floating Param leaves: no float0 gradients of RNG keys or counts.
  for leaf in jax.tree.leaves(grads):
    assert jnp.issubdtype(leaf.dtype, jnp.floating)


def test_nnx_task_grads_has_aux():
  model = MultiHead(nnx.Rngs(0))
  x, y = _data()

  def with_aux(model, x, y):
    return _task_losses(model, x, y), {"batch": x.shape[0]}

  (losses, aux), grads = gradops_jax.nnx_value_and_task_grads(with_aux, has_aux=True)(model, x, y)
  assert aux == {"batch": 32} and losses.shape == (NUM_TASKS,)
  chex.assert_shape(grads["heads"][0]["bias"][...], (NUM_TASKS, 1))


def test_nnx_optimizer_with_shared_aggregation_moves_each_head_by_its_own_gradient():
  model = MultiHead(nnx.Rngs(0))
  x, y = _data()
  before = nnx.clone(nnx.state(model, nnx.Param))
  tx = optax.chain(
    gradops_jax.aggregate_shared(gradops_jax.scale_by_gradops(NUM_TASKS), NUM_TASKS, _shared_mask),
    optax.sgd(1.0),
  )
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def train_step(model, optimizer, x, y):
    _, grads = gradops_jax.nnx_value_and_task_grads(_task_losses)(model, x, y)
    optimizer.update(model, grads)
    return grads

  grads = train_step(model, optimizer, x, y)
  after = nnx.state(model, nnx.Param)
  for task in range(NUM_TASKS):
    moved = jax.tree.map(lambda a, b: a - b, after["heads"][task], before["heads"][task])
    own = jax.tree.map(lambda g, task=task: -g[task], grads["heads"][task])
    chex.assert_trees_all_close(moved, own, atol=1e-6)
  # The trunk moved by GradOPS of the trunk gradients alone.
  aggregator = gradops_jax.scale_by_gradops(NUM_TASKS)
  trunk_only, _ = aggregator.update(grads["trunk"], aggregator.init(before["trunk"]))
  moved_trunk = jax.tree.map(lambda a, b: a - b, after["trunk"], before["trunk"])
  chex.assert_trees_all_close(moved_trunk, jax.tree.map(jnp.negative, trunk_only), atol=1e-6)


# -- Shared vs task-specific partition -------------------------------------------------


def test_aggregate_shared_equals_aggregator_on_shared_leaves_and_sum_elsewhere():
  _, params, grads = _stacked_grads()
  params, grads = nnx.to_pure_dict(params), nnx.to_pure_dict(grads)
  mask = {
    "trunk": {"bias": True, "kernel": True},
    "heads": {i: {"bias": False, "kernel": False} for i in range(NUM_TASKS)},
  }
  for aggregator in (gradops_jax.scale_by_gradops(NUM_TASKS, alpha=-1.0), gradops_jax.scale_by_mgda(NUM_TASKS)):
    tx = gradops_jax.aggregate_shared(aggregator, NUM_TASKS, mask)
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    expected_trunk, _ = aggregator.update(grads["trunk"], aggregator.init(params["trunk"]))
    chex.assert_trees_all_close(updates["trunk"], expected_trunk, rtol=1e-5, atol=1e-7)
    chex.assert_trees_all_close(
      updates["heads"], jax.tree.map(lambda g: g.sum(0), grads["heads"]), rtol=1e-5, atol=1e-7
    )
    chex.assert_trees_all_equal_shapes_and_dtypes(updates, params)


def test_aggregate_shared_rejects_bad_masks_naming_the_leaf():
  params = {"trunk": jnp.zeros(3), "head": jnp.zeros(2)}
  tx = gradops_jax.aggregate_shared(gradops_jax.scale_by_gradops(2), 2, {"trunk": True})
  with pytest.raises(ValueError, match="structure"):
    tx.init(params)
  tx = gradops_jax.aggregate_shared(gradops_jax.scale_by_gradops(2), 2, {"trunk": True, "head": "no"})
  with pytest.raises(TypeError, match=r"\['head'\].*shape \(2,\)"):
    tx.init(params)


def _nnx_step_with(shared):
  """One nnx.Optimizer step with aggregate_shared(shared); returns how the heads and trunk moved."""
  model = MultiHead(nnx.Rngs(0))
  x, y = _data()
  before = nnx.clone(nnx.state(model, nnx.Param))
  tx = optax.chain(
    gradops_jax.aggregate_shared(gradops_jax.scale_by_gradops(NUM_TASKS), NUM_TASKS, shared), optax.sgd(1.0)
  )
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  _, grads = gradops_jax.nnx_value_and_task_grads(_task_losses)(model, x, y)
  optimizer.update(model, grads)
  return jax.tree.map(lambda a, b: a - b, nnx.to_pure_dict(nnx.state(model, nnx.Param)), nnx.to_pure_dict(before))


def test_aggregate_shared_takes_fixed_masks_and_path_predicates_in_nnx():
  """nnx.Optimizer calls init with Param-wrapped state and update with plain arrays: a fixed
  mask (a plain dict), a path predicate and a tree function give the same step."""
  fixed = {
    "trunk": {"bias": True, "kernel": True},
    "heads": {i: {"bias": False, "kernel": False} for i in range(NUM_TASKS)},
  }
  expected = _nnx_step_with(_shared_mask)
  for shared in (fixed, lambda path: path[0].key == "trunk"):
    chex.assert_trees_all_close(_nnx_step_with(shared), expected, atol=1e-7)


def test_aggregate_shared_names_the_first_differing_path_and_warns_on_trivial_masks():
  params = {"trunk": jnp.zeros(3), "heads": {"a": jnp.zeros(2)}}
  aggregator = gradops_jax.scale_by_gradops(2)
  tx = gradops_jax.aggregate_shared(aggregator, 2, {"trunck": True, "heads": {"a": False}})
  with pytest.raises(ValueError, match=r"\['trunk'\] has no entry") as error:
    tx.init(params)
  assert "PyTreeDef" not in str(error.value)
  with pytest.warns(UserWarning, match="no parameter is marked shared"):
    gradops_jax.aggregate_shared(aggregator, 2, lambda path: path[0].key == "trunck").init(params)
  with pytest.warns(UserWarning, match="every parameter is marked shared"):
    gradops_jax.aggregate_shared(aggregator, 2, lambda path: True).init(params)


def test_nnx_optimizer_checkpoint_recipe_resumes_bit_identically():
  """The recipe of docs/integrations.md: pure dicts of nnx.state(model) and
  nnx.state(optimizer) (nnx.to_pure_dict) through flax.serialization, restored with
  nnx.replace_by_pure_dict and nnx.update."""
  from flax import serialization

  def make():
    model = MultiHead(nnx.Rngs(0))
    tx = optax.chain(
      gradops_jax.aggregate_shared(gradops_jax.scale_by_pcgrad(NUM_TASKS), NUM_TASKS, _shared_mask), optax.adam(1e-2)
    )
    return model, nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer, x, y):
    _, grads = gradops_jax.nnx_value_and_task_grads(_task_losses)(model, x, y)
    optimizer.update(model, grads)

  batches = [_data(seed) for seed in range(4)]
  model, optimizer = make()
  for x, y in batches[:2]:
    step(model, optimizer, x, y)
  # The model's parameters (its RNG keys are typed keys, not plain arrays) and the optimizer.
  saved = {
    name: serialization.to_bytes(nnx.to_pure_dict(nnx.state(obj, kind)))
    for name, obj, kind in (("model", model, nnx.Param), ("optimizer", optimizer, nnx.Not(nnx.RngState)))
  }
  for x, y in batches[2:]:
    step(model, optimizer, x, y)

  restored_model, restored_optimizer = make()
  for name, obj, kind in (
    ("model", restored_model, nnx.Param),
    ("optimizer", restored_optimizer, nnx.Not(nnx.RngState)),
  ):
    state = nnx.state(obj, kind)
    nnx.replace_by_pure_dict(state, serialization.from_bytes(nnx.to_pure_dict(state), saved[name]))
    nnx.update(obj, state)
  for x, y in batches[2:]:
    step(restored_model, restored_optimizer, x, y)
  chex.assert_trees_all_equal(nnx.state(restored_model, nnx.Param), nnx.state(model, nnx.Param))


# -- optax wrappers and chains --------------------------------------------------------


def _toy_problem(num_tasks=NUM_TASKS, seed=0):
  key_a, key_b = jax.random.split(jax.random.key(seed))
  params = {"w": jax.random.normal(key_a, (5, 4)), "b": jnp.zeros(4)}
  grads = {"w": jax.random.normal(key_b, (num_tasks, 5, 4)), "b": jnp.ones((num_tasks, 4))}
  grads["w"] = grads["w"].at[1].set(-grads["w"][0])  # exactly opposite tasks 0 and 1
  return params, grads


def _direction(grads, **kwargs):
  params = jax.tree.map(lambda g: jnp.zeros(g.shape[1:]), grads)
  tx = gradops_jax.scale_by_gradops(NUM_TASKS, **kwargs)
  return tx.update(grads, tx.init(params), params)[0]


def test_chain_with_clip_by_global_norm_and_decayed_weights():
  params, grads = _toy_problem()
  direction = _direction(grads)
  tx = optax.chain(
    gradops_jax.scale_by_gradops(NUM_TASKS),
    optax.clip_by_global_norm(0.1),
    optax.add_decayed_weights(1e-2),
    optax.sgd(1.0),
  )
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  clipped = jax.tree.map(lambda d: d * 0.1 / optax.tree.norm(direction), direction)
  expected = jax.tree.map(lambda c, p: -(c + 1e-2 * p), clipped, params)
  assert float(optax.tree.norm(direction)) > 0.1  # so that the clip is active
  chex.assert_trees_all_close(updates, expected, rtol=1e-5)


def test_adam_with_learning_rate_schedule():
  params, grads = _toy_problem()
  schedule = optax.linear_schedule(1.0, 0.0, transition_steps=4)
  tx = optax.chain(
    gradops_jax.scale_by_gradops(NUM_TASKS), optax.scale_by_adam(), optax.scale_by_learning_rate(schedule)
  )
  reference = optax.chain(optax.scale_by_adam(), optax.scale_by_learning_rate(schedule))
  state, reference_state = tx.init(params), reference.init(params)
  direction = _direction(grads)
  step = jax.jit(tx.update)
  for _ in range(5):
    updates, state = step(grads, state, params)
    expected, reference_state = reference.update(direction, reference_state, params)
    chex.assert_trees_all_close(updates, expected, rtol=1e-5, atol=1e-7)
  chex.assert_trees_all_equal(updates, jax.tree.map(jnp.zeros_like, updates))  # lr reached 0


def test_apply_if_finite_after_the_aggregator_skips_non_finite_steps():
  params, grads = _toy_problem()
  tx = optax.chain(
    gradops_jax.scale_by_gradops(NUM_TASKS), optax.apply_if_finite(optax.adam(1e-2), max_consecutive_errors=5)
  )
  state = tx.init(params)
  step = jax.jit(tx.update)
  _, state = step(grads, state, params)
  bad = jax.tree.map(lambda g: g.at[2].set(jnp.nan), grads)
  updates, bad_state = step(bad, state, params)
  chex.assert_trees_all_equal(updates, jax.tree.map(jnp.zeros_like, params))
  assert int(bad_state[1].notfinite_count) == 1 and int(bad_state[1].total_notfinite) == 1
  chex.assert_trees_all_equal(bad_state[1].inner_state, state[1].inner_state)
  updates, good_state = step(grads, bad_state, params)
  assert int(good_state[1].notfinite_count) == 0
  chex.assert_tree_all_finite(updates)


def test_inject_hyperparams_changes_alpha_without_recompiling():
  params, grads = _toy_problem()
  grads["w"] = grads["w"] * jnp.array([1.0, 1.0, 5.0])[:, None, None]  # unequal task norms
  tx = optax.inject_hyperparams(gradops_jax.scale_by_gradops, static_args=("num_tasks",))(
    num_tasks=NUM_TASKS, alpha=jnp.asarray(0.0)
  )
  step = jax.jit(tx.update)
  state = tx.init(params)
  for alpha in (0.0, 2.0, -2.0):
    state.hyperparams["alpha"] = jnp.asarray(alpha)
    updates, state = step(grads, state, params)
    chex.assert_trees_all_close(updates, _direction(grads, alpha=alpha), rtol=1e-5, atol=1e-7)
  assert step._cache_size() == 1  # one compilation for the three alphas
  assert not np.allclose(_direction(grads, alpha=2.0)["w"], _direction(grads, alpha=-2.0)["w"])


def test_task_multi_steps_aggregates_the_mean_of_the_micro_batches():
  params, _ = _toy_problem()
  micro = [_toy_problem(seed=seed)[1] for seed in range(1, 4)]
  inner = gradops_jax.gradops(0.1, NUM_TASKS)
  tx = gradops_jax.task_multi_steps(inner, 3, num_tasks=NUM_TASKS)
  state = tx.init(params)
  step = jax.jit(tx.update)
  for index, grads in enumerate(micro):
    updates, state = step(grads, state, params)
    if index < 2:
      chex.assert_trees_all_equal(updates, jax.tree.map(jnp.zeros_like, params))
  mean = jax.tree.map(lambda *g: sum(g) / 3, *micro)
  expected, _ = inner.update(mean, inner.init(params), params)
  chex.assert_trees_all_close(updates, expected, rtol=1e-5, atol=1e-7)
  assert int(state.gradient_step) == 1


def test_plain_multi_steps_cannot_hold_stacked_gradients():
  params, grads = _toy_problem()
  tx = optax.MultiSteps(gradops_jax.gradops(0.1, NUM_TASKS), 3)
  with pytest.raises((TypeError, ValueError)):
    tx.update(grads, tx.init(params), params)


def test_aggregator_vmapped_inside_a_scan():
  """scan(vmap(step)), the supported way to batch runs (the float64 scope is local)."""
  params, grads = _toy_problem()
  batch = jax.tree.map(lambda g: jnp.stack([g, g.at[0].multiply(3.0)]), grads)
  tx = gradops_jax.scale_by_gradops(NUM_TASKS, alpha=-1.0)
  states = jax.vmap(tx.init)(jax.tree.map(lambda p: jnp.stack([p, p]), params))

  def body(states, _):
    updates, states = jax.vmap(tx.update)(batch, states)
    return states, updates

  _, updates = jax.jit(lambda states: jax.lax.scan(body, states, length=2))(states)
  for index in range(2):
    single = jax.tree.map(lambda g, index=index: g[index], batch)
    expected, _ = tx.update(single, tx.init(params), params)
    for step in range(2):
      chex.assert_trees_all_close(
        jax.tree.map(lambda u, step=step, index=index: u[step, index], updates), expected, rtol=1e-5, atol=1e-7
      )


def _loop(form, update, state, batch, steps):
  """``steps`` updates over the leading axis of ``batch`` in a loop of ``form``; returns the last update."""
  take = lambda index: jax.tree.map(lambda g: g[index], batch)  # noqa: E731
  if form == "map":
    return jax.tree.map(lambda u: u[-1], jax.lax.map(lambda g: update(g, state)[0], batch))
  if form == "scan":
    return jax.tree.map(lambda u: u[-1], jax.lax.scan(lambda s, g: update(g, s)[::-1], state, batch)[1])

  def body(index, carry):
    updates, state = update(take(index), carry[1])
    return updates, state

  first = jax.tree.map(lambda g: jnp.zeros_like(g[0]), take(0)), state
  if form == "fori_loop":
    return jax.lax.fori_loop(0, steps, body, first)[0]
  return jax.lax.while_loop(lambda c: c[0] < steps, lambda c: (c[0] + 1, *body(c[0], c[1:])), (0, *first))[1]


VMAPPED_LOOPS = [(spec.name, "scan") for spec in SPECS] + [
  ("gradops", form) for form in ("while_loop", "fori_loop", "map")
]
VMAPPED_LOOPS += [("recon_scores+gradops", "scan"), ("aggregate_shared", "scan")]


@pytest.mark.parametrize("method, form", VMAPPED_LOOPS)
def test_vmap_around_a_loop_that_calls_an_aggregator(method, form):
  """vmap(scan(step)) and the other loops: each batched run equals the run alone."""
  steps, runs = 2, 3
  if method == "recon_scores+gradops":
    tx = optax.chain(gradops_jax.recon.layer_conflict_scores(NUM_TASKS), gradops_jax.scale_by_gradops(NUM_TASKS))
  elif method == "aggregate_shared":
    tx = gradops_jax.aggregate_shared(gradops_jax.scale_by_upgrad(NUM_TASKS), NUM_TASKS, {"w": True, "b": False})
  else:
    tx = BY_NAME[method].factory(NUM_TASKS)
  rng = np.random.default_rng(0)
  batch = {
    "w": jnp.asarray(rng.standard_normal((runs, steps, NUM_TASKS, 6, 4)), jnp.float32),
    "b": jnp.asarray(rng.standard_normal((runs, steps, NUM_TASKS, 4)), jnp.float32),
  }
  batch["w"] = batch["w"].at[:, :, 1].multiply(-0.5)  # conflicts
  state = tx.init({"w": jnp.zeros((6, 4)), "b": jnp.zeros(4)})

  def one_run(run):
    return _loop(form, tx.update, state, run, steps)

  # One program: the runs batched by vmap, and each alone (lax.map batches nothing).
  batched, alone = jax.jit(lambda batch: (jax.vmap(one_run)(batch), jax.lax.map(one_run, batch)))(batch)
  chex.assert_trees_all_close(batched, alone, rtol=1e-5, atol=1e-6)


# -- Linen and TrainState -------------------------------------------------------------


class LinenMultiHead(linen.Module):
  @linen.compact
  def __call__(self, x):
    hidden = linen.relu(linen.Dense(16)(x))
    return linen.Dense(NUM_TASKS)(hidden)


def test_linen_train_state_apply_gradients():
  x, y = _data()
  model = LinenMultiHead()
  params = model.init(jax.random.key(0), x)["params"]
  state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=gradops_jax.gradops(1e-2, NUM_TASKS))

  def task_losses(params, x, y):
    return jnp.mean((state.apply_fn({"params": params}, x) - y) ** 2, axis=0)

  @jax.jit
  def train_step(state, x, y):
    losses, task_grads = gradops_jax.value_and_task_grads(task_losses)(state.params, x, y)
    return state.apply_gradients(grads=task_grads), losses

  first = None
  for _ in range(50):
    state, losses = train_step(state, x, y)
    first = losses if first is None else first
  assert int(state.step) == 50
  assert np.all(np.asarray(losses) < np.asarray(first))
  assert state.opt_state[0].weights.shape == (NUM_TASKS,)


# -- Checkpointing with orbax ---------------------------------------------------------


@pytest.mark.parametrize("method", ["gradops", "pcgrad", "gradvac"])
def test_orbax_checkpoint_round_trip_resumes_bit_identically(tmp_path, method):
  """GradOPS's diagnostics, PCGrad's PRNG key and GradVac's EMA targets survive orbax."""
  ocp = pytest.importorskip("orbax.checkpoint")
  params, grads = _toy_problem()
  aggregator = {
    "gradops": lambda: gradops_jax.scale_by_gradops(NUM_TASKS),
    "pcgrad": lambda: gradops_jax.scale_by_pcgrad(NUM_TASKS, seed=3),
    "gradvac": lambda: gradops_jax.scale_by_gradvac(NUM_TASKS, seed=3),
  }[method]()
  tx = optax.chain(aggregator, optax.adam(1e-2))
  step = jax.jit(tx.update)
  state = tx.init(params)
  for _ in range(2):
    _, state = step(grads, state, params)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / "state", state)
  checkpointer.wait_until_finished()
  restored = checkpointer.restore(tmp_path / "state", jax.tree.map(jnp.zeros_like, state))
  chex.assert_trees_all_equal(restored, state)
  continued, _ = step(grads, state, params)
  resumed, _ = step(grads, restored, params)
  chex.assert_trees_all_equal(resumed, continued)
