"""Misuse is a clear error at trace time, naming the leaf and the shapes."""

import jax
import jax.numpy as jnp
import pytest

import gradops_jax
from tests import registry
from tests.registry import METHODS

PARAMS = {"dense": {"kernel": jnp.zeros((4, 3)), "bias": jnp.zeros(3)}}
NUM_TASKS = 2


def _update(method, task_grads):
  tx = METHODS[method][0](NUM_TASKS)
  return jax.jit(tx.update)(task_grads, tx.init(PARAMS), PARAMS)


def _grads(kernel_shape=(2, 4, 3), bias_shape=(2, 3), bias_dtype=jnp.float32):
  return {"dense": {"kernel": jnp.zeros(kernel_shape), "bias": jnp.zeros(bias_shape, bias_dtype)}}


# name -> (task gradients, error type, message pattern naming the leaf and shapes)
MISUSE = {
  "missing_task_axis": (_grads(bias_shape=(3,)), ValueError, r"size 2.*\['dense'\]\['bias'\] with shape \(3,\)"),
  "wrong_num_tasks": (_grads((3, 4, 3), (3, 3)), ValueError, r"size 2.*\['dense'\]\['bias'\] with shape \(3, 3\)"),
  "leaves_disagree_on_num_tasks": (_grads(bias_shape=(5, 3)), ValueError, r"\['dense'\]\['bias'\] with shape \(5, 3\)"),
  "integer_leaf": (
    _grads(bias_dtype=jnp.int32),
    TypeError,
    r"\['dense'\]\['bias'\] with shape \(2, 3\) and dtype int32",
  ),
  "boolean_leaf": (_grads(bias_dtype=bool), TypeError, r"\['dense'\]\['bias'\].*bool"),
  "structure_differs_from_params": ({"dense": {"kernel": jnp.zeros((2, 4, 3))}}, TypeError, r"structure.*kernel.*bias"),
  "shape_differs_from_param": (
    _grads((2, 3, 4)),
    ValueError,
    r"\['dense'\]\['kernel'\] with shape \(2, 3, 4\).*\(4, 3\)",
  ),
}


@pytest.mark.parametrize("misuse", sorted(MISUSE))
@pytest.mark.parametrize("method", sorted(METHODS))
def test_misuse_is_a_trace_time_error_naming_the_leaf(method, misuse):
  task_grads, error, pattern = MISUSE[misuse]
  with pytest.raises(error, match=pattern):
    _update(method, task_grads)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_scalar_leaf_has_no_axis(method):
  tx = METHODS[method][0](NUM_TASKS)
  with pytest.raises(ValueError, match=r"\['s'\].*no axis"):
    tx.update({"s": jnp.zeros(())}, tx.init({"s": jnp.zeros(())}))


@pytest.mark.parametrize("method", sorted(METHODS))
def test_integer_params_at_init(method):
  with pytest.raises(TypeError, match=r"\['n'\] with shape \(3,\) and dtype int32"):
    METHODS[method][0](NUM_TASKS).init({"n": jnp.zeros(3, jnp.int32)})


@pytest.mark.parametrize("num_tasks", [0, -1])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_num_tasks_must_be_positive(method, num_tasks):
  with pytest.raises(ValueError, match="num_tasks must be >= 1"):
    METHODS[method][0](num_tasks)


@pytest.mark.parametrize("num_tasks", [2.0, "2", None, True])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_num_tasks_must_be_int(method, num_tasks):
  with pytest.raises(TypeError, match="num_tasks must be a Python int"):
    METHODS[method][0](num_tasks)


# (public factory, keyword, bad value), from the registry.
BAD_HYPERPARAMETERS = [
  (spec.public, keyword, value)
  for spec in registry.SPECS
  for keyword, values in spec.bad_hyperparameters.items()
  for value in values
]


@pytest.mark.parametrize("factory, keyword, value", BAD_HYPERPARAMETERS, ids=lambda x: getattr(x, "__name__", str(x)))
def test_invalid_hyperparameter(factory, keyword, value):
  message = f"{keyword} must be finite" + ("" if keyword in ("alpha", "weights") else " and in")
  with pytest.raises(ValueError, match=message):
    factory(NUM_TASKS, **{keyword: value})


@pytest.mark.parametrize("method", registry.ITERATIVE)
@pytest.mark.parametrize("max_iters, error", registry.MAX_ITERS_BAD)
def test_invalid_max_iters(method, max_iters, error):
  with pytest.raises(error, match="max_iters"):
    registry.BY_NAME[method].public(NUM_TASKS, max_iters=max_iters)


def test_value_and_task_grads_needs_vector_of_losses():
  with pytest.raises(ValueError, match="1-D"):
    gradops_jax.value_and_task_grads(lambda w: jnp.sum(w))(jnp.ones(3))


@pytest.mark.parametrize(
  "alpha, error, message",
  [
    ("0.5", TypeError, "alpha must be a real number"),
    (True, TypeError, "alpha must be a real number"),
    ([0.5, 1.0], ValueError, r"shape \(3,\).*got shape \(2,\)"),
    (jnp.zeros((3, 1)), ValueError, r"got shape \(3, 1\)"),
  ],
)
def test_alpha_is_a_real_scalar_or_one_per_task(alpha, error, message):
  with pytest.raises(error, match=message):
    gradops_jax.scale_by_gradops(3, alpha=alpha)


def test_alpha_per_task_is_documented_and_works():
  assert (
    "one exponent" in gradops_jax.scale_by_gradops.__doc__ or "own exponent" in gradops_jax.scale_by_gradops.__doc__
  )
  tx = gradops_jax.scale_by_gradops(3, alpha=jnp.asarray([-1.0, 0.0, 2.0]))
  params = {"w": jnp.zeros(4)}
  grads = {"w": jnp.asarray([[1.0, 0.0, 0.0, 1.0], [-1.0, 1.0, 0.0, 0.0], [0.0, -1.0, 1.0, 0.0]])}
  updates, state = jax.jit(tx.update)(grads, tx.init(params), params)
  assert jnp.all(jnp.isfinite(updates["w"])) and state.alpha_weights.shape == (3,)


def test_value_and_task_grads_refuses_integer_arguments():
  with pytest.raises(TypeError, match=r"\['n'\] has dtype int32"):
    gradops_jax.value_and_task_grads(lambda p: jnp.stack([jnp.sum(p["n"]) * 1.0, 0.0]))({"n": jnp.zeros(3, jnp.int32)})
