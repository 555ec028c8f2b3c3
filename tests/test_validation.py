"""Misuse is a clear error at trace time, naming the leaf and the shapes."""

import jax
import jax.numpy as jnp
import pytest

import gradops_jax

PARAMS = {"dense": {"kernel": jnp.zeros((4, 3)), "bias": jnp.zeros(3)}}


def _update(task_grads, params=PARAMS, num_tasks=2):
  tx = gradops_jax.scale_by_gradops(num_tasks)
  return jax.jit(tx.update)(task_grads, tx.init(params), params)


def test_leaf_without_task_axis():
  grads = {"dense": {"kernel": jnp.zeros((2, 4, 3)), "bias": jnp.zeros(3)}}
  with pytest.raises(ValueError, match=r"\['dense'\]\['bias'\].*\(3,\)"):
    _update(grads)


def test_scalar_leaf_has_no_axis():
  tx = gradops_jax.scale_by_gradops(2)
  with pytest.raises(ValueError, match=r"\['s'\].*no axis"):
    tx.update({"s": jnp.zeros(())}, tx.init({"s": jnp.zeros(())}))


def test_wrong_number_of_tasks():
  grads = {"dense": {"kernel": jnp.zeros((3, 4, 3)), "bias": jnp.zeros((3, 3))}}
  with pytest.raises(ValueError, match=r"size 2.*\['dense'\]\['bias'\].*\(3, 3\)"):
    _update(grads)


def test_leaves_disagree_on_num_tasks():
  grads = {"dense": {"kernel": jnp.zeros((2, 4, 3)), "bias": jnp.zeros((5, 3))}}
  with pytest.raises(ValueError, match=r"\['dense'\]\['bias'\] with shape \(5, 3\)"):
    _update(grads)


def test_integer_leaf():
  grads = {"dense": {"kernel": jnp.zeros((2, 4, 3)), "bias": jnp.zeros((2, 3), jnp.int32)}}
  with pytest.raises(TypeError, match=r"\['dense'\]\['bias'\].*int32"):
    _update(grads)


def test_structure_differs_from_params():
  grads = {"dense": {"kernel": jnp.zeros((2, 4, 3))}}
  with pytest.raises(TypeError, match="structure"):
    _update(grads)


def test_shape_differs_from_param():
  grads = {"dense": {"kernel": jnp.zeros((2, 3, 4)), "bias": jnp.zeros((2, 3))}}
  with pytest.raises(ValueError, match=r"\['dense'\]\['kernel'\].*\(2, 4, 3\)"):
    _update(grads)


def test_integer_params():
  with pytest.raises(TypeError, match=r"\['n'\]"):
    gradops_jax.scale_by_gradops(2).init({"n": jnp.zeros(3, jnp.int32)})


@pytest.mark.parametrize("num_tasks", [0, -1])
def test_num_tasks_must_be_positive(num_tasks):
  with pytest.raises(ValueError, match="num_tasks"):
    gradops_jax.scale_by_gradops(num_tasks)


@pytest.mark.parametrize("num_tasks", [2.0, "2", None, True])
def test_num_tasks_must_be_int(num_tasks):
  with pytest.raises(TypeError, match="num_tasks"):
    gradops_jax.scale_by_gradops(num_tasks)


@pytest.mark.parametrize("alpha", [float("nan"), float("inf"), -float("inf")])
def test_alpha_must_be_finite(alpha):
  with pytest.raises(ValueError, match="alpha"):
    gradops_jax.scale_by_gradops(2, alpha=alpha)


@pytest.mark.parametrize("rank_rtol", [-1e-3, 1.0, 2.0])
def test_rank_rtol_range(rank_rtol):
  with pytest.raises(ValueError, match="rank_rtol"):
    gradops_jax.scale_by_gradops(2, rank_rtol=rank_rtol)


def test_value_and_task_grads_needs_vector_of_losses():
  with pytest.raises(ValueError, match="1-D"):
    gradops_jax.value_and_task_grads(lambda w: jnp.sum(w))(jnp.ones(3))
