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


def _solve_on_support(cosine, scales, support):
  """Solves the KKT system ``C_S a_S = mu s_S, s^T a = 1`` on ``support``.

  On the right support this recovers the constrained minimiser to rounding
  from an iterate that has identified the support, which the first-order
  iterations reach long before they reach the minimiser itself.

  Returns:
    The least-squares solution (0 off the support), and whether it solves
    the system (it does not when two tasks of the support are collinear with
    different lengths: the system is then singular and inconsistent).
  """
  num_tasks = cosine.shape[0]
  both = support[:, None] & support[None, :]
  system = jnp.zeros((num_tasks + 1, num_tasks + 1), cosine.dtype)
  system = system.at[:num_tasks, :num_tasks].set(
      jnp.where(both, cosine, jnp.diag((~support).astype(cosine.dtype)))
  )
  system = system.at[:num_tasks, num_tasks].set(jnp.where(support, scales, 0.0))
  system = system.at[num_tasks, :num_tasks].set(jnp.where(support, scales, 0.0))
  rhs = jnp.zeros((num_tasks + 1,), cosine.dtype).at[num_tasks].set(1.0)
  solution = jnp.linalg.pinv(system, hermitian=True) @ rhs
  residual = jnp.max(jnp.abs(system @ solution - rhs))
  consistent = residual <= 1e-9 * jnp.maximum(1.0, jnp.max(jnp.abs(solution)))
  return jnp.where(support, solution[:num_tasks], 0.0), consistent


def _polish(cosine, scales, a, tol):
  """The exact KKT solution on the support of the iterate ``a``, or on a smaller one.

  The iterate's support may still hold tasks whose optimal weight is 0: the
  first-order iterations approach 0 slowly on ill-conditioned hulls. The
  support shrinks until the solve on it is non-negative (to rounding: a
  weight that is exactly 0 at the solution, say a task between two opposite
  ones, comes out as +-rounding and is clipped) with a Frank-Wolfe gap at
  most the iterate's (or ``tol``):

  * when the solve is a solution with negative weights, as in the inner loop
    of Lawson and Hanson's NNLS: move from the current point towards it until
    the first weight reaches 0 (the objective does not rise on the way) and
    drop that task;
  * when the system is inconsistent (two tasks of the support collinear with
    different lengths), drop the least optimal tasks, those of largest
    :math:`(Ca)_i / s_i`.

  Returns ``a`` when no support qualifies.
  """
  bound = jnp.maximum(_scaled_simplex_gap(cosine, scales, a), tol)

  def cond_fn(carry):
    _, support, done, _ = carry
    return ~done & jnp.any(support)

  def body_fn(carry):
    point, support, _, best = carry
    solution, consistent = _solve_on_support(cosine, scales, support)
    clipped = jnp.maximum(solution, 0.0)
    found = (
        consistent
        & jnp.all(solution >= -1e-9 * jnp.max(jnp.abs(solution)))
        & (jnp.abs(scales @ clipped - 1.0) <= 1e-9)
        & (_scaled_simplex_gap(cosine, scales, clipped) <= bound)
    )
    blocking = support & (solution <= 0)
    ratios = jnp.where(blocking, point / jnp.where(blocking, point - solution, 1.0), jnp.inf)
    step = jnp.min(ratios)
    moved = jnp.where(ratios == step, 0.0, point + step * (solution - point))
    optimality = (cosine @ point) / scales
    kept = support & (optimality != jnp.max(jnp.where(support, optimality, -jnp.inf)))
    kept_point = jnp.where(kept, point, 0.0)
    kept_point = kept_point / jnp.where(jnp.any(kept), scales @ kept_point, 1.0)
    use_step = consistent & jnp.any(blocking)
    next_support = jnp.where(use_step, support & (ratios != step) & (moved > 0), kept)
    next_point = jnp.where(use_step, moved, kept_point)
    # A consistent, non-negative solve that is not optimal: the optimal
    # support is not inside this one; stop.
    done = found | (consistent & ~jnp.any(blocking))
    return next_point, next_support, done, jnp.where(found, clipped, best)

  return jax.lax.while_loop(cond_fn, body_fn, (a, a > 0, jnp.array(False), a))[3]


def min_norm_simplex_weights(
    gram: jax.Array, tol: float = 1e-12, max_iters: int = 2000
) -> jax.Array:
  r"""Weights of the min-norm point in the convex hull of the task gradients.

  Solves the quadratic programme of MGDA,

  .. math::

    \min_{w \ge 0,\ \sum_i w_i = 1} \Big\| \sum_i w_i g_i \Big\|^2
    = \min_{w \in \Delta_T} w^\top K w,

  with accelerated projected gradient (FISTA with adaptive restart) on the
  Gram matrix scaled to unit largest diagonal, followed by an exact solve of
  the KKT system on the identified support, kept when it is feasible and
  at least as good or within the tolerance. Iterations stop when the Frank-Wolfe gap
  :math:`w^\top K w - \min_i (K w)_i` is at most ``tol`` times the largest
  squared gradient norm, or after ``max_iters`` steps.

  Args:
    gram: ``(T, T)`` Gram matrix :math:`K = G G^\top`.
    tol: relative tolerance on the duality gap.
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
  """Exact solve of ``K_F v_F = -b_F`` on the free set ``F`` (0 elsewhere)."""
  system = jnp.where(
      free[:, None] & free[None, :], quadratic, jnp.diag((~free).astype(quadratic.dtype))
  )
  solution = jnp.linalg.pinv(system, hermitian=True) @ jnp.where(free, -linear, 0.0)
  return jnp.where(free, solution, 0.0)


def _polish_nonnegative(quadratic, linear, v):
  """The exact minimiser on the face of the iterate ``v``, or on a smaller face.

  The inner loop of Lawson and Hanson's NNLS: solve on the free set; while the
  solution has non-positive entries, move from ``v`` towards it until the
  first free entry reaches 0 (the objective does not rise on the way), fix that
  entry at 0 and solve again. The first-order iterate's free set may hold
  entries whose optimal value is 0, and with more tasks than dimensions the
  system is singular and its least-norm solution may be negative where a
  non-negative solution exists.
  """

  def cond_fn(carry):
    _, free, solution = carry
    return jnp.any(free & (solution <= 0))

  def body_fn(carry):
    v, free, solution = carry
    blocking = free & (solution <= 0)
    ratios = jnp.where(blocking, v / jnp.where(blocking, v - solution, 1.0), jnp.inf)
    step = jnp.min(ratios)
    v = jnp.where(ratios == step, 0.0, v + step * (solution - v))
    free = free & (ratios != step) & (v > 0)
    return v, free, _solve_on_free_set(quadratic, linear, free)

  free = v > 0
  return jax.lax.while_loop(cond_fn, body_fn, (v, free, _solve_on_free_set(quadratic, linear, free)))[2]


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
  an exact solve on the identified free set (shrunk, as in Lawson and Hanson's
  NNLS, while that solve is not positive), kept when it is at least as
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
  polished = _polish_nonnegative(quadratic, linear, v)
  polished_ok = jnp.all(polished >= 0) & (
      _nonnegative_residual(quadratic, linear, polished)
      <= jnp.maximum(_nonnegative_residual(quadratic, linear, v), tol)
  )
  return jnp.where(polished_ok, polished, v)


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
    accept = candidate_value <= point_value + point_gradient @ move + (move @ move) / (2 * step_size)
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
