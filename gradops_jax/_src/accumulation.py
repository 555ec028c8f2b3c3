r"""Gradient accumulation over micro-batches of stacked per-task gradients.

:class:`optax.MultiSteps` keeps a running mean of the gradients in a buffer
shaped like the parameters, so it cannot wrap an aggregator, whose input has
an extra leading task axis. :func:`task_multi_steps` is the same
:class:`optax.MultiSteps` with a task-stacked buffer: it averages the stacked
task gradients of k micro-batches, and every k-th step aggregates that mean
and applies the inner optimiser once.
"""

from typing import Any

import jax
import jax.numpy as jnp
import optax

from gradops_jax._src import validation


def task_multi_steps(
  opt: optax.GradientTransformation,
  every_k_schedule: Any,
  num_tasks: int,
  **multi_steps_kwargs: Any,
) -> optax.GradientTransformationExtraArgs:
  r""":class:`optax.MultiSteps` for an optimiser that takes stacked task gradients.

  With micro-batch task gradients :math:`G^{(1)}, \dots, G^{(k)}` (each
  ``(T, ...)`` per leaf), the k-th call returns
  ``opt.update`` of :math:`\bar G = \frac1k \sum_m G^{(m)}`, the other calls
  return zeros, exactly as :class:`optax.MultiSteps`: the aggregator sees the
  per-task gradients of the whole batch. (Aggregating each micro-batch and
  averaging the results would not be the same: the aggregators are not linear.)

  Args:
    opt: the inner transform, e.g. ``gradops_jax.gradops(1e-3, num_tasks)``,
      taking stacked per-task gradients.
    every_k_schedule: k, an int or a schedule of the gradient step, as in
      :class:`optax.MultiSteps`.
    num_tasks: T, the size of the task axis of the accumulator.
    **multi_steps_kwargs: forwarded to :class:`optax.MultiSteps`
      (``use_grad_mean``, ``should_skip_update_fn``).

  Returns:
    An :class:`optax.GradientTransformationExtraArgs` whose state is an
    :class:`optax.MultiStepsState` with ``acc_grads`` leaves of shape
    ``(T, *param.shape)``.

  Example:
    >>> import jax.numpy as jnp
    >>> import gradops_jax
    >>> tx = gradops_jax.task_multi_steps(gradops_jax.gradops(0.1, 2), 4, num_tasks=2)
    >>> state = tx.init({'w': jnp.zeros(3)})
    >>> state.acc_grads['w'].shape
    (2, 3)

  References:
    :class:`optax.MultiSteps`.
  """
  num_tasks = validation.check_num_tasks(num_tasks)
  multi_steps = optax.MultiSteps(opt, every_k_schedule, **multi_steps_kwargs)

  def init_fn(params):
    state = multi_steps.init(params)
    return state._replace(
      acc_grads=jax.tree.map(lambda acc: jnp.zeros((num_tasks, *acc.shape), acc.dtype), state.acc_grads)
    )

  return optax.GradientTransformationExtraArgs(init_fn, multi_steps.update)
