"""Trace-time checks of the stacked per-task gradient pytree.

Every aggregation transform receives a pytree whose leaves carry a leading task
axis of size ``num_tasks``. Mistakes in that contract (a missing task axis, the
wrong number of tasks, integer leaves, a structure that differs from the
parameters) would otherwise broadcast silently into a wrong update, so they are
turned here into errors that name the offending leaf and its shape. All checks
read only static shapes, dtypes and tree structures: they run once, at trace
time, and cost nothing at run time.
"""

from typing import Any

import jax
import jax.numpy as jnp


def check_num_tasks(num_tasks: Any) -> int:
  """Returns ``num_tasks`` as an int, or raises if it is not a positive int."""
  if isinstance(num_tasks, bool) or not isinstance(num_tasks, int):
    raise TypeError(
        f"num_tasks must be a Python int, got {num_tasks!r} of type "
        f"{type(num_tasks).__name__}. If you use optax.inject_hyperparams, "
        "pass static_args=('num_tasks',)."
    )
  if num_tasks < 1:
    raise ValueError(f"num_tasks must be >= 1, got {num_tasks}.")
  return num_tasks


def check_finite_hyperparameter(name: str, value: Any) -> None:
  """Raises ``ValueError`` if a concrete hyperparameter is not finite.

  Traced values (for instance under ``optax.inject_hyperparams``) cannot be
  inspected at trace time and are accepted as they are.
  """
  if isinstance(value, jax.core.Tracer):
    return
  if not bool(jnp.all(jnp.isfinite(jnp.asarray(value)))):
    raise ValueError(f"{name} must be finite, got {value!r}.")


def check_hyperparameter_range(
    name: str, value: Any, low: float, high: float = float("inf"),
    high_inclusive: bool = True,
) -> None:
  """Raises ``ValueError`` unless a concrete scalar hyperparameter is in range.

  The range is ``[low, high]`` (or ``[low, high)``); NaN is never in range,
  and an infinite value is rejected even when ``high`` is infinite. Traced
  values (under ``optax.inject_hyperparams``) are accepted as they are.
  """
  if isinstance(value, jax.core.Tracer):
    return
  number = float(value)
  in_range = low <= number and (number <= high if high_inclusive else number < high)
  if not (in_range and number != float("inf")):
    closing = "]" if high_inclusive and high != float("inf") else ")"
    raise ValueError(f"{name} must be finite and in [{low}, {high}{closing}, got {value!r}.")


def check_max_iters(max_iters: Any) -> int:
  """Returns ``max_iters`` as an int, or raises if it is not a positive int."""
  if isinstance(max_iters, bool) or not isinstance(max_iters, int):
    raise TypeError(f"max_iters must be a Python int, got {max_iters!r}.")
  if max_iters < 1:
    raise ValueError(f"max_iters must be >= 1, got {max_iters}.")
  return max_iters


def _leaf_description(path, leaf) -> str:
  return (
      f"leaf {jax.tree_util.keystr(path) or '<root>'} with shape "
      f"{tuple(jnp.shape(leaf))} and dtype {jnp.result_type(leaf)}"
  )


def check_params(params: Any) -> None:
  """Raises ``TypeError`` if a parameter leaf is not a floating-point array."""
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
      raise TypeError(
          f"Parameters must be floating point, got {_leaf_description(path, leaf)}."
      )


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
    if params_def != grads_def:
      raise TypeError(
          "task_grads must have the structure of params; got task_grads "
          f"structure {grads_def} and params structure {params_def}."
      )
  for index, (path, leaf) in enumerate(grads_with_path):
    shape = tuple(jnp.shape(leaf))
    if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
      raise TypeError(
          f"Task gradients must be floating point, got {_leaf_description(path, leaf)}."
      )
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
