r"""Shared and task-specific parameters: deconflict only what the tasks share.

Most multi-task models have a shared trunk and one head (or tower) per task.
The gradient of task :math:`j`'s loss with respect to task :math:`i`'s head is
zero for :math:`j \ne i`, so there is nothing to deconflict there, and feeding
the heads to an aggregator costs a Gram pass and a combine over them for
nothing. :func:`aggregate_shared` runs the aggregator on the shared leaves
only and gives every task-specific leaf the sum of its task gradients, which
is its own task's gradient. It is built on :func:`optax.partition`.
"""

from typing import Any, Callable, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gradops_jax._src import passes
from gradops_jax._src import validation

SHARED = "shared"
TASK_SPECIFIC = "task_specific"


def _labels(shared_mask: Any, tree: Any) -> Any:
  """``"shared"``/``"task_specific"`` labels, checked against ``tree``'s structure."""
  mask_leaves, mask_def = jax.tree_util.tree_flatten(shared_mask)
  tree_paths, tree_def = jax.tree_util.tree_flatten_with_path(tree)
  if not mask_def == tree_def:  # type: ignore[operator]
    raise ValueError(
      "shared must have the structure of the parameters; got shared structure "
      f"{mask_def} and parameter structure {tree_def}."
    )
  for flag, (path, leaf) in zip(mask_leaves, tree_paths):
    if not isinstance(flag, (bool, np.bool_)) and not (
      isinstance(flag, jax.Array) and flag.shape == () and flag.dtype == jnp.bool_
    ):
      raise TypeError(
        f"shared must hold one bool per parameter leaf; got {flag!r} for leaf "
        f"{jax.tree_util.keystr(path)} with shape {tuple(jnp.shape(leaf))}."
      )
  return jax.tree.map(lambda flag: SHARED if bool(flag) else TASK_SPECIFIC, shared_mask)


def _sum_over_tasks(num_tasks: int) -> optax.GradientTransformation:
  """The task-specific part: each leaf's sum over its task axis (its own task's gradient)."""

  def update_fn(task_grads, state, params=None):
    validation.check_task_grads(task_grads, num_tasks, params)
    with jax.enable_x64(True):
      return passes.combine(task_grads, jnp.ones((num_tasks,), jnp.float64)), state

  def init_fn(params):
    validation.check_params(params)
    return optax.EmptyState()

  return optax.GradientTransformation(init_fn, update_fn)


def aggregate_shared(
  aggregator: optax.GradientTransformation,
  num_tasks: int,
  shared: Union[Any, Callable[[Any], Any]],
) -> optax.GradientTransformationExtraArgs:
  r"""Runs ``aggregator`` on the shared parameters; sums the tasks elsewhere.

  For stacked per-task gradients :math:`g_i = (g_i^{s}, g_i^{h})`, split into
  shared leaves :math:`s` and task-specific leaves :math:`h`,

  .. math::

    d^{s} = \operatorname{aggregator}(g_1^{s}, \dots, g_T^{s}), \qquad
    d^{h} = \sum_{i=1}^T g_i^{h}.

  A task-specific leaf receives a gradient from its own task only, so
  :math:`d^h` is exactly that task's gradient. Leaving the heads out also
  changes what the aggregator sees: their squared norms no longer enter the
  Gram diagonal, so norm-dependent methods (GradOPS's :math:`\alpha`-weights,
  MGDA, Nash-MTL) weigh the tasks by their trunk gradients alone, which is
  what the papers do (they deconflict the shared parameters).

  Args:
    aggregator: any transform of this package (or another one taking stacked
      per-task gradients), built with ``num_tasks``.
    num_tasks: T.
    shared: a pytree of Python or array-scalar bools with the structure of the
      parameters (``True`` for a shared leaf), or a function returning one.
      The function is called with the parameters at ``init`` and with the
      stacked task gradients at ``update`` (as in :func:`optax.partition`), so
      it must decide from the tree's paths, not from the leaves' shapes.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs` (an
    :func:`optax.partition` of the two parts) returning parameter-shaped
    updates. Chain it with an optimiser as you would the aggregator.

  Raises:
    ValueError: ``shared`` does not have the parameters' structure.
    TypeError: a leaf of ``shared`` is not a bool.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> import gradops_jax
    >>> params = {'trunk': jnp.zeros(3), 'heads': jnp.zeros((2, 4))}
    >>> tx = gradops_jax.aggregate_shared(
    ...     gradops_jax.scale_by_gradops(2), 2, {'trunk': True, 'heads': False})
    >>> state = tx.init(params)
    >>> task_grads = {'trunk': jnp.array([[1.0, 0, 0], [-1.0, 1.0, 0]]),
    ...               'heads': jnp.zeros((2, 2, 4))}
    >>> updates, state = tx.update(task_grads, state, params)
    >>> updates['heads'].shape
    (2, 4)

  References:
    Zhu et al., WSDM 2025, Section 3 (the task gradients are those of the
    shared parameters); :func:`optax.partition`.
  """
  num_tasks = validation.check_num_tasks(num_tasks)

  def labels(tree):
    mask = shared(tree) if callable(shared) else shared
    return _labels(mask, tree)

  return optax.partition(
    {
      SHARED: aggregator,
      TASK_SPECIFIC: _sum_over_tasks(num_tasks),
    },
    labels,
  )
