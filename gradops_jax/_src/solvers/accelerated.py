r"""The one accelerated projected-gradient loop (FISTA with adaptive restart).

Every first-order solve of the package (the min-norm point, the
non-negative QP, the minimisation over the simplex of CAGrad's and
ConicGrad's duals) runs this loop with its own trial step and stopping gap.
"""

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from gradops_jax._src import manual_axes


class SolverInfo(NamedTuple):
  """How an iterative solve ended.

  Attributes:
    converged: ``()`` bool, whether the stopping test was met (a
      ``max_iters`` cap that stopped the loop first leaves it ``False``).
    num_steps: ``()`` int32, the iterations taken.
  """

  converged: jax.Array
  num_steps: jax.Array


def merge_infos(info: SolverInfo) -> SolverInfo:
  """One :class:`SolverInfo` for a batch of solves: all converged, most steps."""
  return SolverInfo(jnp.all(info.converged), jnp.max(info.num_steps).astype(jnp.int32))


def no_iterations() -> SolverInfo:
  """The info of a closed-form solve."""
  return SolverInfo(jnp.array(True), jnp.array(0, jnp.int32))


class AcceleratedState(NamedTuple):
  """Carry of :func:`accelerated_descent`."""

  num_steps: jax.Array
  iterate: jax.Array
  evaluation: Any  # the trial's evaluation of the iterate; its first entry is the objective
  point: jax.Array
  momentum: jax.Array
  step_size: jax.Array


# trial(point, step_size) -> (candidate, evaluation, accepted, next_step_size)
TrialFn = Callable[[jax.Array, jax.Array], tuple[jax.Array, Any, jax.Array, jax.Array]]


def accelerated_descent(
  trial: TrialFn,
  evaluate: Callable[[jax.Array], Any],
  gap: Callable[[jax.Array, Any], jax.Array],
  start: jax.Array,
  tol: float,
  max_iters: int | jax.Array,
  step_size: float = 1.0,
) -> tuple[jax.Array, SolverInfo]:
  r"""Accelerated projected gradient with adaptive restart.

  From the extrapolated point :math:`y_k`, ``trial`` proposes the projected
  step :math:`x_{k+1}` and says whether it is accepted (a backtracking line
  search rejects it and shrinks the step size); accepted steps update the
  momentum :math:`t_{k+1} = (1 + \sqrt{1 + 4 t_k^2}) / 2` and the point
  :math:`y_{k+1} = x_{k+1} + \frac{t_k - 1}{t_{k+1}} (x_{k+1} - x_k)`, which
  restarts at :math:`x_{k+1}` with :math:`t = 1` when the objective rises
  (O'Donoghue and Candès, 2015). Stops when ``gap(iterate, evaluation)`` is at
  most ``tol`` or after ``max_iters`` trials.

  Args:
    trial: ``(point, step_size) -> (candidate, evaluation, accepted, next_step_size)``;
      ``evaluation[0]`` is the objective at ``candidate``.
    evaluate: the evaluation of ``start``.
    gap: an upper bound on the suboptimality, from an iterate and its evaluation.
    start: the initial iterate.
    tol: tolerance on ``gap``.
    max_iters: cap on trials.
    step_size: the initial step size passed to ``trial``.

  Returns:
    The last accepted iterate and a :class:`SolverInfo`.

  References:
    Beck and Teboulle, `A Fast Iterative Shrinkage-Thresholding Algorithm
    <https://doi.org/10.1137/080716542>`_, SIAM J. Imaging Sci. 2009.

    O'Donoghue and Candès, `Adaptive Restart for Accelerated Gradient Schemes
    <https://doi.org/10.1007/s10208-013-9150-3>`_, Found. Comput. Math. 2015.
  """
  dtype = start.dtype

  def cond_fn(state: AcceleratedState):
    return (state.num_steps < max_iters) & (gap(state.iterate, state.evaluation) > tol)

  def body_fn(state: AcceleratedState):
    candidate, evaluation, accepted, next_step_size = trial(state.point, state.step_size)
    next_momentum = 0.5 * (1.0 + jnp.sqrt(1.0 + 4.0 * state.momentum**2))
    extrapolated = candidate + ((state.momentum - 1.0) / next_momentum) * (candidate - state.iterate)
    restart = evaluation[0] > state.evaluation[0]
    moved = (
      candidate,
      evaluation,
      jnp.where(restart, candidate, extrapolated),
      jnp.where(restart, 1.0, next_momentum),
    )
    kept = (state.iterate, state.evaluation, state.point, state.momentum)
    iterate, evaluation, point, momentum = jax.tree.map(lambda new, old: jnp.where(accepted, new, old), moved, kept)
    return AcceleratedState(state.num_steps + 1, iterate, evaluation, point, momentum, next_step_size)

  init = AcceleratedState(
    num_steps=jnp.array(0, jnp.int32),
    iterate=start,
    evaluation=evaluate(start),
    point=start,
    momentum=jnp.array(1.0, dtype),
    step_size=jnp.array(step_size, dtype),
  )
  final = jax.lax.while_loop(cond_fn, body_fn, manual_axes.varying_like(init))
  converged = gap(final.iterate, final.evaluation) <= tol
  return final.iterate, SolverInfo(converged, final.num_steps)


def fixed_step_trial(objective, step) -> TrialFn:
  """A trial that always accepts ``step(point)`` (a fixed 1/L step size)."""

  def trial(point, step_size):
    candidate = step(point)
    return candidate, (objective(candidate),), jnp.array(True), step_size

  return trial
