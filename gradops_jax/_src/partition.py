r"""Shared and task-specific parameters: deconflict only what the tasks share.

Most multi-task models have a shared trunk and one head (or tower) per task.
The gradient of task :math:`j`'s loss with respect to task :math:`i`'s head is
zero for :math:`j \ne i`, so there is nothing to deconflict there, and feeding
the heads to an aggregator costs a Gram pass and a combine over them for
nothing. :func:`aggregate_shared` runs the aggregator on the shared leaves
only and gives every task-specific leaf the sum of its task gradients, which
is its own task's gradient. It is built on :func:`optax.partition`.
"""

import warnings
from typing import Any, Callable, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gradops_jax._src import validation
from gradops_jax._src.methods.linear_scalarization import scale_by_linear_scalarization

SHARED = "shared"
TASK_SPECIFIC = "task_specific"


def _is_flag(flag: Any) -> bool:
  return isinstance(flag, (bool, np.bool_)) or (
    isinstance(flag, jax.Array) and flag.shape == () and flag.dtype == jnp.bool_
  )


def _flags_by_path(mask: Any) -> dict:
  """``{plain key path: flag}`` of a mask pytree, through any NNX Variable wrappers."""
  return {validation.plain_path(path): flag for path, flag in jax.tree_util.tree_flatten_with_path(mask)[0]}


def _shared_flags(shared: Any, tree: Any) -> Any:
  """The tree with one bool per leaf, from a fixed mask, a mask function or a path predicate."""
  paths = [validation.plain_path(path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
  if callable(shared):
    try:
      mask = shared(tree)
    except Exception:  # not a function of the tree: a predicate on one key path
      mask = None
    if mask is None or (_is_flag(mask) and len(paths) != 1):
      flags = [shared(path) for path in paths]
      for path, flag in zip(paths, flags):
        if not _is_flag(flag):
          raise TypeError(f"shared(path) must return a bool; got {flag!r} for {jax.tree_util.keystr(path)}.")
      return jax.tree.unflatten(jax.tree.structure(tree), [bool(flag) for flag in flags])
  else:
    mask = shared
  by_path = _flags_by_path(mask)
  missing = [path for path in paths if path not in by_path]
  extra = sorted(set(by_path) - set(paths), key=jax.tree_util.keystr)
  if missing or extra:
    first = (
      f"the parameter {jax.tree_util.keystr(missing[0])} has no entry in shared"
      if missing
      else f"shared's entry {jax.tree_util.keystr(extra[0])} is not a parameter"
    )
    raise ValueError(
      f"shared must have the structure of the parameters: {first} "
      f"({len(missing)} parameters without an entry, {len(extra)} entries without a parameter)."
    )
  for path, leaf in zip(paths, jax.tree.leaves(tree)):
    if not _is_flag(by_path[path]):
      raise TypeError(
        f"shared must hold one bool per parameter leaf; got {by_path[path]!r} for leaf "
        f"{jax.tree_util.keystr(path)} with shape {tuple(jnp.shape(leaf))}."
      )
  return jax.tree.unflatten(jax.tree.structure(tree), [bool(by_path[path]) for path in paths])


def _labels(shared: Any, tree: Any) -> Any:
  """``"shared"``/``"task_specific"`` labels with the structure of ``tree``."""
  flags = _shared_flags(shared, tree)
  return jax.tree.map(lambda flag: SHARED if flag else TASK_SPECIFIC, flags)


def _warn_if_trivial(flags: Any) -> None:
  values = jax.tree.leaves(flags)
  if values and not any(values):
    warnings.warn(
      "aggregate_shared: no parameter is marked shared, so nothing is deconflicted (each leaf "
      "gets the plain sum over tasks); check the mask or predicate (a misspelt key?).",
      stacklevel=3,
    )
  elif values and all(values):
    warnings.warn(
      "aggregate_shared: every parameter is marked shared; the aggregator alone does the same.",
      stacklevel=3,
    )


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
    shared: which leaves are shared (``True``), in one of three forms:
      a pytree of bools with the parameters' structure (Flax NNX
      ``Variable`` wrappers, as in ``nnx.state(model, nnx.Param)``, are looked
      through, so one mask serves ``nnx.Optimizer``'s ``init`` and
      ``update``); a function of the tree returning such a pytree (as in
      :func:`optax.partition`; called with the parameters at ``init`` and the
      stacked gradients at ``update``); or a predicate on one leaf's key path,
      ``lambda path: ...`` (the path without NNX's ``.value``). ``init``
      warns when no leaf, or every leaf, is shared.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs` (an
    :func:`optax.partition` of the two parts) returning parameter-shaped
    updates. Chain it with an optimiser as you would the aggregator.

  Raises:
    ValueError: ``shared`` does not have the parameters' structure (the
      message names the first parameter path without an entry).
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
    return _labels(shared, tree)

  inner = optax.partition(
    {
      SHARED: aggregator,
      # The task-specific part: each leaf's sum over its task axis (its own task's gradient); weights
      # of one are exact in float32, so no float64 enters the program whatever the aggregator's mode.
      TASK_SPECIFIC: scale_by_linear_scalarization(num_tasks, [1.0] * num_tasks, precision="float32"),
    },
    labels,
  )

  def init_fn(params):
    _warn_if_trivial(_shared_flags(shared, params))
    return inner.init(params)

  return optax.GradientTransformationExtraArgs(init_fn, inner.update)
