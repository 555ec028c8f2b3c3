r"""The non-negative quadratic programme :math:`\min_{v \ge 0} \frac12 v^\top K v + b^\top v`."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from gradops_jax._src import linalg
from gradops_jax._src import manual_axes
from gradops_jax._src import tolerances
from gradops_jax._src.solvers import accelerated
from gradops_jax._src.solvers import active_set


# Ridge of the Cholesky solves of the early finish, on a unit-diagonal K:
# far above the rounding that could make the factorisation fail.
_RIDGE = 1e-10


def _solve_on_free_set(quadratic, linear, free, exact=True):
  """Least-squares solve of ``K_F v_F = -b_F`` on the free set ``F`` (0 elsewhere).

  ``exact``: through the pseudo-inverse (duplicated tasks make ``K_F``
  singular), with one step of iterative refinement: an eigendecomposition is
  not backward stable along a small eigenvalue (near-duplicate tasks), and
  one refinement step brings the residual back to rounding. Otherwise through
  a Cholesky factorisation of ``K_F + 1e-10 I``, a tenth of the cost, with two
  refinement steps: directions of eigenvalue far below the ridge (duplicates)
  are damped rather than dropped, so the early finish that uses it only
  certifies a point when its KKT residual says so.
  """
  system = linalg.masked_block(quadratic, free)
  rhs = jnp.where(free, -linear, 0.0)
  if exact:
    inverse = jnp.linalg.pinv(system, hermitian=True)
    solution = inverse @ rhs
    solution = solution + inverse @ (rhs - system @ solution)
  else:
    factor = (jnp.linalg.cholesky(system + _RIDGE * jnp.eye(system.shape[0], dtype=system.dtype)), True)
    solution = jax.scipy.linalg.cho_solve(factor, rhs)
    for _ in range(2):
      solution = solution + jax.scipy.linalg.cho_solve(factor, rhs - system @ solution)
    solution = jnp.where(jnp.all(jnp.isfinite(solution)), solution, 0.0)
  return jnp.where(free, solution, 0.0)


def _projected_gradient_norm(v, gradient):
  """``max |v - max(v - gradient, 0)|``: zero exactly at the KKT points."""
  return jnp.max(jnp.abs(v - jnp.maximum(v - gradient, 0.0)))


def _kkt_residual(quadratic, linear, v):
  """The projected-gradient norm at ``v``."""
  return _projected_gradient_norm(v, quadratic @ v + linear)


class _PolishState(NamedTuple):
  num_steps: jax.Array
  point: jax.Array
  free: jax.Array
  blocked: jax.Array
  done: jax.Array
  best: jax.Array
  best_residual: jax.Array


def _polish(quadratic, linear, v, tol, converged, max_steps, exact=True):
  """The exact minimiser on the optimal face, found from the iterate ``v``.

  Lawson and Hanson's active-set method (NNLS, in the quadratic form) started
  from the first-order iterate's free set: solve on the free set; if the
  solution is positive there and no fixed entry has a negative gradient
  beyond rounding (or its KKT residual is within ``tol``), it is the
  minimiser; if it is positive but not optimal, move to it and free the entry
  of most negative gradient; if it has non-positive entries, move from the
  current point towards it until the first free entry reaches 0 and fix that
  entry at 0. An entry that is dropped again at once (near-duplicate tasks
  make its value a rounding error) may not enter again until another entry
  has entered and stayed: otherwise the method would cycle. At most
  ``max_steps`` solves; returns the positive solution of smallest KKT residual met on the
  way (or ``v``), and whether the method stopped at a certified minimiser.
  No step is taken when ``converged`` (the first-order phase met ``tol``):
  batched over the T QPs of UPGrad, each step is T solves of T x T systems.
  """
  num_tasks = linear.shape[0]

  def rounding(x):
    return tolerances.rounding_bound(num_tasks, jnp.max(jnp.abs(quadratic) @ x + jnp.abs(linear)))

  def cond_fn(state: _PolishState):
    return ~state.done & (state.num_steps < max_steps)

  def body_fn(state: _PolishState):
    free, point, blocked = state.free, state.point, state.blocked
    solution = _solve_on_free_set(quadratic, linear, free, exact)
    positive = jnp.all(jnp.where(free, solution > 0, True))
    clipped = jnp.maximum(solution, 0.0)
    error = rounding(clipped)
    residual = jnp.where(positive, _kkt_residual(quadratic, linear, clipped), jnp.inf)
    better = residual < state.best_residual
    # Positive, not optimal: free the unblocked entry of most negative gradient.
    outside = jnp.where(free | blocked, jnp.inf, quadratic @ clipped + linear)
    can_enter = jnp.min(outside) < -error
    grown = free | ((outside == jnp.min(outside)) & can_enter)
    # Non-positive entries: the inner loop's step towards the solution; an
    # entry dropped where it entered (at 0) is blocked.
    moved, shrunk = active_set.step_to_first_zero(point, solution, free)
    dropped_at_once = free & ~shrunk & (point == 0)
    return _PolishState(
      num_steps=state.num_steps + 1,
      point=jnp.where(positive, clipped, moved),
      free=jnp.where(positive, grown, shrunk),
      blocked=jnp.where(positive, blocked & ~jnp.any(free & ~blocked & (point == 0)), blocked | dropped_at_once),
      done=positive & (~can_enter | (residual <= jnp.maximum(tol, error))),
      best=jnp.where(better, clipped, state.best),
      best_residual=jnp.minimum(residual, state.best_residual),
    )

  # The entries a projected-gradient step keeps positive: near the optimum,
  # unlike v > 0, this leaves out the many entries a first-order iterate has
  # not yet brought down to exactly 0, which the method would otherwise drop
  # one solve at a time.
  gradient = quadratic @ v + linear
  free = v - gradient > 0
  init = _PolishState(
    jnp.array(0, jnp.int32),
    jnp.where(free, v, 0.0),
    free,
    jnp.zeros_like(v, dtype=bool),
    converged,
    v,
    _projected_gradient_norm(v, gradient),
  )
  final = jax.lax.while_loop(cond_fn, body_fn, manual_axes.varying_like(init, quadratic, linear))
  return final.best, final.done


def nonnegative_quadratic_minimizer(
  quadratic: Float[Array, "T T"], linear: Float[Array, " T"], tol: float = 1e-12, max_iters: int = 2000
) -> tuple[Float[Array, " T"], accelerated.SolverInfo]:
  r"""Minimiser of a convex quadratic over the non-negative orthant.

  .. math::

    \min_{v \ge 0}\ \tfrac12 v^\top K v + b^\top v

  by accelerated projected gradient, with step size :math:`1/\lambda_{\max}(K)`
  (one symmetric eigenvalue solve, shared when the QP is vmapped over
  :math:`b`; the trace of :math:`K`, a cheaper bound, is up to T times
  larger and slows the iteration down by up to :math:`\sqrt T`), then,
  where it has not met the tolerance, an exact solve on the optimal free set
  (Lawson and Hanson's active-set method, started from the identified one),
  kept when it is at least as optimal or within the tolerance: Cholesky
  steps, then pseudo-inverse steps, each round capped by its cost
  (``max_iters // (4 T)`` and ``3 max_iters // (4 T)`` steps, at least 2, at
  most 3 T). For small T (``max_iters >= 16 T``) a first, shorter round of
  both comes before: 4 T accelerated steps and at most ``max_iters // (16 T)``
  Cholesky active-set steps.
  Stops when the projected-gradient residual
  :math:`\|v - \max(v - (Kv + b), 0)\|_\infty` is at most ``tol`` times the
  largest diagonal entry of :math:`K`, or after ``max_iters`` steps.

  Args:
    quadratic: ``(T, T)`` positive semi-definite :math:`K`.
    linear: ``(T,)`` vector :math:`b`.
    tol: relative tolerance on the KKT residual.
    max_iters: iteration cap.

  Returns:
    ``(T,)`` non-negative minimiser :math:`v`, and a
    :class:`~gradops_jax._src.solvers.accelerated.SolverInfo`.
  """
  quadratic, scale = linalg.scale_to_unit_diagonal(quadratic)
  linear = linear / scale
  lipschitz = linalg.largest_eigenvalue_bound(quadratic)

  def evaluate(v):
    # The objective and its gradient from one product with K, which the
    # stopping test (the KKT residual) reuses.
    gradient = quadratic @ v + linear
    return 0.5 * v @ (gradient + linear), gradient

  def trial(point, step_size):
    candidate = jnp.maximum(point - (quadratic @ point + linear) / lipschitz, 0.0)
    return candidate, evaluate(candidate), jnp.array(True), step_size

  def descend(start, num_iters):
    return accelerated.accelerated_descent(
      trial,
      evaluate,
      lambda v, evaluation: _projected_gradient_norm(v, evaluation[1]),
      start,
      tol,
      num_iters,
    )

  # Degenerate QPs (T > D, ties) can take FISTA thousands of steps to the
  # tolerance that a few active-set steps reach from a rough iterate. But a
  # batched active-set step costs about 4 T first-order steps (T solves of
  # T x T systems against T matrix-vector products), and far from the optimal
  # face it may need up to 3 T of them. So an early finish, from the iterate
  # of 4 T first-order steps, gets the active-set steps worth a quarter of
  # the first-order budget (none from T = 2000 / 16 = 125 on); the
  # first-order steps go on where it did not certify a minimiser, and the
  # full active-set finish runs only where they too fell short.
  num_tasks = linear.shape[0]
  early_steps = max_iters // (16 * num_tasks)
  v, num_steps, done = jnp.zeros_like(linear), jnp.array(0, jnp.int32), jnp.array(False)
  remaining: int | jax.Array = max_iters
  if early_steps:
    first_iters = min(max_iters, 4 * num_tasks)
    v, first = descend(v, first_iters)
    v, done = _polish(quadratic, linear, v, tol, first.converged, early_steps, exact=False)
    num_steps, remaining = first.num_steps, jnp.where(done, 0, max_iters - first_iters)
  v, second = descend(v, remaining)
  # The final finish, where the first-order steps fell short: Cholesky solves
  # first (from a good iterate one or two steps certify most QPs), then
  # pseudo-inverses, each round capped by its cost in first-order steps (a
  # degenerate QP among many, such as one of an exactly opposite pair, would
  # otherwise hold all T QPs for up to 3 T steps: minutes at T = 256).
  cheap_steps = min(3 * num_tasks, max(2, max_iters // (4 * num_tasks)))
  exact_steps = min(3 * num_tasks, max(2, 3 * max_iters // (4 * num_tasks)))
  v, cheap = _polish(quadratic, linear, v, tol, second.converged | done, cheap_steps, exact=False)
  v, finished = _polish(quadratic, linear, v, tol, second.converged | done | cheap, exact_steps)
  return v, accelerated.SolverInfo(second.converged | done | cheap | finished, num_steps + second.num_steps)
