"""Trace-time checks of the stacked per-task gradient pytree.

Every aggregation transform receives a pytree whose leaves carry a leading task
axis of size ``num_tasks``. Mistakes in that contract (a missing task axis, the
wrong number of tasks, integer leaves, a structure that differs from the
parameters) would otherwise broadcast silently into a wrong update, so they are
turned here into errors that name the offending leaf and its shape. All checks
read only static shapes, dtypes and tree structures: they run once, at trace
time, and cost nothing at run time.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


def _check_positive_int(name: str, value: Any, hint: str = "") -> int:
  """Returns ``value`` as an int, or raises if it is not a positive Python int."""
  if isinstance(value, bool) or not isinstance(value, int):
    raise TypeError(f"{name} must be a Python int, got {value!r} of type {type(value).__name__}.{hint}")
  if value < 1:
    raise ValueError(f"{name} must be >= 1, got {value}.")
  return value


def check_num_tasks(num_tasks: Any) -> int:
  """Returns ``num_tasks`` as an int, or raises if it is not a positive int."""
  return _check_positive_int(
    "num_tasks",
    num_tasks,
    " If you use optax.inject_hyperparams, pass static_args=('num_tasks',).",
  )


def check_max_iters(max_iters: Any) -> int:
  """Returns ``max_iters`` as an int, or raises if it is not a positive int."""
  return _check_positive_int("max_iters", max_iters)


def check_hyperparameter_range(
  name: str,
  value: Any,
  low: float = -float("inf"),
  high: float = float("inf"),
  high_inclusive: bool = True,
) -> None:
  """Raises ``ValueError`` unless a concrete hyperparameter is finite and in range.

  Every entry of ``value`` (a scalar or an array) must be finite and in
  ``[low, high]`` (or ``[low, high)``); NaN is never in range. Traced values
  (under ``optax.inject_hyperparams``) cannot be inspected at trace time and
  are accepted as they are.
  """
  if isinstance(value, jax.core.Tracer):
    return
  values = np.asarray(value, dtype=np.float64)
  in_range = (low <= values) & ((values <= high) if high_inclusive else (values < high))
  if not bool(np.all(in_range & np.isfinite(values))):
    if low == -float("inf") and high == float("inf"):
      raise ValueError(f"{name} must be finite, got {value!r}.")
    closing = "]" if high_inclusive and high != float("inf") else ")"
    raise ValueError(f"{name} must be finite and in [{low}, {high}{closing}, got {value!r}.")


class Range(NamedTuple):
  """The valid values of a hyperparameter: finite, in ``[low, high]`` (or ``[low, high)``)."""

  low: float = -float("inf")
  high: float = float("inf")
  high_inclusive: bool = True
  integer: bool = False


REAL = Range()
NONNEGATIVE = Range(0.0)
UNIT_INTERVAL = Range(0.0, 1.0)
OPEN_UNIT_INTERVAL = Range(0.0, 1.0, high_inclusive=False)
POSITIVE_INT = Range(1, integer=True)


def solver_hyperparameters(tol: Any, max_iters: Any) -> dict:
  """The declarations of an iterative solve's ``tol`` and ``max_iters``."""
  return {"tol": (tol, NONNEGATIVE), "max_iters": (max_iters, POSITIVE_INT)}


def check_exponent(name: str, value: Any, num_tasks: int) -> None:
  """A real scalar, or one real value per task (shape ``(num_tasks,)``); never a bool or a string."""
  if isinstance(value, jax.core.Tracer):
    return
  array = np.asarray(value)
  if isinstance(value, (bool, np.bool_, str, bytes)) or not (
    np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)
  ):
    raise TypeError(f"{name} must be a real number (or one per task), got {value!r} of type {type(value).__name__}.")
  if array.shape not in ((), (num_tasks,)):
    raise ValueError(
      f"{name} must be a scalar or have shape ({num_tasks},) (one exponent per task), got shape {array.shape}."
    )


def check_hyperparameters(hyperparameters: dict) -> None:
  """Checks every ``name: (value, Range)`` entry; ``None`` values mean "default"."""
  for name, (value, valid) in hyperparameters.items():
    if value is None:
      continue
    if valid.integer:
      _check_positive_int(name, value)
    else:
      check_hyperparameter_range(name, value, valid.low, valid.high, valid.high_inclusive)


def plain_path(path: tuple) -> tuple:
  """A key path without the ``.value`` through which a Flax NNX Variable holds its array."""
  path = tuple(path)
  if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == "value":
    return path[:-1]
  return path


def _leaf_description(path, leaf) -> str:
  return (
    f"leaf {jax.tree_util.keystr(path) or '<root>'} with shape "
    f"{tuple(jnp.shape(leaf))} and dtype {jnp.result_type(leaf)}"
  )


def check_params(params: Any) -> None:
  """Raises ``TypeError`` if a parameter leaf is not a floating-point array."""
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
      raise TypeError(f"Parameters must be floating point, got {_leaf_description(path, leaf)}.")


def check_task_grads(task_grads: Any, num_tasks: int, params: Any = None) -> None:
  """Validates a stacked per-task gradient pytree.

  Args:
    task_grads: pytree whose every leaf has shape ``(num_tasks, *param.shape)``.
    num_tasks: the expected size of the leading task axis.
    params: optional parameter pytree; if given, ``task_grads`` must have its
      structure and each leaf the shape of the parameter behind a task axis.

  Raises:
    TypeError: a leaf is not floating point, or the structures differ.
    ValueError: a leaf has no task axis, a task axis of the wrong size, or a
      shape that does not match its parameter.
  """
  grads_with_path, grads_def = jax.tree_util.tree_flatten_with_path(task_grads)
  param_leaves = None
  if params is not None:
    param_leaves, params_def = jax.tree_util.tree_flatten(params)
    if not params_def == grads_def:  # type: ignore[operator]
      raise TypeError(
        "task_grads must have the structure of params; got task_grads "
        f"structure {grads_def} and params structure {params_def}."
      )
  for index, (path, leaf) in enumerate(grads_with_path):
    shape = tuple(jnp.shape(leaf))
    if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
      raise TypeError(f"Task gradients must be floating point, got {_leaf_description(path, leaf)}.")
    if not shape:
      raise ValueError(
        f"Task gradients need a leading task axis of size {num_tasks}; "
        f"{_leaf_description(path, leaf)} has no axis at all."
      )
    if shape[0] != num_tasks:
      raise ValueError(
        f"Task gradients need a leading task axis of size {num_tasks}; "
        f"{_leaf_description(path, leaf)} has {shape[0]} on axis 0. Stack "
        "the T task gradients of every leaf on axis 0 (see "
        "gradops_jax.value_and_task_grads)."
      )
    if param_leaves is not None:
      param_shape = tuple(jnp.shape(param_leaves[index]))
      if shape[1:] != param_shape:
        raise ValueError(
          f"Task gradient {_leaf_description(path, leaf)} does not match its "
          f"parameter of shape {param_shape}: expected shape "
          f"(num_tasks, *param.shape) = {(num_tasks, *param_shape)}."
        )
