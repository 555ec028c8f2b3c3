r"""GradOPS: gradient deconfliction via orthogonal projections onto subspaces.

Algorithm 1 of Zhu et al. (WSDM 2025) in task space. With task gradients
:math:`g_1, \dots, g_T`: every task :math:`i` that conflicts with another
(:math:`g_i \cdot g_j < 0`) is replaced by its projection :math:`g'_i` onto the
orthogonal complement of :math:`S_i = \operatorname{span}\{g_j : j \ne i\}`
(Eqs. 1-2), other tasks keep :math:`g'_i = g_i`; then, with
:math:`G' = \sum_j g'_j`, :math:`R_i = G' \cdot g_i / \|g_i\|` (Eq. 3),
:math:`r_i = R_i / \operatorname{mean}(R)` (Eq. 4) and the α-weights
:math:`w_i = r_i^\alpha / \operatorname{mean}(r^\alpha)` (Eq. 5), the update is
:math:`\sum_i w_i g'_i = \sum_k \beta_k g_k`. If every :math:`g'_i` is zero,
the MGDA min-norm point is used instead.

The derivation of the task-space form and every corner case the paper leaves
open (rank-deficient spans, rounding-length residuals, zero tasks,
:math:`R_i = 0`, the fallback) are in ``docs/methods/gradops.md``.
"""

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float
import optax

from gradops_jax._src import base
from gradops_jax._src import linalg
from gradops_jax._src import manual_axes
from gradops_jax._src import tolerances
from gradops_jax._src import validation
from gradops_jax._src.solvers import min_norm
from gradops_jax._src.solvers import nonnegative
from gradops_jax._src.solvers import accelerated
from gradops_jax._src.solvers.accelerated import SolverInfo


class GradOPSSolution(NamedTuple):
  r"""GradOPS solved in task space (float64).

  Attributes:
    weights: ``(T,)`` :math:`\beta` with update :math:`= \sum_k \beta_k g_k`.
    projection: ``(T, T)`` matrix :math:`C` with :math:`g'_i = \sum_j C_{ij} g_j`.
    alpha_weights: ``(T,)`` the α-weights :math:`w` of Eq. 5 (the MGDA
      weights when the fallback fired).
    projected: ``(T,)`` bool, which tasks were projected (had a conflict).
    cosine: ``(T, T)`` cosine similarities of the task gradients (0 for zero
      gradients, 1 on the diagonal of non-zero ones).
    used_fallback: ``()`` bool, whether every :math:`g'_i` was zero and MGDA
      gave the update.
    fallback_info: how the MGDA fallback's solve ended (converged, no steps
      when it did not fire).
  """

  weights: jax.Array
  projection: jax.Array
  alpha_weights: jax.Array
  projected: jax.Array
  cosine: jax.Array
  used_fallback: jax.Array
  fallback_info: SolverInfo


class GradOPSState(NamedTuple):
  """Diagnostics of the last :func:`scale_by_gradops` step.

  Attributes:
    weights: ``(T,)`` float32 :math:`\\beta` of the last update
      :math:`\\sum_k \\beta_k g_k`.
    alpha_weights: ``(T,)`` float32 α-weights :math:`w` of Eq. 5 (MGDA
      weights when the fallback fired).
    projected: ``(T,)`` bool, which task gradients were projected.
    cosine: ``(T, T)`` float32 cosine matrix of the task gradients.
    used_fallback: ``()`` bool, whether the MGDA fallback gave the update.
    fallback_count: ``()`` int32, how many steps so far used the fallback.
    converged: ``()`` bool, whether the fallback's solve (when it fired) met
      its tolerance.
    num_steps: ``()`` int32, the iterations of that solve (0 when it did not fire).
  """

  weights: jax.Array
  alpha_weights: jax.Array
  projected: jax.Array
  cosine: jax.Array
  used_fallback: jax.Array
  fallback_count: jax.Array
  converged: jax.Array
  num_steps: jax.Array


def dependency_threshold(num_tasks: int, rank_rtol: float, dtype: Any) -> float:
  """Eigenvalue of the unit gradients' cosine matrix at or below which a direction is a dependency.

  ``rank_rtol`` squared (a singular value of the unit gradients at most
  ``rank_rtol``), or what the eigensolver resolves, whichever is larger.
  """
  return max(rank_rtol**2, tolerances.eigen_resolution(num_tasks, dtype))


def _project_all_tasks_rank_revealing(cosine: jax.Array, active: jax.Array, rank_rtol: float) -> jax.Array:
  r"""Residuals of every active unit task on the other active ones, from one eigendecomposition.

  With the active tasks' cosine matrix :math:`M = Q \Lambda Q^\top`, the
  eigenvalues at most ``threshold`` (below ``rank_rtol`` squared, or what
  the eigensolver resolves) are dependencies of the unit gradients, and
  :math:`z_i = \sum_{\lambda_k \le \text{threshold}} Q_{ik}^2` is how much
  task :math:`i` takes part in them. A task with :math:`z_i` above the
  threshold lies in the span of the others (its residual is rounding:
  zero). The residual of any other task is row :math:`i` of
  :math:`P = Q_r \Lambda_r^{-1} Q_r^\top` (the kept eigenpairs) over
  :math:`P_{ii}`: it has coefficient 1 on task :math:`i`, is orthogonal to
  every other task, and is the smallest such combination. This is the
  residual on the others' span with their own dropped directions
  (``docs/methods/gradops.md``) wherever that decision is not within
  rounding of the threshold, for T times less work than one
  eigendecomposition per task.
  """
  threshold = dependency_threshold(cosine.shape[0], rank_rtol, cosine.dtype)
  pseudo_inverse, participation = linalg.thresholded_pseudo_inverse(linalg.masked_block(cosine, active), threshold)
  diagonal = jnp.diagonal(pseudo_inverse)
  independent = active & (participation <= threshold) & (diagonal > 0)
  residuals = pseudo_inverse / jnp.where(independent, diagonal, 1.0)[:, None]
  return jnp.where(independent[:, None], residuals, 0.0)


# Smallest eigenvalue of the active tasks' cosine matrix above which all the
# projections come from one Cholesky factorisation (condition number at most
# T / 1e-3, so rounding stays far below every tolerance of the solve).
_WELL_CONDITIONED = 1e-3


def _project_all_tasks(cosine: jax.Array, active: jax.Array) -> jax.Array:
  r"""The residuals of all tasks from one inverse.

  With :math:`M` the active tasks' cosine matrix and :math:`P = M^{-1}`, the
  residual of :math:`u_i` on the other tasks is :math:`P_{i\cdot} / P_{ii}`
  (the Schur complement of :math:`M_{-i}`). When no eigenvalue of :math:`M`
  is below the thresholds of :func:`_project_all_tasks_rank_revealing`,
  none of any :math:`M_{-i}` is either (they interlace), and both give the
  residuals on the others' whole span.
  """
  matrix = linalg.masked_block(cosine, active)
  identity = jnp.eye(cosine.shape[0], dtype=cosine.dtype)
  inverse = jax.scipy.linalg.cho_solve((jnp.linalg.cholesky(matrix), True), identity)
  return inverse / jnp.diagonal(inverse)[:, None]


def _select_projections(
  residuals: jax.Array,
  cosine: jax.Array,
  active: jax.Array,
  conflicting: jax.Array,
  rank_rtol: float,
) -> jax.Array:
  r"""Rows :math:`u'_i` of the projection matrix in the unit-normalised basis.

  Conflicting tasks take their residual, unless it is not longer than
  ``rank_rtol`` times the sum of its coefficients' magnitudes (its size as a
  combination of unit gradients; at least 1, the task itself), which is
  rounding. Other active tasks keep their gradient; zero tasks give zero.
  """
  length_sq = jnp.einsum("ij,jk,ik->i", residuals, cosine, residuals)
  size = jnp.sum(jnp.abs(residuals), axis=1)
  resolved = length_sq > (rank_rtol * size) ** 2
  identity = jnp.eye(cosine.shape[0], dtype=cosine.dtype)
  projected = (active & conflicting & resolved)[:, None]
  keep_original = (active & ~conflicting)[:, None]
  return jnp.where(projected, residuals, jnp.where(keep_original, identity, 0.0))


def _alpha_weights(scores: jax.Array, alpha: Any, rank_rtol: float) -> Float[Array, " T"]:
  """Eqs. 4-5 in log space, with :math:`0^\\alpha` as ``docs/methods/gradops.md`` says."""
  num_tasks = scores.shape[0]
  alpha = jnp.asarray(alpha).astype(scores.dtype)  # a traced float32 alpha (under jax.jvp) included
  is_zero = scores <= rank_rtol * jnp.max(scores)
  log_scores = jnp.log(jnp.where(is_zero, 1.0, scores))
  zero_term = jnp.where(alpha == 0, 0.0, -jnp.inf)
  exponents = jnp.where(is_zero, zero_term, alpha * log_scores)
  all_excluded = jnp.all(jnp.isneginf(exponents))
  exponents = jnp.where(all_excluded, 0.0, exponents)
  return num_tasks * jax.nn.softmax(exponents)


def _onto_dual_cone(cosine: jax.Array, active: jax.Array, unit_weights: jax.Array, rank_rtol: float) -> jax.Array:
  r"""The update :math:`d = \sum_k a_k u_k` moved onto the dual cone of the tasks when it conflicts.

  A float32 Gram matrix cannot resolve a residual shorter than ``rank_rtol``
  (``docs/precision.md``), so in the float32 mode a task that is nearly
  dependent on the others counts as dependent, and the projections are
  orthogonal to the others' span without that direction: the update can
  then conflict with a task by up to about ``rank_rtol`` of its length.
  Where the Gram matrix shows such a conflict (beyond its rounding), the
  update is replaced by its projection onto
  :math:`\{x : u_j \cdot x \ge 0\ \forall j\}`,
  :math:`a + \arg\min_{v \ge 0} \tfrac12 v^\top C v + (C a)^\top v`, the
  nearest direction that conflicts with no task. Elsewhere it is unchanged.
  """
  num_tasks = cosine.shape[0]
  quadratic = linalg.masked_block(cosine, active)
  alignment = quadratic @ unit_weights
  rounding = tolerances.rounding_bound(num_tasks, jnp.abs(quadratic) @ jnp.abs(unit_weights))
  conflicts = jnp.any(alignment < -rounding)

  def project():
    shift, _ = nonnegative.nonnegative_quadratic_minimizer(quadratic, alignment)
    return unit_weights + shift

  return jax.lax.cond(conflicts, project, lambda: unit_weights)


def gradops_solve(
  gram: Float[Array, "T T"],
  alpha: Any = 0.0,
  rank_rtol: Optional[float] = None,
  mgda_tol: float = 1e-12,
  mgda_max_iters: int = 2000,
  input_dtype: Any = jnp.float32,
) -> GradOPSSolution:
  r"""Solves Algorithm 1 of GradOPS in task space from the Gram matrix.

  .. math::

    g'_i = \begin{cases}
      g_i - \operatorname{proj}_{S_i}(g_i) & \exists j \ne i: g_i \cdot g_j < 0
      \\ g_i & \text{otherwise}
    \end{cases}, \quad
    R_i = \frac{(\sum_j g'_j) \cdot g_i}{\|g_i\|}, \quad
    w_i = \frac{r_i^\alpha}{\frac1T \sum_j r_j^\alpha},

  and the update :math:`\sum_i w_i g'_i = \sum_k \beta_k g_k`. The corner
  cases are in ``docs/methods/gradops.md``.

  Args:
    gram: ``(T, T)`` Gram matrix of the task gradients (float64 recommended).
    alpha: the trade-off exponent :math:`\alpha` of Eq. 5.
    rank_rtol: singular-value threshold on unit-normalised gradients below
      which a direction counts as rounding; default
      :func:`~gradops_jax.default_rank_rtol` of ``input_dtype``.
    mgda_tol: duality-gap tolerance of the MGDA fallback.
    mgda_max_iters: iteration cap of the MGDA fallback.
    input_dtype: the dtype of the gradients the Gram matrix was formed from
      (float32 by default), which sets the default ``rank_rtol`` exactly as
      :func:`~gradops_jax.scale_by_gradops` does.

  Returns:
    A :class:`GradOPSSolution`.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from gradops_jax import gradops_solve
    >>> g = jnp.array([[1.0, 0.0], [-1.0, 1.0]])
    >>> sol = gradops_solve(g @ g.T)
    >>> sol.projected.tolist()
    [True, True]

  References:
    Zhu et al., WSDM 2025, Algorithm 1 and Eqs. 1-5.
  """
  num_tasks = gram.shape[0]
  if rank_rtol is None:
    rank_rtol = tolerances.default_rank_rtol(num_tasks, input_dtype, gram.dtype)
  norms, inverse_norms, cosine = linalg.cosine_from_gram(gram)
  active = norms > 0
  off_diagonal = ~jnp.eye(num_tasks, dtype=bool)
  conflicting = jnp.any((gram < 0) & off_diagonal, axis=1)

  # One Cholesky factorisation when the active tasks are far from linearly
  # dependent (M - threshold I is positive definite), else one eigendecomposition.
  threshold = max(_WELL_CONDITIONED, dependency_threshold(num_tasks, rank_rtol, cosine.dtype))
  shifted = linalg.masked_block(cosine, active) - threshold * jnp.eye(num_tasks, dtype=cosine.dtype)
  # Positive definite: the smallest eigenvalue, not a Cholesky factor that is NaN by design otherwise.
  well_conditioned = jnp.linalg.eigvalsh(shifted)[0] > 0
  residuals = jax.lax.cond(
    well_conditioned,
    lambda: _project_all_tasks(cosine, active),
    lambda: _project_all_tasks_rank_revealing(cosine, active, rank_rtol),
  )
  unit_projection = _select_projections(residuals, cosine, active, conflicting, rank_rtol)
  # g'_i = n_i u'_i = sum_j (n_i P_ij / n_j) g_j.
  projection = norms[:, None] * unit_projection * inverse_norms[None, :]
  used_fallback = jnp.all(unit_projection == 0)

  scores = (norms @ unit_projection) @ cosine  # R_i = G' . u_i (Eq. 3)
  # A score is a T-term sum of cosines, resolved to the inputs' rounding even where a float32
  # Gram matrix resolves residuals only to rank_rtol: zero means zero to that rounding.
  score_rtol = min(rank_rtol, tolerances.default_rank_rtol(num_tasks, input_dtype))
  alpha_weights = _alpha_weights(scores, alpha, score_rtol)
  unit_weights = (alpha_weights * norms) @ unit_projection
  if jnp.finfo(gram.dtype).bits <= 32:
    unit_weights = _onto_dual_cone(cosine, active, unit_weights, rank_rtol)
  weights = unit_weights * inverse_norms

  mgda_weights, fallback_info = jax.lax.cond(
    used_fallback,
    lambda: min_norm.min_norm_simplex_weights(gram, mgda_tol, mgda_max_iters),
    lambda: manual_axes.varying_like((jnp.zeros((num_tasks,), gram.dtype), accelerated.no_iterations()), gram),
  )
  return GradOPSSolution(
    weights=jnp.where(used_fallback, mgda_weights, weights),
    projection=projection,
    alpha_weights=jnp.where(used_fallback, mgda_weights, alpha_weights),
    projected=active & conflicting,
    cosine=cosine,
    used_fallback=used_fallback,
    fallback_info=fallback_info,
  )


def scale_by_gradops(
  num_tasks: int,
  alpha: Any = 0.0,
  rank_rtol: Optional[float] = None,
  precision: str = "auto",
) -> optax.GradientTransformation:
  r"""Aggregates stacked per-task gradients with GradOPS.

  Takes a pytree whose every leaf is ``(num_tasks, *param.shape)`` (task
  :math:`i`'s gradient of its own loss on axis 0) and returns the parameter-
  shaped GradOPS direction

  .. math::

    d = \sum_{i=1}^T w_i\, g'_i,

  a gradient-like direction for the optimiser that follows (chain it with
  :func:`optax.adam`, or use :func:`gradops`). The gradients are read twice
  (Gram matrix, then the combination) and everything else is solved in
  :math:`T \times T` space (:func:`gradops_solve`).

  Args:
    num_tasks: the number of tasks :math:`T` (static).
    alpha: trade-off exponent :math:`\alpha` of Eq. 5; 0 weights all tasks
      equally (with T = 2 this is PCGrad), > 0 favours dominating tasks,
      < 0 dominated ones. A ``(T,)`` array gives each task its own exponent,
      :math:`w_i \propto r_i^{\alpha_i}`. May be changed during training with
      ``optax.inject_hyperparams(scale_by_gradops, static_args=('num_tasks',))``.
    rank_rtol: rank tolerance on unit-normalised gradients; default
      :func:`~gradops_jax.default_rank_rtol` of the least precise gradient dtype.

    precision: ``"auto"`` (float64 where the platform runs it natively,
      else float32), ``"float64"`` or ``"float32"`` (no float64 in the
      compiled program); see ``docs/precision.md``.
  Returns:
    An :class:`optax.GradientTransformation` whose state is a
    :class:`GradOPSState`.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> from gradops_jax import scale_by_gradops
    >>> params = {'w': jnp.zeros(2)}
    >>> tx = optax.chain(scale_by_gradops(num_tasks=2), optax.sgd(0.1))
    >>> state = tx.init(params)
    >>> task_grads = {'w': jnp.array([[1.0, 0.0], [-1.0, 1.0]])}
    >>> updates, state = tx.update(task_grads, state, params)
    >>> updates['w'].shape
    (2,)

  References:
    Zhu et al., `Gradient Deconfliction via Orthogonal Projections onto
    Subspaces For Multi-task Learning <https://arxiv.org/abs/2503.03438>`_,
    WSDM 2025, Algorithm 1.
  """

  def init_state():
    return GradOPSState(
      weights=jnp.ones((num_tasks,), jnp.float32),
      alpha_weights=jnp.ones((num_tasks,), jnp.float32),
      projected=jnp.zeros((num_tasks,), bool),
      cosine=jnp.eye(num_tasks, dtype=jnp.float32),
      used_fallback=jnp.zeros((), bool),
      fallback_count=jnp.zeros((), jnp.int32),
      converged=jnp.ones((), bool),
      num_steps=jnp.zeros((), jnp.int32),
    )

  def solve(gram, state, input_dtype):
    solution = gradops_solve(gram, alpha, rank_rtol, input_dtype=input_dtype)
    return solution.weights, GradOPSState(
      weights=solution.weights,
      alpha_weights=solution.alpha_weights,
      projected=solution.projected,
      cosine=solution.cosine,
      used_fallback=solution.used_fallback,
      fallback_count=state.fallback_count + solution.used_fallback.astype(jnp.int32),
      converged=solution.fallback_info.converged,
      num_steps=solution.fallback_info.num_steps,
    )

  validation.check_exponent("alpha", alpha, validation.check_num_tasks(num_tasks))
  hyperparameters = {
    "alpha": (alpha, validation.REAL),
    "rank_rtol": (rank_rtol, validation.OPEN_UNIT_INTERVAL),
  }
  return base.gram_aggregator(num_tasks, init_state, solve, hyperparameters, precision=precision)


def gradops(
  learning_rate: optax.ScalarOrSchedule,
  num_tasks: int,
  alpha: Any = 0.0,
  precision: str = "auto",
  **adam_kwargs: Any,
) -> optax.GradientTransformation:
  r"""GradOPS followed by Adam: the one-liner for stacked per-task gradients.

  .. math::

    \theta \leftarrow \theta - \operatorname{Adam}_{\eta}\Big(\sum_i w_i g'_i\Big)

  Args:
    learning_rate: Adam's learning rate or schedule.
    num_tasks: the number of tasks :math:`T`.
    alpha: trade-off exponent of Eq. 5 (see :func:`scale_by_gradops`).
    precision: as for :func:`scale_by_gradops`.
    **adam_kwargs: forwarded to :func:`optax.adam` (``b1``, ``b2``, ``eps``...).

  Returns:
    ``optax.chain(scale_by_gradops(num_tasks, alpha, precision=precision), optax.adam(...))``.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> from gradops_jax import gradops
    >>> tx = gradops(learning_rate=1e-3, num_tasks=3, alpha=-1.0)
    >>> state = tx.init({'w': jnp.zeros(4)})

  References:
    Zhu et al., WSDM 2025 (the paper trains with Adam throughout).
  """
  return optax.chain(scale_by_gradops(num_tasks, alpha, precision=precision), optax.adam(learning_rate, **adam_kwargs))
