r"""PCGrad: gradient surgery, projecting conflicting pairs in a random order."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float
import optax

from gradops_jax._src import base
from gradops_jax._src.methods import _surgery


class PCGradState(NamedTuple):
  """State of :func:`scale_by_pcgrad`.

  Attributes:
    key: raw PRNG key data (uint32, see :func:`jax.random.key_data`) for
      the next step's task order; raw data so that checkpointing libraries
      can serialise the state.
    weights: ``(T,)`` float32 coefficients :math:`\\beta` of the last update.
  """

  key: jax.Array
  weights: jax.Array


def pcgrad_weights(gram: Float[Array, "T T"], order: jax.Array) -> Float[Array, " T"]:
  r"""PCGrad coefficients for a given order of the tasks.

  For every task :math:`i` (vmapped), starting from :math:`g^{PC}_i = g_i`,
  for every :math:`j \ne i` in ``order``: if :math:`g^{PC}_i \cdot g_j < 0`,
  :math:`g^{PC}_i \leftarrow g^{PC}_i - \frac{g^{PC}_i \cdot g_j}{\|g_j\|^2} g_j`.
  The update is :math:`\sum_i g^{PC}_i`. Each :math:`g^{PC}_i` is tracked as
  coefficients on the original gradients, so only the Gram matrix is needed.

  Args:
    gram: ``(T, T)`` Gram matrix.
    order: ``(T,)`` permutation of the tasks.

  Returns:
    ``(T,)`` weights :math:`\beta`.
  """
  num_tasks = gram.shape[0]

  def step(coefficients, task, other):
    del task
    dot = coefficients @ gram[:, other]
    norm_sq = gram[other, other]
    conflict = (dot < 0) & (norm_sq > 0)
    return coefficients.at[other].add(-jnp.where(conflict, dot / jnp.where(norm_sq > 0, norm_sq, 1.0), 0.0))

  def init_carry(task):
    return jax.nn.one_hot(task, num_tasks, dtype=gram.dtype)

  return jnp.sum(_surgery.sequential_surgery(gram, order, step, init_carry), axis=0)


def scale_by_pcgrad(num_tasks: int, seed: int = 0, precision: str = "auto") -> optax.GradientTransformation:
  r"""Aggregates stacked per-task gradients with PCGrad.

  .. math::

    d = \sum_i g^{PC}_i, \qquad g^{PC}_i = g_i \text{ with its conflicting
    components along the other } g_j \text{ removed, in a random order}

  (see :func:`pcgrad_weights`). The order is drawn afresh every step from a
  PRNG key kept in the state, so a checkpointed run resumes identically. With
  two tasks the order does not matter and PCGrad equals GradOPS with
  :math:`\alpha = 0`.

  Args:
    num_tasks: T.
    seed: seed of the PRNG key in the initial state.

    precision: ``"auto"`` (float64 where the platform runs it natively,
      else float32), ``"float64"`` or ``"float32"`` (no float64 in the
      compiled program); see ``docs/precision.md``.
  Returns:
    An :class:`optax.GradientTransformation` with a :class:`PCGradState`.

  Example:
    >>> import jax.numpy as jnp
    >>> from gradops_jax import scale_by_pcgrad
    >>> tx = scale_by_pcgrad(2)
    >>> g = {'w': jnp.array([[1.0, 0.0], [-1.0, 1.0]])}
    >>> tx.update(g, tx.init({'w': jnp.zeros(2)}))[0]['w'].tolist()
    [0.5, 1.5]

  References:
    Yu et al., `Gradient Surgery for Multi-Task Learning
    <https://arxiv.org/abs/2001.06782>`_, NeurIPS 2020, Algorithm 1.
  """

  def init_state():
    return PCGradState(
      key=_surgery.initial_key_data(seed),
      weights=jnp.zeros((num_tasks,), jnp.float32),
    )

  def solve(gram, state, input_dtype):
    del input_dtype
    key, order = _surgery.next_task_order(state.key, num_tasks)
    coefficients = pcgrad_weights(gram, order)
    return coefficients, PCGradState(key=key, weights=coefficients)

  return base.gram_aggregator(num_tasks, init_state, solve, precision=precision)
