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
  expected = {0.0: {"trunk/dense": 1, "out": 1}, -0.8: {"trunk/dense": 0, "out": 1},
              0.1: {"trunk/dense": 2, "out": 3}}
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
        "trunk": {"dense": {"kernel": jnp.asarray(0.5 * shared + rng.standard_normal((num_tasks, 3, 2)), jnp.float32),
                            "bias": jnp.asarray(rng.standard_normal((num_tasks, 2)), jnp.float32)}},
        "out": {"kernel": jnp.asarray(rng.standard_normal((num_tasks, 2)), jnp.float32)},
    }
    _, state = update(grads, state, params)
    steps.append({"trunk/dense": [grads["trunk"]["dense"]["bias"], grads["trunk"]["dense"]["kernel"]],
                  "out": [grads["out"]["kernel"]]})
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
  matrices: the compiled program reads no more bytes and runs no more loops."""
  num_tasks = 4
  params = {"a": {"kernel": jnp.zeros((512, 256)), "bias": jnp.zeros(256)}, "b": {"kernel": jnp.zeros((256, 64))}}
  grads = jax.tree.map(lambda leaf: jnp.ones((num_tasks, *leaf.shape)), params)
  aggregator = gradops_jax.scale_by_gradops(num_tasks)
  chained = optax.chain(recon.layer_conflict_scores(num_tasks), gradops_jax.scale_by_gradops(num_tasks))

  def compiled(tx):
    return jax.jit(tx.update).lower(grads, tx.init(params), params).compile()

  alone, together = compiled(aggregator), compiled(chained)
  assert together.as_text().count(" while(") == alone.as_text().count(" while(")
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
  with pytest.raises(TypeError, match="LayerConflictState"):
    recon.select_layers((state,), k=1)
