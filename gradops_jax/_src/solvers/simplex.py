r"""Projections onto simplices, and convex minimisation over the probability simplex."""

from typing import Any, Callable

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from gradops_jax._src import tolerances
from gradops_jax._src.solvers import accelerated


def project_onto_simplex(v: Float[Array, " T"]) -> Float[Array, " T"]:
  r"""Euclidean projection of ``v`` onto the probability simplex.

  .. math::

    \arg\min_{w \ge 0,\ \sum_i w_i = 1} \|w - v\|_2

  computed exactly by the sort-and-threshold algorithm.

  Args:
    v: a ``(T,)`` vector.

  Returns:
    The projection, a ``(T,)`` vector of non-negative entries summing to one.

  Example:
    >>> import jax.numpy as jnp
    >>> from gradops_jax import project_onto_simplex
    >>> project_onto_simplex(jnp.array([0.5, 1.5, -1.0])).tolist()
    [0.0, 1.0, 0.0]

  References:
    Duchi et al., `Efficient Projections onto the l1-Ball for Learning in High
    Dimensions <https://doi.org/10.1145/1390156.1390191>`_, ICML 2008.
  """
  sorted_desc = jnp.sort(v)[::-1]
  cumulative = jnp.cumsum(sorted_desc) - 1.0
  ranks = jnp.arange(1, v.shape[0] + 1, dtype=v.dtype)
  support = sorted_desc - cumulative / ranks > 0
  rho = jnp.sum(support)
  threshold = cumulative[rho - 1] / rho.astype(v.dtype)
  return jnp.maximum(v - threshold, 0.0)


def project_onto_scaled_simplex(v: jax.Array, s: jax.Array) -> jax.Array:
  r"""Euclidean projection onto :math:`\{a \ge 0,\ s^\top a = 1\}`, :math:`s > 0`.

  The projection is :math:`\max(v - \tau s, 0)`; sorting the breakpoints
  :math:`v_i / s_i` finds :math:`\tau` exactly, as for the plain simplex.
  """
  order = jnp.argsort(-(v / s))
  v_sorted, s_sorted = v[order], s[order]
  thresholds = (jnp.cumsum(s_sorted * v_sorted) - 1.0) / jnp.cumsum(s_sorted**2)
  support = v_sorted - thresholds * s_sorted > 0
  rho = jnp.maximum(jnp.sum(support), 1)
  return jnp.maximum(v - thresholds[rho - 1] * s, 0.0)


def minimize_on_simplex(
  value_and_grad: Callable[[jax.Array], tuple[jax.Array, jax.Array]],
  num_tasks: int,
  dtype: Any,
  tol: float = 1e-10,
  max_iters: int = 5000,
) -> tuple[Float[Array, " T"], accelerated.SolverInfo]:
  r"""Minimiser of a convex function over the probability simplex.

  :func:`~gradops_jax._src.solvers.accelerated.accelerated_descent` with a
  backtracking step size that grows by 1.2 after accepted steps and halves
  after rejected ones. Stops when the Frank-Wolfe gap
  :math:`\nabla f(w)^\top w - \min_i \nabla f(w)_i` (an upper bound on
  :math:`f(w) - \min f`) is at most ``tol``, or after ``max_iters`` trial
  steps. Scale the problem so that ``tol`` is meaningful.

  Args:
    value_and_grad: ``w -> (f(w), grad f(w))``.
    num_tasks: the dimension T.
    dtype: floating dtype of ``w``.
    tol: absolute tolerance on the Frank-Wolfe gap.
    max_iters: cap on trial steps.

  Returns:
    ``(T,)`` weights on the simplex, and a
    :class:`~gradops_jax._src.solvers.accelerated.SolverInfo`.
  """
  eps = jnp.finfo(dtype).eps

  def trial(point, step_size):
    point_value, point_gradient = value_and_grad(point)
    candidate = project_onto_simplex(point - step_size * point_gradient)
    candidate_value, candidate_gradient = value_and_grad(candidate)
    move = candidate - point
    # The sufficient-decrease test, up to the rounding of the two values:
    # near the minimiser the decrease falls below it, and without the slack
    # every trial would be rejected and the step size halved to nothing.
    slack = 4 * eps * (jnp.abs(point_value) + jnp.abs(candidate_value))
    accept = candidate_value <= point_value + point_gradient @ move + (move @ move) / (2 * step_size) + slack
    next_step_size = jnp.where(accept, 1.2 * step_size, 0.5 * step_size)
    return candidate, (candidate_value, candidate_gradient), accept, next_step_size

  def gap(w, evaluation):
    _, gradient = evaluation
    # A gap within its own rounding is all the working precision certifies (float32 mode).
    return w @ gradient - jnp.min(gradient) - tolerances.rounding_bound(num_tasks, jnp.max(jnp.abs(gradient)))

  start = jnp.full((num_tasks,), 1.0 / num_tasks, dtype)
  return accelerated.accelerated_descent(trial, value_and_grad, gap, start, tol, max_iters)
