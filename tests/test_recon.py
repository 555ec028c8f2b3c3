"""Recon's layer conflict scores and layer selection (gradops_jax.recon)."""

import chex
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gradops_jax
from gradops_jax import recon


def _reference_counts(steps, threshold):
  """Literal reading of the S-conflict score: for every step, layer and pair
  i < j, concatenate the layer's leaves per task and compare the cosine."""
  counts = {}
  for layers in steps:  # layers: name -> list of (T, ...) arrays
    for name, leaves in layers.items():
      vectors = np.concatenate([np.asarray(leaf, np.float64).reshape(leaf.shape[0], -1) for leaf in leaves], axis=1)
      num_tasks = vectors.shape[0]
      conflicts = 0
      for i in range(num_tasks):
        for j in range(i + 1, num_tasks):
          ni, nj = np.linalg.norm(vectors[i]), np.linalg.norm(vectors[j])
          cosine = vectors[i] @ vectors[j] / (ni * nj) if ni > 0 and nj > 0 else 0.0
          conflicts += cosine < threshold
      counts[name] = counts.get(name, 0) + conflicts
  return counts


def _params():
  return {
    "trunk": {"dense": {"kernel": jnp.zeros((3, 2)), "bias": jnp.zeros(2)}},
    "out": {"kernel": jnp.zeros(2)},
  }


def test_default_layer_name_groups_kernel_and_bias():
  paths = [path for path, _ in jax.tree_util.tree_flatten_with_path(_params())[0]]
  assert sorted({recon.default_layer_name(path) for path in paths}) == ["out", "trunk/dense"]
  assert recon.default_layer_name((jax.tree_util.DictKey("w"),)) == "w"


def test_hand_built_counts():
  # Layer "trunk/dense": kernel and bias together. Task 0 = e1, task 1 = -e1 + e2
  # (cos -0.707), task 2 = e2 (cos 0 with task 0, 0.707 with task 1).
  kernel = np.zeros((3, 3, 2))
  kernel[0, 0, 0] = 1.0
  kernel[1, 0, 0], kernel[1, 0, 1] = -1.0, 1.0
  kernel[2, 0, 1] = 1.0
  # Layer "out": tasks 0 and 1 opposite, task 2 zero.
  out = np.array([[1.0, 0.0], [-2.0, 0.0], [0.0, 0.0]])
  grads = {
    "trunk": {"dense": {"kernel": jnp.asarray(kernel), "bias": jnp.zeros((3, 2))}},
    "out": {"kernel": jnp.asarray(out)},
  }
  params = jax.tree.map(lambda leaf: jnp.zeros(leaf.shape[1:]), grads)
  expected = {0.0: {"trunk/dense": 1, "out": 1}, -0.8: {"trunk/dense": 0, "out": 1}, 0.1: {"trunk/dense": 2, "out": 3}}
  for threshold, counts in expected.items():
    tx = recon.layer_conflict_scores(3, threshold)
    state = tx.init(params)
    for _ in range(2):
      updates, state = jax.jit(tx.update)(grads, state, params)
    assert {name: int(count) for name, count in state.counts.items()} == {
      name: 2 * count for name, count in counts.items()
    }, threshold
    assert int(state.num_steps) == 2
    chex.assert_trees_all_equal(updates, grads)


@pytest.mark.parametrize("num_tasks", [2, 3, 8])
@pytest.mark.parametrize("threshold", [0.0, -0.1, 0.3])
def test_matches_literal_reference(num_tasks, threshold):
  rng = np.random.default_rng(num_tasks)
  params = _params()
  tx = recon.layer_conflict_scores(num_tasks, threshold)
  update = jax.jit(tx.update)
  state = tx.init(params)
  steps = []
  for _ in range(5):
    shared = rng.standard_normal((1, 3, 2))
    grads = {
      "trunk": {
        "dense": {
          "kernel": jnp.asarray(0.5 * shared + rng.standard_normal((num_tasks, 3, 2)), jnp.float32),
          "bias": jnp.asarray(rng.standard_normal((num_tasks, 2)), jnp.float32),
        }
      },
      "out": {"kernel": jnp.asarray(rng.standard_normal((num_tasks, 2)), jnp.float32)},
    }
    _, state = update(grads, state, params)
    steps.append(
      {
        "trunk/dense": [grads["trunk"]["dense"]["bias"], grads["trunk"]["dense"]["kernel"]],
        "out": [grads["out"]["kernel"]],
      }
    )
  assert {name: int(count) for name, count in state.counts.items()} == _reference_counts(steps, threshold)


def test_zero_gradient_counts_as_orthogonal():
  grads = {"w": jnp.array([[1.0, 0.0], [0.0, 0.0]])}
  params = {"w": jnp.zeros(2)}
  for threshold, expected in [(0.0, 0), (0.5, 1)]:
    tx = recon.layer_conflict_scores(2, threshold)
    _, state = tx.update(grads, tx.init(params), params)
    assert int(state.counts["w"]) == expected


def test_nnx_paths_name_layers():
  class Model(nnx.Module):
    def __init__(self, rngs):
      self.trunk = nnx.List([nnx.Linear(3, 4, rngs=rngs), nnx.Linear(4, 4, rngs=rngs)])
      self.heads = nnx.List([nnx.Linear(4, 1, rngs=rngs) for _ in range(2)])

  params = nnx.state(Model(nnx.Rngs(0)), nnx.Param)
  tx = recon.layer_conflict_scores(2)
  assert sorted(tx.init(params).counts) == ["heads/0", "heads/1", "trunk/0", "trunk/1"]


def test_chained_scores_read_the_gradients_once():
  """Jitted in front of an aggregator, the scores reuse its per-leaf Gram
  matrices: the compiled program reads no more bytes and runs no more loops
  or Gram kernels (gradops_jax.kernels_available)."""
  num_tasks = 4
  params = {"a": {"kernel": jnp.zeros((512, 256)), "bias": jnp.zeros(256)}, "b": {"kernel": jnp.zeros((256, 64))}}
  grads = jax.tree.map(lambda leaf: jnp.ones((num_tasks, *leaf.shape)), params)
  aggregator = gradops_jax.scale_by_gradops(num_tasks)
  chained = optax.chain(recon.layer_conflict_scores(num_tasks), gradops_jax.scale_by_gradops(num_tasks))

  def compiled(tx):
    return jax.jit(tx.update).lower(grads, tx.init(params), params).compile()

  alone, together = compiled(aggregator), compiled(chained)
  for instruction in (" while(", " custom-call("):
    assert together.as_text().count(instruction) == alone.as_text().count(instruction)
  alone_bytes = alone.cost_analysis()["bytes accessed"]
  together_bytes = together.cost_analysis()["bytes accessed"]
  gradient_bytes = sum(leaf.nbytes for leaf in jax.tree.leaves(grads))
  # Reading the gradients once more would add gradient_bytes; the scores'
  # own T x T work is a few kilobytes.
  assert together_bytes - alone_bytes < 0.01 * gradient_bytes, (alone_bytes, together_bytes)


def test_invalid_threshold_and_inputs():
  with pytest.raises(ValueError, match="threshold"):
    recon.layer_conflict_scores(2, threshold=1.5)
  with pytest.raises(ValueError, match="threshold"):
    recon.layer_conflict_scores(2, threshold=float("nan"))
  with pytest.raises(ValueError, match="num_tasks"):
    recon.layer_conflict_scores(0)
  tx = recon.layer_conflict_scores(3)
  params = {"w": jnp.zeros(2)}
  with pytest.raises(ValueError, match=r"\['w'\].*\(2, 2\)"):
    tx.update({"w": jnp.zeros((2, 2))}, tx.init(params), params)
  with pytest.raises(ValueError, match="layers of the task gradients"):
    tx.update({"v": jnp.zeros((3, 2))}, tx.init(params))


def _state(**counts):
  return recon.LayerConflictState(
    counts={name: jnp.int32(count) for name, count in counts.items()}, num_steps=jnp.int32(1)
  )


def test_select_layers():
  state = _state(a=3, b=7, c=5, d=5, e=0)
  assert recon.select_layers(state, k=1) == [("b", 7)]
  assert recon.select_layers(state, k=3) == [("b", 7), ("c", 5), ("d", 5)]
  assert recon.select_layers(state, quantile=0.5) == [("b", 7), ("c", 5), ("d", 5)]
  assert recon.select_layers(state, quantile=0.0) == [("b", 7), ("c", 5), ("d", 5), ("a", 3)]
  assert recon.select_layers(state, quantile=1.0) == [("b", 7)]


def test_select_layers_errors():
  state = _state(a=3, b=7)
  with pytest.raises(ValueError, match=r"k must be in \[1, 2\].*got 3"):
    recon.select_layers(state, k=3)
  with pytest.raises(ValueError, match="k must be in"):
    recon.select_layers(state, k=0)
  with pytest.raises(TypeError, match="k must be an int"):
    recon.select_layers(state, k=1.0)
  with pytest.raises(ValueError, match="exactly one"):
    recon.select_layers(state)
  with pytest.raises(ValueError, match="exactly one"):
    recon.select_layers(state, k=1, quantile=0.5)
  with pytest.raises(ValueError, match="quantile"):
    recon.select_layers(state, quantile=1.5)
  with pytest.raises(TypeError, match="exactly one LayerConflictState, found 2"):
    recon.select_layers((state, state), k=1)
  assert recon.select_layers({"inner": (state,)}, k=1) == [("b", 7)]


class TrunkAndHeads(nnx.Module):
  """Shared MLP trunk (optionally a conv stem and dropout), one linear head per task."""

  def __init__(self, num_tasks, rngs, conv=False, dropout=0.0):
    self.stem = nnx.Conv(1, 2, kernel_size=(3,), rngs=rngs) if conv else None
    self.trunk = nnx.List([nnx.Linear(8 if conv else 3, 8, rngs=rngs), nnx.Linear(8, 8, rngs=rngs)])
    self.dropout = nnx.Dropout(dropout, rngs=rngs)
    self.heads = nnx.List([nnx.Linear(8, 1, rngs=rngs) for _ in range(num_tasks)])

  def __call__(self, x):
    if self.stem is not None:
      x = nnx.relu(self.stem(x[..., None])).reshape(x.shape[0], -1)
    for layer in self.trunk:
      x = self.dropout(nnx.relu(layer(x)))
    return [head(x)[:, 0] for head in self.heads]


def _num_params(model):
  return sum(leaf.size for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize("layers", [["trunk/0"], ["trunk/1"], ["trunk/0", "trunk/1"], ["stem", "trunk/1"]])
def test_branched_model_equals_shared_model_at_initialisation(layers):
  num_tasks = 3
  model = TrunkAndHeads(num_tasks, nnx.Rngs(0), conv=True)
  x = jax.random.normal(jax.random.key(1), (5, 4))
  expected = model(x)
  before = _num_params(model)
  branched, added = recon.branch_layers(model, layers, num_tasks)
  outputs = nnx.jit(lambda m, x: m(x))(branched, x)
  assert len(outputs) == num_tasks
  for output, reference in zip(outputs, expected):
    np.testing.assert_allclose(output, reference, rtol=1e-5, atol=1e-6)
  assert _num_params(branched) - before == added
  sizes = {"trunk/0": 8 * 8 + 8, "trunk/1": 8 * 8 + 8, "stem": 3 * 2 + 2}
  assert added == (num_tasks - 1) * sum(sizes[layer] for layer in layers)


def test_task_gradients_reach_only_their_own_branch():
  num_tasks = 3
  model = TrunkAndHeads(num_tasks, nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (6, 3))
  targets = jax.random.normal(jax.random.key(2), (num_tasks, 6))

  def task_losses(model, x):
    return jnp.stack([jnp.mean((out - target) ** 2) for out, target in zip(model(x), targets)])

  _, shared_grads = gradops_jax.nnx_value_and_task_grads(task_losses)(model, x)
  branched, _ = recon.branch_layers(model, ["trunk/1"], num_tasks)
  _, grads = nnx.jit(gradops_jax.nnx_value_and_task_grads(task_losses))(branched, x)
  kernel_copies = grads["branch_copies"][1][...]  # (T, T-1, 8, 8): kernel is the second leaf
  original = grads["model"]["trunk"][1]["kernel"][...]  # (T, 8, 8): task 0's copy
  shared_kernel = shared_grads["trunk"][1]["kernel"][...]
  for task in range(num_tasks):
    own = original[task] if task == 0 else kernel_copies[task, task - 1]
    # At initialisation, task t's gradient on its copy is its gradient on the shared layer.
    np.testing.assert_allclose(own, shared_kernel[task], rtol=1e-4, atol=1e-6)
    others = [original[task]] if task else []
    others += [kernel_copies[task, copy] for copy in range(num_tasks - 1) if copy != task - 1]
    for other in others:
      np.testing.assert_array_equal(other, 0.0)
  # The unbranched trunk layer stays shared: every task's gradient reaches it.
  assert all(np.any(grads["model"]["trunk"][0]["kernel"][...][task] != 0) for task in range(num_tasks))


def test_branched_training_step_with_gradops():
  num_tasks = 2
  model = TrunkAndHeads(num_tasks, nnx.Rngs(0), dropout=0.1)
  branched, _ = recon.branch_layers(model, ["trunk/0"], num_tasks)
  shared = recon.shared_mask(branched, task_specific=lambda path: "heads" in jax.tree_util.keystr(path))
  tx = optax.chain(
    gradops_jax.aggregate_shared(gradops_jax.scale_by_gradops(num_tasks), num_tasks, shared), optax.adam(1e-2)
  )
  optimizer = nnx.Optimizer(branched, tx, wrt=nnx.Param)
  x = jax.random.normal(jax.random.key(1), (32, 3))
  targets = jnp.stack([jnp.sin(x[:, 0]), jnp.cos(x[:, 1])])

  def task_losses(model, x):
    return jnp.stack([jnp.mean((out - target) ** 2) for out, target in zip(model(x), targets)])

  @nnx.jit
  def step(model, optimizer, x):
    losses, grads = gradops_jax.nnx_value_and_task_grads(task_losses)(model, x)
    optimizer.update(model, grads)
    return losses

  first = step(branched, optimizer, x)
  for _ in range(100):
    last = step(branched, optimizer, x)
  assert np.all(np.isfinite(last)) and np.all(last < first)


def test_dropout_state_advances_in_branched_model():
  model = TrunkAndHeads(2, nnx.Rngs(0), dropout=0.5)
  branched, _ = recon.branch_layers(model, ["trunk/1"], 2)
  x = jnp.ones((4, 3))
  first, second = branched(x), branched(x)
  assert not np.allclose(first[0], second[0])


def test_branching_errors():
  model = TrunkAndHeads(2, nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"Unknown layers \['trunk/7'\].*'trunk/0'"):
    recon.branch_layers(model, ["trunk/7"], 2)
  with pytest.raises(ValueError, match="empty"):
    recon.branch_layers(model, [], 2)
  with pytest.raises(TypeError, match="sequence of layer names"):
    recon.branch_layers(model, "trunk/0", 2)
  with pytest.raises(ValueError, match="num_tasks"):
    recon.branch_layers(model, ["trunk/0"], 0)
  branched, _ = recon.branch_layers(model, ["trunk/0"], 3)  # the model has 2 heads
  with pytest.raises(ValueError, match="3 task outputs"):
    branched(jnp.ones((2, 3)))


def test_branched_model_with_task_axis_last():
  class Logits(nnx.Module):
    def __init__(self, rngs):
      self.trunk = nnx.Linear(3, 4, rngs=rngs)
      self.heads = nnx.List([nnx.Linear(4, 1, rngs=rngs) for _ in range(3)])

    def __call__(self, x):
      hidden = nnx.relu(self.trunk(x))
      return jnp.concatenate([head(hidden) for head in self.heads], axis=-1)

  model = Logits(nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (5, 3))
  branched, _ = recon.branch_layers(model, ["trunk"], 3, output_axis=-1)
  np.testing.assert_allclose(branched(x), model(x), rtol=1e-6)
  with pytest.raises(ValueError, match="axis 0 of size 3"):
    recon.branch_layers(model, ["trunk"], 3, output_axis=0)[0](x)
  # Without output_axis, a batch of size T must not pass for the task axis.
  with pytest.raises(ValueError, match="pass output_axis"):
    recon.branch_layers(model, ["trunk"], 3)[0](x[:3])
  with pytest.raises(TypeError, match="BranchedModel"):
    recon.shared_mask(model)
