r"""Linear scalarisation: a fixed weighted sum of the task gradients."""

from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gradops_jax._src import base
from gradops_jax._src import passes
from gradops_jax._src import precision as precision_lib
from gradops_jax._src import validation


def scale_by_linear_scalarization(
  num_tasks: int, weights: Optional[Sequence[float]] = None, precision: str = "auto"
) -> optax.GradientTransformation:
  r"""Aggregates stacked per-task gradients with fixed weights.

  .. math::

    d = \sum_i w_i g_i, \qquad w = (1/T, \dots, 1/T) \text{ by default,}

  the gradient of :math:`\sum_i w_i L_i`: the baseline every deconfliction
  method is compared with ("uniform scaling" in the GradOPS paper's tables).
  It needs no Gram matrix and reads the gradients once.

  Args:
    num_tasks: T.
    weights: ``(T,)`` fixed task weights; the mean by default.
    precision: ``"auto"`` (float64 where the platform runs it natively,
      else float32), ``"float64"`` or ``"float32"``: the dtype the weights
      are split into the combine's factors in (see ``docs/precision.md``).

  Returns:
    An :class:`optax.GradientTransformation` with an :class:`optax.EmptyState`.

  Example:
    >>> import jax.numpy as jnp
    >>> from gradops_jax import scale_by_linear_scalarization
    >>> tx = scale_by_linear_scalarization(2)
    >>> g = {'w': jnp.array([[1.0, 0.0], [0.0, 1.0]])}
    >>> tx.update(g, tx.init({'w': jnp.zeros(2)}))[0]['w'].tolist()
    [0.5, 0.5]

  References:
    Xin et al., `Do Current Multi-Task Optimization Methods in Deep Learning
    Even Help? <https://arxiv.org/abs/2209.11379>`_, NeurIPS 2022.
  """
  num_tasks = validation.check_num_tasks(num_tasks)
  fixed: Any = np.full((num_tasks,), 1.0 / num_tasks) if weights is None else weights
  if not isinstance(fixed, jax.core.Tracer):
    fixed = np.asarray(fixed, np.float64)  # full precision for float64 gradients
  if fixed.shape != (num_tasks,):
    raise ValueError(f"weights must have shape ({num_tasks},), got {fixed.shape}.")
  validation.check_hyperparameter_range("weights", fixed)
  precision = precision_lib.check_precision(precision)

  def init_fn(params):
    validation.check_params(params)
    return optax.EmptyState()

  def update_fn(task_grads, state, params=None):
    validation.check_task_grads(task_grads, num_tasks, params)
    dtypes = passes.accumulation_dtypes(task_grads)

    def factors(float64):
      return passes.weight_factors(jnp.asarray(fixed, jnp.float64 if float64 else jnp.float32), dtypes)

    return passes.combine_factors(task_grads, precision_lib.run(precision, factors, (), fixed)), state

  return optax.GradientTransformation(init_fn, base.compiled_when_eager(update_fn, fixed))
