r"""MGDA's quadratic programme: the min-norm point of the convex hull of the tasks."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from gradops_jax._src import linalg
from gradops_jax._src import manual_axes
from gradops_jax._src import tolerances
from gradops_jax._src.solvers import accelerated
from gradops_jax._src.solvers import active_set
from gradops_jax._src.solvers import simplex


def _scaled_simplex_gap(cosine, scales, a):
  """Frank-Wolfe gap of ``min a^T C a`` over ``{a >= 0, s^T a = 1}`` (halved)."""
  gradient = cosine @ a
  return a @ gradient - jnp.min(gradient / scales)


def _scaled_simplex_gap_rounding(cosine, scales, a):
  r"""Bound on the rounding error of :func:`_scaled_simplex_gap` at ``a``.

  Each :math:`(Ca)_i / s_i` is a sum of T terms of rounded cosines, so it is
  off by up to about :math:`(T + 2)\,\epsilon\,(|C| a)_i / s_i`; the mean
  :math:`a^\top C a` is bounded by the largest of those. With two huge,
  exactly opposite tasks at the optimum (their weights in these
  coordinates are :math:`10^{10}`), this is far above any fixed tolerance,
  and a gap below it is all that working precision can certify.
  """
  return tolerances.rounding_bound(cosine.shape[0], jnp.max((jnp.abs(cosine) @ a) / scales))


class _SupportSolution(NamedTuple):
  solution: jax.Array  # the minimiser on the support's affine set (0 off it)
  descent: jax.Array  # a descent direction along flat directions with slope
  bounded: jax.Array  # whether there is none (the minimum is attained)


def _solve_on_support(cosine, scales, support) -> _SupportSolution:
  r"""Minimises :math:`a^\top C a` over the affine set of the ``support`` S,
  :math:`\{a_i = 0 \text{ off } S,\ s^\top a = 1\}`, by the null-space method.

  With :math:`a = a_0 + y`, :math:`a_0 = s_S / \|s_S\|^2` and :math:`y` in
  :math:`F = \{y_i = 0 \text{ off } S,\ s^\top y = 0\}` (projector
  :math:`P`), the minimiser has :math:`P C P\, y = -P C a_0`. The reduced
  Hessian :math:`PCP` (plus :math:`I - P`, which keeps the directions outside
  :math:`F` apart) is decomposed into eigenvectors. Along a direction of
  curvature below the rounding of the cosines the objective is linear; where
  it also has a slope beyond rounding (two near-duplicate tasks, whose cosine
  rounds to 1, differ resolvably in their cosines with a third task), the
  minimum on the affine set is at infinity, and a descent direction is
  returned instead. On the right support this recovers the constrained
  minimiser to rounding from an iterate that has identified the support.
  """
  num_tasks = cosine.shape[0]
  on_support = jnp.where(support, scales, 0.0)
  norm_squared = on_support @ on_support
  particular = on_support / jnp.where(norm_squared > 0, norm_squared, 1.0)
  projector = jnp.diag(support.astype(cosine.dtype)) - jnp.outer(particular, on_support)
  reduced = projector @ cosine @ projector + (jnp.eye(num_tasks, dtype=cosine.dtype) - projector)
  curvatures, vectors = jnp.linalg.eigh((reduced + reduced.T) / 2)
  slopes = vectors.T @ (projector @ (cosine @ particular))
  flat = curvatures <= 2 * tolerances.rounding_bound(num_tasks, jnp.max(jnp.abs(cosine)))
  sloped = flat & (jnp.abs(slopes) > tolerances.rounding_bound(num_tasks, jnp.max(jnp.abs(cosine) @ particular)))
  steps = jnp.where(flat, 0.0, slopes / jnp.where(flat, 1.0, curvatures))
  return _SupportSolution(
    solution=jnp.where(support, particular - vectors @ steps, 0.0),
    descent=jnp.where(support, -(vectors @ jnp.where(sloped, slopes, 0.0)), 0.0),
    bounded=~jnp.any(sloped),
  )


class _PolishState(NamedTuple):
  num_steps: jax.Array
  point: jax.Array
  support: jax.Array
  done: jax.Array
  best: jax.Array
  found: jax.Array


def _polish(cosine, scales, a, tol, converged):
  """The exact KKT solution on the support of the optimum, found from the iterate ``a``.

  A primal active-set method (Lawson and Hanson's, on the scaled simplex)
  started from the first-order iterate's support, which is usually right or
  nearly so: solve the KKT system on the support, then

  * if the solution is non-negative (to rounding) and its Frank-Wolfe gap is
    at most the iterate's (or ``tol``, or the gap's own rounding error),
    return it;
  * if it is non-negative but not optimal, move to it and add the task that
    violates the optimality conditions most, the smallest
    :math:`(Ca)_i / s_i`;
  * if it has negative weights, move from the current point towards it until
    the first weight reaches 0 and drop that task;
  * if the objective falls without bound along a flat direction of the
    support's affine set (near-duplicate tasks), move along it until the
    first weight reaches 0 and drop that task.

  At most ``3 T`` solves, none when ``converged`` (the first-order iterate
  met ``tol``: each solve is an eigendecomposition). Returns
  ``(solution, found)``: ``a`` when none qualifies.
  """
  num_tasks = cosine.shape[0]
  bound = jnp.maximum(_scaled_simplex_gap(cosine, scales, a), tol)

  def cond_fn(state: _PolishState):
    return ~state.done & jnp.any(state.support) & (state.num_steps < 3 * num_tasks)

  def body_fn(state: _PolishState):
    solution, descent, bounded = _solve_on_support(cosine, scales, state.support)
    # Back onto s^T a = 1, which an ill-conditioned solve meets only to its
    # conditioning (weights ~1e10 for huge opposite tasks); the gap below
    # certifies the result.
    clipped = jnp.maximum(solution, 0.0)
    total = scales @ clipped
    clipped = clipped / jnp.where(total > 0, total, 1.0)
    nonnegative = bounded & jnp.all(solution >= -1e-9 * jnp.max(jnp.abs(solution))) & (jnp.abs(total - 1.0) <= 1e-6)
    rounding = _scaled_simplex_gap_rounding(cosine, scales, clipped)
    found = nonnegative & (_scaled_simplex_gap(cosine, scales, clipped) <= jnp.maximum(bound, rounding))
    # Non-negative, not optimal: add the most violating task.
    optimality = (cosine @ clipped) / scales
    outside = jnp.where(state.support, jnp.inf, optimality)
    entering = outside == jnp.min(outside)
    can_enter = jnp.min(outside) < clipped @ (cosine @ clipped) - rounding
    grown = (clipped > 0) | (entering & can_enter)
    # Negative weights: the inner loop's step towards the solution. Unbounded:
    # the same step along the descent direction, to a target far enough that
    # every weight it decreases is negative there.
    decreasing = state.support & (descent < 0)
    reach = 2 * jnp.max(jnp.where(decreasing, state.point / jnp.where(decreasing, -descent, 1.0), 0.0))
    target = jnp.where(bounded, solution, state.point + reach * descent)
    moved, shrunk = active_set.step_to_first_zero(state.point, target, state.support)
    return _PolishState(
      num_steps=state.num_steps + 1,
      point=jnp.where(nonnegative, clipped, moved),
      support=jnp.where(nonnegative, grown, shrunk),
      done=found | (nonnegative & ~can_enter),
      best=jnp.where(found, clipped, state.best),
      found=state.found | found,
    )

  init = _PolishState(jnp.array(0, jnp.int32), a, a > 0, converged, a, jnp.array(False))
  final = jax.lax.while_loop(cond_fn, body_fn, manual_axes.varying_like(init, cosine, scales))
  return final.best, final.found


def min_norm_simplex_weights(
  gram: Float[Array, "T T"], tol: float = 1e-12, max_iters: int = 2000
) -> tuple[Float[Array, " T"], accelerated.SolverInfo]:
  r"""Weights of the min-norm point in the convex hull of the task gradients.

  Solves the quadratic programme of MGDA,

  .. math::

    \min_{w \ge 0,\ \sum_i w_i = 1} \Big\| \sum_i w_i g_i \Big\|^2
    = \min_{w \in \Delta_T} w^\top K w,

  in task-normalised coordinates :math:`w_i = a_i\, n_{\min} / n_i`
  (:math:`n_i = \|g_i\|`), where it reads
  :math:`\min\, a^\top C a` over :math:`\{a \ge 0,\ s^\top a = 1\}` with
  the cosine matrix :math:`C` and :math:`s_i = n_{\min} / n_i`, so that tasks
  1e10 apart in scale stay resolved. Accelerated projected gradient
  identifies the support, until the Frank-Wolfe gap
  :math:`a^\top C a - \min_i (Ca)_i / s_i` is at most ``tol`` or after
  ``max_iters`` steps; then an active-set method started from that support
  solves the KKT system exactly on the optimal one, kept when its gap is at
  most the iterate's (or ``tol``, or its own rounding error).

  Args:
    gram: ``(T, T)`` Gram matrix :math:`K = G G^\top`.
    tol: tolerance on the Frank-Wolfe gap (in units of the smallest squared norm).
    max_iters: iteration cap.

  Returns:
    ``(T,)`` non-negative weights summing to one, and a
    :class:`~gradops_jax._src.solvers.accelerated.SolverInfo` (converged when
    the iterations met ``tol`` or the active-set finish certified its solution).
  """
  num_tasks = gram.shape[0]
  # With a zero task the answer is fixed (below) and the iterations unused.
  norms, _, cosine = linalg.cosine_from_gram(gram)
  zero = norms == 0
  safe_norms = jnp.where(zero, 1.0, norms)
  scales = jnp.min(safe_norms) / safe_norms
  lipschitz = linalg.largest_eigenvalue_bound(cosine)  # its 2-norm, without an SVD
  start = jnp.full((num_tasks,), 1.0, gram.dtype) / jnp.sum(scales)

  def objective(a):
    return a @ cosine @ a

  trial = accelerated.fixed_step_trial(
    objective,
    lambda point: simplex.project_onto_scaled_simplex(point - (cosine @ point) / lipschitz, scales),
  )

  def gap(a, _):
    value = _scaled_simplex_gap(cosine, scales, a)
    if jnp.finfo(gram.dtype).bits > 32:
      return value
    # float32 cannot reach tol near 1e-12: the iterations stop within the gap's own rounding, and
    # the exact finish below does the rest. (In float64 the iterations run on, which identifies
    # the support of the hardest inputs better than stopping at that bound.)
    return value - _scaled_simplex_gap_rounding(cosine, scales, a)

  a, info = accelerated.accelerated_descent(
    trial,
    lambda a: (objective(a),),
    gap,
    start,
    tol,
    max_iters,
  )
  # The iterations stop at the gap's rounding too; the exact finish runs unless tol itself was met.
  a, found = _polish(cosine, scales, a, tol, info.converged & (_scaled_simplex_gap(cosine, scales, a) <= tol))
  weights = scales * a
  weights = weights / jnp.sum(weights)
  zero_weights = zero.astype(gram.dtype) / jnp.maximum(jnp.sum(zero), 1).astype(gram.dtype)
  has_zero = jnp.any(zero)
  info = accelerated.SolverInfo(info.converged | found | has_zero, info.num_steps)
  return jnp.where(has_zero, zero_weights, weights), info
