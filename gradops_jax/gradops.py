r"""GradOPS: gradient deconfliction via orthogonal projections onto subspaces.

Implements Algorithm 1 of Zhu et al. (WSDM 2025) as an optax transform. With
task gradients :math:`g_1, \dots, g_T`:

1. (Eqs. 1-2) every task :math:`i` whose gradient conflicts with another,
   :math:`g_i \cdot g_j < 0` for some :math:`j \ne i`, is replaced by its
   projection onto the orthogonal complement of
   :math:`S_i = \operatorname{span}\{g_j : j \ne i\}` (all other tasks, not
   only the conflicting ones); other tasks keep :math:`g'_i = g_i`.
2. If every :math:`g'_i` is zero, the update is the MGDA min-norm point of the
   convex hull of the original gradients.
3. Otherwise, with :math:`G' = \sum_j g'_j`, (Eq. 3) :math:`R_i = G' \cdot g_i
   / \|g_i\|`, (Eq. 4) :math:`r_i = R_i / \operatorname{mean}(R)`, (Eq. 5)
   :math:`w_i = r_i^\alpha / \operatorname{mean}(r^\alpha)`, and the update is
   :math:`\sum_i w_i g'_i`.

How it computes. Each :math:`g'_i` is a linear combination of the original
gradients, so the whole algorithm is solved in :math:`T \times T` space from the
Gram matrix (:mod:`gradops_jax.gram`, exact float64 accumulation), vmapped over
tasks, and the update is one combination :math:`\sum_k \beta_k g_k` of the
original gradients. The projections are computed on unit-normalised gradients
(the cosine matrix), which makes the solve invariant to the scale of each task
and keeps mixed scales from 1e-20 to 1e20 within range. The projection onto
:math:`S_i^\perp` is the least-squares residual of :math:`g_i` on the other
gradients, taken with an eigendecomposition of their cosine matrix; this is
what Gram-Schmidt (Eq. 1) followed by Eq. 2 computes, in a form that is the
same for every processing order and needs no loop over tasks. When the tasks
are far from linearly dependent (every eigenvalue of their cosine matrix above
1e-3), all the residuals come from one inverse of that matrix instead (the
residual of task :math:`i` is row :math:`i` of the inverse over its diagonal
entry), which is the same result for T times less work.

Corner cases the paper leaves open, and what this implementation does (all
deterministic, none produces NaN or Inf from finite input):

* **Rank-deficient spans.** :math:`S_i` is the span of the others, whatever
  its dimension. Directions of the others' unit-normalised gradients with
  singular value at most ``rank_rtol`` are treated as not in the span: they
  are indistinguishable from rounding of the inputs. The default ``rank_rtol``
  is :math:`10 \sqrt{T}\,\epsilon`, with :math:`\epsilon` the machine epsilon
  of the least precise gradient dtype (about 2e-6 for three float32 tasks),
  but at least :math:`\sqrt{\epsilon_{64}} \approx 1.5 \times 10^{-8}`:
  the solve sees lengths only through the float64 Gram matrix, where a
  residual of relative length :math:`r` is a difference of order :math:`r^2`,
  so float64 gradients cannot resolve shorter residuals than that.
  In Gram-Schmidt terms: a :math:`u_j` of Eq. 1 shorter than ``rank_rtol``
  times :math:`\|g_j\|` is dropped.
* **Numerically zero projections.** A projected
  :math:`g'_i = \sum_j C_{ij} g_j` not longer than ``rank_rtol`` times its
  size :math:`\sum_j |C_{ij}| \|g_j\|` (at least :math:`\|g_i\|`) is set
  to exactly zero. Rounding scales with that size: the float64 Gram matrix
  gives the residual's length to about :math:`\sqrt{\epsilon_{64}}` times
  it, and forming the combination in the gradients' dtype errs by about
  :math:`T \epsilon` times it. Off nearly dependent others, a residual of
  pure rounding comes with large cancelling coefficients; kept, it would
  give an update that is mostly rounding error and conflicts with the tasks.
* **Zero task gradients.** :math:`g_i = 0` conflicts with nobody, spans
  nothing and has :math:`g'_i = 0`; its :math:`R_i` (0/0 in Eq. 3) is taken as
  0.
* **R_i = 0.** :math:`R_i \ge \|g'_i\|^2/\|g_i\|`, so :math:`R_i = 0` only when
  :math:`g'_i = 0` and the task's weight cannot change the update. Eq. 5 is
  used as written with :math:`0^\alpha = 0` for :math:`\alpha > 0`,
  :math:`0^0 = 1`, and :math:`0^\alpha := 0` for :math:`\alpha < 0`, where the
  paper's expression is undefined. :math:`R_i` at most ``rank_rtol`` times the
  largest :math:`R` counts as zero. Weights are computed in log space, so large
  :math:`|\alpha|` does not overflow.
* **MGDA fallback.** Fires when every :math:`g'_i` is zero, which includes all
  task gradients being zero (the update is then zero). The state reports the
  MGDA weights as the task weights.
* **T = 1.** Nothing conflicts; the update is :math:`g_1`.

References:
  Zhu et al., `Gradient Deconfliction via Orthogonal Projections onto Subspaces
  For Multi-task Learning <https://arxiv.org/abs/2503.03438>`_, WSDM 2025.
"""

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from gradops_jax import _validate
from gradops_jax import aggregation
from gradops_jax import gram as gram_lib
from gradops_jax import solvers


class GradOPSSolution(NamedTuple):
  r"""GradOPS solved in task space (float64).

  Attributes:
    coefficients: ``(T,)`` :math:`\beta` with update :math:`= \sum_k \beta_k g_k`.
    projection: ``(T, T)`` matrix :math:`C` with :math:`g'_i = \sum_j C_{ij} g_j`.
    weights: ``(T,)`` task weights :math:`w` of Eq. 5 (the MGDA weights when
      the fallback fired).
    projected: ``(T,)`` bool, which tasks were projected (had a conflict).
    cosine: ``(T, T)`` cosine similarities of the task gradients (0 for zero
      gradients, 1 on the diagonal of non-zero ones).
    used_fallback: ``()`` bool, whether every :math:`g'_i` was zero and MGDA
      gave the update.
  """

  coefficients: jax.Array
  projection: jax.Array
  weights: jax.Array
  projected: jax.Array
  cosine: jax.Array
  used_fallback: jax.Array


class GradOPSState(NamedTuple):
  """Diagnostics of the last :func:`scale_by_gradops` step.

  Attributes:
    weights: ``(T,)`` float32 task weights :math:`w` of Eq. 5 (MGDA weights
      when the fallback fired).
    projected: ``(T,)`` bool, which task gradients were projected.
    cosine: ``(T, T)`` float32 cosine matrix of the task gradients.
    used_fallback: ``()`` bool, whether the MGDA fallback gave the update.
    fallback_count: ``()`` int32, how many steps so far used the fallback.
  """

  weights: jax.Array
  projected: jax.Array
  cosine: jax.Array
  used_fallback: jax.Array
  fallback_count: jax.Array


def default_rank_rtol(num_tasks: int, dtype: Any) -> float:
  r"""Default rank tolerance :math:`10 \sqrt{T}\,\max(\epsilon_{\text{dtype}}, \sqrt{\epsilon_{64}})`.

  The floor :math:`\sqrt{\epsilon_{64}}` is the shortest relative residual
  that the float64 Gram matrix resolves (see the module docstring); it only
  matters for float64 gradients.
  """
  resolution = max(float(jnp.finfo(dtype).eps), float(jnp.finfo(jnp.float64).eps) ** 0.5)
  return float(10.0 * num_tasks**0.5 * resolution)


def _project_one_task(
    cosine: jax.Array, active: jax.Array, task: jax.Array, rank_rtol: float
) -> jax.Array:
  """Residual of unit task ``task`` on the other active tasks (unit-normalised basis)."""
  num_tasks = cosine.shape[0]
  unit = jax.nn.one_hot(task, num_tasks, dtype=cosine.dtype)
  others = active & (jnp.arange(num_tasks) != task)
  # Outside the others' block the matrix is the identity, so that those
  # coordinates decouple with eigenvalue 1 (their target entries are zero).
  others_cosine = jnp.where(
      others[:, None] & others[None, :], cosine, jnp.eye(num_tasks, dtype=cosine.dtype)
  )
  eigenvalues, eigenvectors = jnp.linalg.eigh(others_cosine)
  # Eigenvalues below what the eigensolver can resolve are rounding too.
  resolution = 10 * num_tasks * jnp.finfo(cosine.dtype).eps
  kept = eigenvalues > max(rank_rtol**2, resolution)
  inverse = jnp.where(kept, 1.0 / jnp.where(kept, eigenvalues, 1.0), 0.0)
  target = jnp.where(others, cosine[:, task], 0.0)
  least_squares = eigenvectors @ (inverse * (eigenvectors.T @ target))
  return unit - least_squares


# Smallest eigenvalue of the active tasks' cosine matrix above which all the
# projections come from one Cholesky factorisation (condition number at most
# T / 1e-3, so rounding stays far below every tolerance of the solve).
_WELL_CONDITIONED = 1e-3


def _active_cosine(cosine: jax.Array, active: jax.Array) -> jax.Array:
  """The cosine matrix of the active tasks, with the identity for the others."""
  identity = jnp.eye(cosine.shape[0], dtype=cosine.dtype)
  return jnp.where(active[:, None] & active[None, :], cosine, identity)


def _project_all_tasks(cosine: jax.Array, active: jax.Array) -> jax.Array:
  r"""The residuals of all tasks from one inverse.

  With :math:`M` the active tasks' cosine matrix and :math:`P = M^{-1}`, the
  residual of :math:`u_i` on the other tasks is :math:`P_{i\cdot} / P_{ii}`
  (the Schur complement of :math:`M_{-i}`). When no eigenvalue of :math:`M`
  is below the thresholds of :func:`_project_one_task`, none of any
  :math:`M_{-i}` is either (they interlace), and the residual has squared
  length :math:`1 / P_{ii} \ge \lambda_{\min}(M)`: this is what
  :func:`_project_one_task` computes, row by row.
  """
  matrix = _active_cosine(cosine, active)
  identity = jnp.eye(cosine.shape[0], dtype=cosine.dtype)
  inverse = jax.scipy.linalg.cho_solve((jnp.linalg.cholesky(matrix), True), identity)
  return inverse / jnp.diagonal(inverse)[:, None]


def _select_projections(
    residuals: jax.Array, cosine: jax.Array, active: jax.Array, conflicting: jax.Array,
    rank_rtol: float,
) -> jax.Array:
  r"""Rows :math:`u'_i` of the projection matrix in the unit-normalised basis.

  Conflicting tasks take their residual, unless it is not longer than
  ``rank_rtol`` times the sum of its coefficients' magnitudes (its size as a
  combination of unit gradients; at least 1, the task itself), which is
  rounding (module docstring). Other active tasks keep their gradient; zero
  tasks give zero.
  """
  length_sq = jnp.einsum("ij,jk,ik->i", residuals, cosine, residuals)
  size = jnp.sum(jnp.abs(residuals), axis=1)
  resolved = length_sq > (rank_rtol * size) ** 2
  identity = jnp.eye(cosine.shape[0], dtype=cosine.dtype)
  projected = (active & conflicting & resolved)[:, None]
  keep_original = (active & ~conflicting)[:, None]
  return jnp.where(projected, residuals, jnp.where(keep_original, identity, 0.0))


def _alpha_weights(scores: jax.Array, alpha: Any, rank_rtol: float) -> jax.Array:
  """Eqs. 4-5 in log space with the conventions of the module docstring."""
  num_tasks = scores.shape[0]
  is_zero = scores <= rank_rtol * jnp.max(scores)
  log_scores = jnp.log(jnp.where(is_zero, 1.0, scores))
  zero_term = jnp.where(alpha == 0, 0.0, -jnp.inf)
  exponents = jnp.where(is_zero, zero_term, alpha * log_scores)
  all_excluded = jnp.all(jnp.isneginf(exponents))
  exponents = jnp.where(all_excluded, 0.0, exponents)
  return num_tasks * jax.nn.softmax(exponents)


def gradops_solve(
    gram: jax.Array, alpha: Any = 0.0, rank_rtol: Optional[float] = None,
    mgda_tol: float = 1e-12, mgda_max_iters: int = 2000,
) -> GradOPSSolution:
  r"""Solves Algorithm 1 of GradOPS in task space from the Gram matrix.

  .. math::

    g'_i = \begin{cases}
      g_i - \operatorname{proj}_{S_i}(g_i) & \exists j \ne i: g_i \cdot g_j < 0
      \\ g_i & \text{otherwise}
    \end{cases}, \quad
    R_i = \frac{(\sum_j g'_j) \cdot g_i}{\|g_i\|}, \quad
    w_i = \frac{r_i^\alpha}{\frac1T \sum_j r_j^\alpha},

  and the update :math:`\sum_i w_i g'_i = \sum_k \beta_k g_k`. See the module
  docstring for the corner cases.

  Args:
    gram: ``(T, T)`` Gram matrix of the task gradients (float64 recommended).
    alpha: the trade-off exponent :math:`\alpha` of Eq. 5.
    rank_rtol: singular-value threshold on unit-normalised gradients below
      which a direction counts as rounding; default
      :func:`default_rank_rtol` for the dtype of ``gram``.
    mgda_tol: duality-gap tolerance of the MGDA fallback.
    mgda_max_iters: iteration cap of the MGDA fallback.

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
    rank_rtol = default_rank_rtol(num_tasks, gram.dtype)
  norms, inverse_norms, cosine = gram_lib.cosine_from_gram(gram)
  active = norms > 0
  off_diagonal = ~jnp.eye(num_tasks, dtype=bool)
  conflicting = jnp.any((gram < 0) & off_diagonal, axis=1)

  # One factorisation when the active tasks are far from linearly dependent
  # (M - threshold I is positive definite), else one eigendecomposition per task.
  resolution = 10 * num_tasks * float(jnp.finfo(cosine.dtype).eps)
  threshold = max(_WELL_CONDITIONED, rank_rtol**2, resolution)
  shifted = _active_cosine(cosine, active) - threshold * jnp.eye(num_tasks, dtype=cosine.dtype)
  well_conditioned = jnp.all(jnp.isfinite(jnp.linalg.cholesky(shifted)))
  residuals = jax.lax.cond(
      well_conditioned,
      lambda: _project_all_tasks(cosine, active),
      lambda: jax.vmap(_project_one_task, in_axes=(None, None, 0, None))(
          cosine, active, jnp.arange(num_tasks), rank_rtol
      ),
  )
  unit_projection = _select_projections(residuals, cosine, active, conflicting, rank_rtol)
  # g'_i = n_i u'_i = sum_j (n_i P_ij / n_j) g_j.
  projection = norms[:, None] * unit_projection * inverse_norms[None, :]
  used_fallback = jnp.all(unit_projection == 0)

  scores = (norms @ unit_projection) @ cosine  # R_i = G' . u_i (Eq. 3)
  weights = _alpha_weights(scores, alpha, rank_rtol)
  unit_coefficients = (weights * norms) @ unit_projection
  coefficients = unit_coefficients * inverse_norms

  mgda_weights = jax.lax.cond(
      used_fallback,
      lambda: solvers.min_norm_simplex_weights(gram, mgda_tol, mgda_max_iters),
      lambda: jnp.zeros((num_tasks,), gram.dtype),
  )
  coefficients = jnp.where(used_fallback, mgda_weights, coefficients)
  weights = jnp.where(used_fallback, mgda_weights, weights)
  return GradOPSSolution(
      coefficients=coefficients,
      projection=projection,
      weights=weights,
      projected=active & conflicting,
      cosine=cosine,
      used_fallback=used_fallback,
  )


def scale_by_gradops(
    num_tasks: int, alpha: Any = 0.0, rank_rtol: Optional[float] = None,
) -> optax.GradientTransformation:
  r"""Aggregates stacked per-task gradients with GradOPS.

  Takes a pytree whose every leaf is ``(num_tasks, *param.shape)`` (task
  :math:`i`'s gradient of its own loss on axis 0) and returns the parameter-
  shaped GradOPS direction

  .. math::

    d = \sum_{i=1}^T w_i\, g'_i,

  a gradient-like direction for the optimiser that follows (chain it with
  :func:`optax.adam`, or use :func:`gradops`). The computation reads the
  gradients twice (Gram matrix, then the combination), never copies them into
  a ``(T, D)`` matrix, and solves everything else in :math:`T \times T` space
  (see :func:`gradops_solve` and the module docstring for the corner cases).

  Args:
    num_tasks: the number of tasks :math:`T` (static).
    alpha: trade-off exponent :math:`\alpha` of Eq. 5; 0 weights all tasks
      equally (with T = 2 this is PCGrad), > 0 favours dominating tasks,
      < 0 dominated ones. May be changed during training with
      ``optax.inject_hyperparams(scale_by_gradops, static_args=('num_tasks',))``.
    rank_rtol: rank tolerance on unit-normalised gradients; default
      :math:`10\sqrt{T}\,\epsilon` of the least precise gradient dtype
      (see :func:`default_rank_rtol`).

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
  _validate.check_hyperparameter_range("alpha", alpha)
  if rank_rtol is not None:
    _validate.check_hyperparameter_range("rank_rtol", rank_rtol, 0.0, 1.0, high_inclusive=False)

  def init_state():
    return GradOPSState(
        weights=jnp.ones((num_tasks,), jnp.float32),
        projected=jnp.zeros((num_tasks,), bool),
        cosine=jnp.eye(num_tasks, dtype=jnp.float32),
        used_fallback=jnp.zeros((), bool),
        fallback_count=jnp.zeros((), jnp.int32),
    )

  def solve(gram, state, input_dtype):
    tolerance = rank_rtol
    if tolerance is None:
      tolerance = default_rank_rtol(num_tasks, input_dtype)
    solution = gradops_solve(gram, alpha, tolerance)
    return solution.coefficients, GradOPSState(
        weights=solution.weights,
        projected=solution.projected,
        cosine=solution.cosine,
        used_fallback=solution.used_fallback,
        fallback_count=state.fallback_count + solution.used_fallback.astype(jnp.int32),
    )

  return aggregation.gram_aggregator(num_tasks, init_state, solve)


def gradops(
    learning_rate: optax.ScalarOrSchedule, num_tasks: int, alpha: Any = 0.0,
    **adam_kwargs: Any,
) -> optax.GradientTransformation:
  r"""GradOPS followed by Adam: the one-liner for stacked per-task gradients.

  .. math::

    \theta \leftarrow \theta - \operatorname{Adam}_{\eta}\Big(\sum_i w_i g'_i\Big)

  Args:
    learning_rate: Adam's learning rate or schedule.
    num_tasks: the number of tasks :math:`T`.
    alpha: trade-off exponent of Eq. 5 (see :func:`scale_by_gradops`).
    **adam_kwargs: forwarded to :func:`optax.adam` (``b1``, ``b2``, ``eps``...).

  Returns:
    ``optax.chain(scale_by_gradops(num_tasks, alpha), optax.adam(...))``.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> from gradops_jax import gradops
    >>> tx = gradops(learning_rate=1e-3, num_tasks=3, alpha=-1.0)
    >>> state = tx.init({'w': jnp.zeros(4)})

  References:
    Zhu et al., WSDM 2025 (the paper trains with Adam throughout).
  """
  return optax.chain(
      scale_by_gradops(num_tasks, alpha), optax.adam(learning_rate, **adam_kwargs)
  )
