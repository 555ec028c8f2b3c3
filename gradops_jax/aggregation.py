r"""The one pipeline under every aggregator: reduce, solve in T x T, combine.

Every method of this package is a *solve* function from the :math:`T \times T`
Gram matrix of the task gradients (plus its state and hyperparameters) to
:math:`T` combination coefficients :math:`\beta`; :func:`gram_aggregator`
wraps it into an :class:`optax.GradientTransformation` that validates the
stacked per-task gradients at trace time, reduces them to the Gram matrix
(:func:`gradops_jax.gram.task_gram`, exact float64 accumulation), calls the
solve, and returns the parameter-shaped update
:math:`\sum_k \beta_k g_k` (:func:`gradops_jax.gram.combine`).
"""

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from gradops_jax import _validate
from gradops_jax import gram as gram_lib

# solve(gram, state, input_dtype) -> (coefficients, new_state)
SolveFn = Callable[[jax.Array, Any, Any], tuple[jax.Array, Any]]


def least_precise_dtype(tree: Any):
  """The floating dtype with the largest machine epsilon among the leaves."""
  dtypes = [jnp.result_type(leaf) for leaf in jax.tree.leaves(tree)]
  return max(dtypes, key=lambda dtype: jnp.finfo(dtype).eps, default=jnp.float32)


def _cast_like(new: jax.Array, old: jax.Array) -> jax.Array:
  """Casts a new state leaf to the dtype of the old one.

  Floating values saturate at the target dtype's largest finite value: the
  coefficients of tasks 1e40 apart in scale exceed float32's range although
  the update they give does not, and a diagnostic must not turn into Inf.
  """
  new = jnp.asarray(new)
  if jnp.issubdtype(old.dtype, jnp.floating) and jnp.issubdtype(new.dtype, jnp.floating):
    largest = float(jnp.finfo(old.dtype).max)
    new = jnp.clip(new, -largest, largest)
  return new.astype(old.dtype)


def gram_aggregator(
    num_tasks: int, init_state: Callable[[], NamedTuple], solve: SolveFn
) -> optax.GradientTransformation:
  """Builds an aggregation transform from a Gram-matrix solve.

  Args:
    num_tasks: T (validated, static).
    init_state: returns the method's initial state (a NamedTuple of arrays).
    solve: ``solve(gram, state, input_dtype) -> (coefficients, new_state)``,
      called inside ``jax.enable_x64(True)`` with the float64 Gram matrix;
      ``input_dtype`` is the least precise gradient dtype (for tolerances).
      The new state is cast back to the dtypes of the initial state.

  Returns:
    An :class:`optax.GradientTransformation` taking stacked per-task gradients.
  """
  num_tasks = _validate.check_num_tasks(num_tasks)

  def init_fn(params):
    _validate.check_params(params)
    return init_state()

  def update_fn(task_grads, state, params=None):
    _validate.check_task_grads(task_grads, num_tasks, params)
    input_dtype = least_precise_dtype(task_grads)
    with jax.enable_x64(True):
      gram = gram_lib.task_gram(task_grads, num_tasks)
      coefficients, new_state = solve(gram, state, input_dtype)
      updates = gram_lib.combine(task_grads, coefficients)
      new_state = jax.tree.map(_cast_like, new_state, state)
    return updates, new_state

  return optax.GradientTransformation(init_fn, update_fn)


class WeightsState(NamedTuple):
  """Diagnostics of a stateless aggregator: the last coefficients.

  Attributes:
    weights: ``(T,)`` float32 :math:`\\beta` of the last update
      :math:`\\sum_k \\beta_k g_k` (saturated at the float32 range).
  """

  weights: jax.Array


def weighting_aggregator(
    num_tasks: int, weights_fn: Callable[[jax.Array, Any], jax.Array]
) -> optax.GradientTransformation:
  """Builds a stateless aggregation transform from ``weights_fn(gram, input_dtype)``.

  Args:
    num_tasks: T.
    weights_fn: maps the float64 Gram matrix (and the least precise gradient
      dtype) to the ``(T,)`` coefficients of the update.

  Returns:
    An :class:`optax.GradientTransformation` with a :class:`WeightsState`.
  """

  def init_state():
    return WeightsState(weights=jnp.zeros((num_tasks,), jnp.float32))

  def solve(gram, state, input_dtype):
    del state
    coefficients = weights_fn(gram, input_dtype)
    return coefficients, WeightsState(weights=coefficients)

  return gram_aggregator(num_tasks, init_state, solve)
