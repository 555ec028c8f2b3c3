r"""Small solvers in T-dimensional space shared by the aggregation methods.

Everything here works on the :math:`T \times T` Gram matrix, never on the
gradients themselves, runs inside ``jit`` with static shapes, and iterates with
``jax.lax.while_loop`` up to a documented tolerance and iteration cap.
"""

import jax
import jax.numpy as jnp

from gradops_jax import gram as gram_lib


def project_onto_simplex(v: jax.Array) -> jax.Array:
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


def _project_onto_scaled_simplex(v: jax.Array, s: jax.Array) -> jax.Array:
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
  num_tasks = cosine.shape[0]
  eps = jnp.finfo(cosine.dtype).eps
  return 2 * (num_tasks + 2) * eps * jnp.max((jnp.abs(cosine) @ a) / scales)


def _solve_on_support(cosine, scales, support):
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
  returned instead. (Solving the singular system puts a huge component of
  arbitrary sign along it, and the active-set step towards that drops either
  task.) On the right support this recovers the constrained minimiser to
  rounding from an iterate that has identified the support, which the
  first-order iterations reach long before they reach the minimiser itself.

  Returns:
    ``(solution, descent, bounded)``: the minimiser on the affine set (0 off
    the support; along flat directions without slope, the one nearest
    :math:`a_0`), a descent direction along the flat directions with slope
    (0 off the support), and whether there is none (the minimum is attained).
  """
  num_tasks = cosine.shape[0]
  eps = jnp.finfo(cosine.dtype).eps
  on_support = jnp.where(support, scales, 0.0)
  norm_squared = on_support @ on_support
  particular = on_support / jnp.where(norm_squared > 0, norm_squared, 1.0)
  projector = jnp.diag(support.astype(cosine.dtype)) - jnp.outer(particular, on_support)
  reduced = projector @ cosine @ projector + (jnp.eye(num_tasks, dtype=cosine.dtype) - projector)
  curvatures, vectors = jnp.linalg.eigh((reduced + reduced.T) / 2)
  slopes = vectors.T @ (projector @ (cosine @ particular))
  flat = curvatures <= 4 * (num_tasks + 2) * eps * jnp.max(jnp.abs(cosine))
  sloped = flat & (jnp.abs(slopes) > 2 * (num_tasks + 2) * eps * jnp.max(jnp.abs(cosine) @ particular))
  steps = jnp.where(flat, 0.0, slopes / jnp.where(flat, 1.0, curvatures))
  solution = jnp.where(support, particular - vectors @ steps, 0.0)
  descent = jnp.where(support, -(vectors @ jnp.where(sloped, slopes, 0.0)), 0.0)
  return solution, descent, ~jnp.any(sloped)


def _step_to_first_zero(point, solution, active):
  """The inner step of Lawson and Hanson's active-set method.

  Moves from ``point`` towards ``solution`` until the first ``active`` entry
  whose solution value is not positive reaches 0, and drops it (ties
  together). Returns the new point and the new active set.
  """
  blocking = active & (solution <= 0)
  ratios = jnp.where(blocking, point / jnp.where(blocking, point - solution, 1.0), jnp.inf)
  step_size = jnp.min(ratios)
  moved = jnp.where(ratios == step_size, 0.0, point + step_size * (solution - point))
  return moved, active & (ratios != step_size) & (moved > 0)


def _polish(cosine, scales, a, tol):
  """The exact KKT solution on the support of the optimum, found from the iterate ``a``.

  A primal active-set method (Lawson and Hanson's, on the scaled simplex)
  started from the first-order iterate's support, which is usually right or
  nearly so: solve the KKT system on the support, then

  * if the solution is non-negative (to rounding: a weight that is exactly 0
    at the solution, say a task between two opposite ones, comes out as
    +-rounding and is clipped) and its Frank-Wolfe gap is at most the
    iterate's (or ``tol``, or the gap's own rounding error), return it;
  * if it is non-negative but not optimal, move to it and add the task that
    violates the optimality conditions most, the smallest
    :math:`(Ca)_i / s_i` (an exactly opposite pair of huge tasks that the
    iterations would need :math:`10^{10}` steps to reach enters this way);
  * if it has negative weights, move from the current point towards it until
    the first weight reaches 0 (the objective does not rise on the way) and
    drop that task;
  * if the objective falls without bound along a flat direction of the
    support's affine set (near-duplicate tasks; see
    :func:`_solve_on_support`), move along it until the first weight reaches
    0 and drop that task.

  At most ``3 T`` solves; returns ``a`` when none qualifies.
  """
  num_tasks = cosine.shape[0]
  bound = jnp.maximum(_scaled_simplex_gap(cosine, scales, a), tol)

  def cond_fn(carry):
    step, _, support, done, _ = carry
    return ~done & jnp.any(support) & (step < 3 * num_tasks)

  def body_fn(carry):
    step, point, support, _, best = carry
    solution, descent, bounded = _solve_on_support(cosine, scales, support)
    # Back onto s^T a = 1, which an ill-conditioned solve meets only to its
    # conditioning (weights ~1e10 for huge opposite tasks); the gap below
    # certifies the result.
    clipped = jnp.maximum(solution, 0.0)
    total = scales @ clipped
    clipped = clipped / jnp.where(total > 0, total, 1.0)
    nonnegative = (
        bounded
        & jnp.all(solution >= -1e-9 * jnp.max(jnp.abs(solution)))
        & (jnp.abs(total - 1.0) <= 1e-6)
    )
    rounding = _scaled_simplex_gap_rounding(cosine, scales, clipped)
    found = nonnegative & (_scaled_simplex_gap(cosine, scales, clipped) <= jnp.maximum(bound, rounding))
    # Non-negative, not optimal: add the most violating task.
    optimality = (cosine @ clipped) / scales
    outside = jnp.where(support, jnp.inf, optimality)
    entering = outside == jnp.min(outside)
    can_enter = jnp.min(outside) < clipped @ (cosine @ clipped) - rounding
    grown = (clipped > 0) | (entering & can_enter)
    # Negative weights: the inner loop's step towards the solution. Unbounded:
    # the same step along the descent direction, to a target far enough that
    # every weight it decreases is negative there.
    decreasing = support & (descent < 0)
    reach = 2 * jnp.max(jnp.where(decreasing, point / jnp.where(decreasing, -descent, 1.0), 0.0))
    target = jnp.where(bounded, solution, point + reach * descent)
    moved, shrunk = _step_to_first_zero(point, target, support)
    next_point = jnp.where(nonnegative, clipped, moved)
    next_support = jnp.where(nonnegative, grown, shrunk)
    done = found | (nonnegative & ~can_enter)
    return step + 1, next_point, next_support, done, jnp.where(found, clipped, best)

  init = (jnp.array(0), a, a > 0, jnp.array(False), a)
  return jax.lax.while_loop(cond_fn, body_fn, init)[4]


def min_norm_simplex_weights(
    gram: jax.Array, tol: float = 1e-12, max_iters: int = 2000
) -> jax.Array:
  r"""Weights of the min-norm point in the convex hull of the task gradients.

  Solves the quadratic programme of MGDA,

  .. math::

    \min_{w \ge 0,\ \sum_i w_i = 1} \Big\| \sum_i w_i g_i \Big\|^2
    = \min_{w \in \Delta_T} w^\top K w,

  in task-normalised coordinates :math:`w_i = a_i\, n_{\min} / n_i`
  (:math:`n_i = \|g_i\|`), where it reads
  :math:`\min\, a^\top C a` over :math:`\{a \ge 0,\ s^\top a = 1\}` with
  the cosine matrix :math:`C` and :math:`s_i = n_{\min} / n_i`, so that tasks
  1e10 apart in scale stay resolved. Accelerated projected gradient (FISTA
  with adaptive restart) identifies the support, until the Frank-Wolfe gap
  :math:`a^\top C a - \min_i (Ca)_i / s_i` is at most ``tol`` or after
  ``max_iters`` steps; then an active-set method started from that support
  solves the KKT system exactly on the optimal one, kept when its gap is at
  most the iterate's (or ``tol``, or its own rounding error).

  Args:
    gram: ``(T, T)`` Gram matrix :math:`K = G G^\top`.
    tol: tolerance on the Frank-Wolfe gap (in units of the smallest squared norm).
    max_iters: iteration cap.

  Returns:
    ``(T,)`` non-negative weights summing to one.

  Example:
    >>> import jax.numpy as jnp
    >>> from gradops_jax import min_norm_simplex_weights
    >>> g = jnp.array([[1.0, 0.0], [0.0, 2.0]])
    >>> [round(w, 6) for w in min_norm_simplex_weights(g @ g.T).tolist()]
    [0.8, 0.2]

  References:
    Sener and Koltun, `Multi-Task Learning as Multi-Objective Optimization
    <https://arxiv.org/abs/1810.04650>`_, NeurIPS 2018.

    Désidéri, `Multiple-gradient descent algorithm (MGDA) for multiobjective
    optimization <https://doi.org/10.1016/j.crma.2012.03.014>`_, 2012.
  """
  num_tasks = gram.shape[0]
  # With a zero task the answer is fixed (below) and the iterations unused.
  norms, _, cosine = gram_lib.cosine_from_gram(gram)
  zero = norms == 0
  safe_norms = jnp.where(zero, 1.0, norms)
  scales = jnp.min(safe_norms) / safe_norms
  lipschitz = jnp.maximum(jnp.linalg.norm(cosine, ord=2), jnp.finfo(gram.dtype).tiny)
  start = jnp.full((num_tasks,), 1.0, gram.dtype) / jnp.sum(scales)

  def objective(a):
    return a @ cosine @ a

  def cond_fn(carry):
    step, a, _, _ = carry
    return (step < max_iters) & (_scaled_simplex_gap(cosine, scales, a) > tol)

  def body_fn(carry):
    step, a, momentum_point, momentum = carry
    candidate = _project_onto_scaled_simplex(
        momentum_point - (cosine @ momentum_point) / lipschitz, scales
    )
    next_momentum = 0.5 * (1.0 + jnp.sqrt(1.0 + 4.0 * momentum**2))
    extrapolated = candidate + ((momentum - 1.0) / next_momentum) * (candidate - a)
    # Adaptive restart (O'Donoghue and Candès, 2015) when the objective rises.
    restart = objective(candidate) > objective(a)
    next_momentum = jnp.where(restart, 1.0, next_momentum)
    extrapolated = jnp.where(restart, candidate, extrapolated)
    return step + 1, candidate, extrapolated, next_momentum

  init = (jnp.array(0), start, start, jnp.array(1.0, gram.dtype))
  _, a, _, _ = jax.lax.while_loop(cond_fn, body_fn, init)

  a = _polish(cosine, scales, a, tol)
  weights = scales * a
  weights = weights / jnp.sum(weights)
  zero_weights = zero.astype(gram.dtype) / jnp.maximum(jnp.sum(zero), 1)
  return jnp.where(jnp.any(zero), zero_weights, weights)


def _solve_on_free_set(quadratic, linear, free):
  """Least-squares solve of ``K_F v_F = -b_F`` on the free set ``F`` (0 elsewhere).

  Through the pseudo-inverse (duplicated tasks make ``K_F`` singular), with
  one step of iterative refinement: an eigendecomposition is not backward
  stable along a small eigenvalue (near-duplicate tasks), and one refinement
  step brings the residual back to rounding.
  """
  system = jnp.where(
      free[:, None] & free[None, :], quadratic, jnp.diag((~free).astype(quadratic.dtype))
  )
  rhs = jnp.where(free, -linear, 0.0)
  inverse = jnp.linalg.pinv(system, hermitian=True)
  solution = inverse @ rhs
  solution = solution + inverse @ (rhs - system @ solution)
  return jnp.where(free, solution, 0.0)


def _polish_nonnegative(quadratic, linear, v, tol):
  """The exact minimiser on the optimal face, found from the iterate ``v``.

  Lawson and Hanson's active-set method (NNLS, in the quadratic form) started
  from the first-order iterate's free set: solve on the free set; if the
  solution is positive there and no fixed entry has a negative gradient
  beyond rounding (or its KKT residual is within ``tol``), it is the
  minimiser; if it is positive but not optimal, move to it and free the entry
  of most negative gradient; if it has non-positive entries, move from the
  current point towards it until the first free entry reaches 0 (the
  objective does not rise on the way) and fix that entry at 0. With more
  tasks than dimensions the systems are singular and the free set from the
  iterations is rarely the optimal one. An entry that is dropped again at
  once (in exact arithmetic an entering entry stays positive; near-duplicate
  tasks make its value a rounding error) may not enter again until another
  entry has entered and stayed: otherwise the method would cycle. At most
  ``3 T`` solves; returns the positive solution of smallest KKT residual met
  on the way, or ``v`` when none has a smaller one.
  """
  num_tasks = linear.shape[0]
  eps = jnp.finfo(quadratic.dtype).eps

  def rounding(x):
    return 2 * (num_tasks + 2) * eps * jnp.max(jnp.abs(quadratic) @ x + jnp.abs(linear))

  def cond_fn(carry):
    step, _, _, _, done, _, _ = carry
    return ~done & (step < 3 * num_tasks)

  def body_fn(carry):
    step, point, free, blocked, _, best, best_residual = carry
    solution = _solve_on_free_set(quadratic, linear, free)
    positive = jnp.all(jnp.where(free, solution > 0, True))
    clipped = jnp.maximum(solution, 0.0)
    error = rounding(clipped)
    residual = jnp.where(positive, _nonnegative_residual(quadratic, linear, clipped), jnp.inf)
    better = residual < best_residual
    # Positive, not optimal: free the unblocked entry of most negative gradient.
    outside = jnp.where(free | blocked, jnp.inf, quadratic @ clipped + linear)
    can_enter = jnp.min(outside) < -error
    grown = free | ((outside == jnp.min(outside)) & can_enter)
    # Non-positive entries: the inner loop's step towards the solution; an
    # entry dropped where it entered (at 0) is blocked.
    moved, shrunk = _step_to_first_zero(point, solution, free)
    dropped_at_once = free & ~shrunk & (point == 0)
    done = positive & (~can_enter | (residual <= jnp.maximum(tol, error)))
    return (
        step + 1,
        jnp.where(positive, clipped, moved),
        jnp.where(positive, grown, shrunk),
        jnp.where(positive, blocked & ~jnp.any(free & ~blocked & (point == 0)), blocked | dropped_at_once),
        done,
        jnp.where(better, clipped, best),
        jnp.minimum(residual, best_residual),
    )

  init = (jnp.array(0), v, v > 0, jnp.zeros_like(v, dtype=bool), jnp.array(False), v,
          _nonnegative_residual(quadratic, linear, v))
  return jax.lax.while_loop(cond_fn, body_fn, init)[5]


def _nonnegative_residual(quadratic, linear, v):
  """Projected-gradient norm: zero exactly at the KKT points."""
  gradient = quadratic @ v + linear
  return jnp.max(jnp.abs(v - jnp.maximum(v - gradient, 0.0)))


def nonnegative_quadratic_minimizer(
    quadratic: jax.Array, linear: jax.Array, tol: float = 1e-12, max_iters: int = 2000
) -> jax.Array:
  r"""Minimiser of a convex quadratic over the non-negative orthant.

  .. math::

    \min_{v \ge 0}\ \tfrac12 v^\top K v + b^\top v

  by accelerated projected gradient (FISTA with adaptive restart) followed by
  an exact solve on the optimal free set (Lawson and Hanson's active-set
  method, started from the identified one), kept when it is at least as
  optimal or within the tolerance. Stops when the projected-gradient residual
  :math:`\|v - \max(v - (Kv + b), 0)\|_\infty` is at most ``tol`` times the
  largest diagonal entry of :math:`K`, or after ``max_iters`` steps.

  Args:
    quadratic: ``(T, T)`` positive semi-definite :math:`K`.
    linear: ``(T,)`` vector :math:`b`.
    tol: relative tolerance on the KKT residual.
    max_iters: iteration cap.

  Returns:
    ``(T,)`` non-negative minimiser :math:`v`.
  """
  scale = jnp.max(jnp.diag(quadratic))
  scale = jnp.where(scale > 0, scale, 1.0)
  quadratic, linear = quadratic / scale, linear / scale
  lipschitz = jnp.maximum(jnp.trace(quadratic), jnp.finfo(quadratic.dtype).tiny)

  def objective(v):
    return 0.5 * v @ quadratic @ v + linear @ v

  def cond_fn(carry):
    step, v, _, _ = carry
    return (step < max_iters) & (_nonnegative_residual(quadratic, linear, v) > tol)

  def body_fn(carry):
    step, v, point, momentum = carry
    candidate = jnp.maximum(point - (quadratic @ point + linear) / lipschitz, 0.0)
    next_momentum = 0.5 * (1.0 + jnp.sqrt(1.0 + 4.0 * momentum**2))
    extrapolated = candidate + ((momentum - 1.0) / next_momentum) * (candidate - v)
    restart = objective(candidate) > objective(v)
    return (
        step + 1,
        candidate,
        jnp.where(restart, candidate, extrapolated),
        jnp.where(restart, 1.0, next_momentum),
    )

  zeros = jnp.zeros_like(linear)
  init = (jnp.array(0), zeros, zeros, jnp.array(1.0, quadratic.dtype))
  _, v, _, _ = jax.lax.while_loop(cond_fn, body_fn, init)
  return _polish_nonnegative(quadratic, linear, v, tol)


def minimize_on_simplex(
    value_and_grad, num_tasks: int, dtype, tol: float = 1e-10, max_iters: int = 5000
) -> jax.Array:
  r"""Minimiser of a convex function over the probability simplex.

  Accelerated projected gradient (FISTA) with a backtracking step size that
  grows after accepted steps, and adaptive restart of the momentum when the
  objective rises. Stops when the Frank-Wolfe gap
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
    ``(T,)`` weights on the simplex.

  References:
    Beck and Teboulle, `A Fast Iterative Shrinkage-Thresholding Algorithm
    <https://doi.org/10.1137/080716542>`_, SIAM J. Imaging Sci. 2009.

    O'Donoghue and Candès, `Adaptive Restart for Accelerated Gradient Schemes
    <https://doi.org/10.1007/s10208-013-9150-3>`_, Found. Comput. Math. 2015.
  """

  eps = jnp.finfo(dtype).eps

  def gap(w, gradient):
    return w @ gradient - jnp.min(gradient)

  def cond_fn(carry):
    step, (w, _, gradient), _, _, _ = carry
    return (step < max_iters) & (gap(w, gradient) > tol)

  def body_fn(carry):
    step, (w, value, gradient), point, momentum, step_size = carry
    point_value, point_gradient = value_and_grad(point)
    candidate = project_onto_simplex(point - step_size * point_gradient)
    candidate_value, candidate_gradient = value_and_grad(candidate)
    move = candidate - point
    # The sufficient-decrease test, up to the rounding of the two values:
    # near the minimiser the decrease falls below it, and without the slack
    # every trial would be rejected and the step size halved to nothing.
    slack = 4 * eps * (jnp.abs(point_value) + jnp.abs(candidate_value))
    accept = candidate_value <= point_value + point_gradient @ move + (move @ move) / (2 * step_size) + slack
    next_momentum = 0.5 * (1.0 + jnp.sqrt(1.0 + 4.0 * momentum**2))
    extrapolated = candidate + ((momentum - 1.0) / next_momentum) * (candidate - w)
    restart = candidate_value > value
    next_point = jnp.where(restart, candidate, extrapolated)
    next_momentum = jnp.where(restart, 1.0, next_momentum)
    accepted = jax.tree.map(
        lambda new, old: jnp.where(accept, new, old),
        ((candidate, candidate_value, candidate_gradient), next_point, next_momentum),
        ((w, value, gradient), point, momentum),
    )
    return (step + 1, *accepted, jnp.where(accept, 1.2 * step_size, 0.5 * step_size))

  w0 = jnp.full((num_tasks,), 1.0 / num_tasks, dtype)
  init = (jnp.array(0), (w0, *value_and_grad(w0)), w0, jnp.array(1.0, dtype), jnp.array(1.0, dtype))
  return jax.lax.while_loop(cond_fn, body_fn, init)[1][0]
