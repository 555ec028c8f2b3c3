r"""Nash-MTL: the Nash bargaining solution between the tasks."""

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float
import optax

from gradops_jax._src import base
from gradops_jax._src import manual_axes
from gradops_jax._src import tolerances
from gradops_jax._src import validation
from gradops_jax._src.solvers import accelerated

RIDGE = 1e-8


def nash_mtl_weights(
  gram: Float[Array, "T T"], tol: float = 1e-12, max_iters: int = 500
) -> tuple[Float[Array, " T"], accelerated.SolverInfo]:
  r"""Nash-MTL coefficients from the Gram matrix.

  Nash-MTL (Navon et al., 2022, Eq. 2 and Sec. 3.1) weights the tasks by the
  positive solution of

  .. math::

    \hat K \alpha = 1 / \alpha \quad (\text{elementwise}), \qquad
    \hat K = K / \|K\|_F,

  the Gram matrix normalised as in the official implementation, and updates
  with :math:`d = \sum_i \alpha_i g_i`. The equation is the optimality
  condition of the strictly convex problem
  :math:`\min_{\alpha > 0} \tfrac12 \alpha^\top \hat K \alpha - \sum_i \log \alpha_i`,
  solved here exactly by damped Newton steps (the official code approximates
  it with a few convex-concave iterations of a cvxpy solver). A ridge
  :math:`10^{-8} I` is added to :math:`\hat K` so that a solution exists for
  every input: without it, zero or exactly opposite task gradients admit none
  (the weights then grow large on those tasks, whose contributions vanish or
  cancel). Stops when :math:`\max_i |\alpha_i (\hat K\alpha)_i - 1|` is at most
  ``tol`` or its own rounding, :math:`2(T+2)\epsilon \max_i \alpha_i (|\hat K|\alpha)_i`,
  or after ``max_iters`` Newton steps.

  Args:
    gram: ``(T, T)`` Gram matrix.
    tol: tolerance on the optimality condition.
    max_iters: cap on Newton steps.

  Returns:
    ``(T,)`` weights :math:`\alpha > 0` (zeros when every gradient is zero),
    and the Newton solve's info.
  """
  num_tasks = gram.shape[0]
  frobenius = jnp.sqrt(jnp.sum(gram**2))
  normalised = gram / jnp.where(frobenius > 0, frobenius, 1.0)
  # In float32 a ridge of 1e-8 is below the rounding of a unit diagonal: raise it to what the dtype resolves.
  ridge = max(RIDGE, 4 * float(jnp.finfo(gram.dtype).eps))
  quadratic = normalised + ridge * jnp.eye(num_tasks, dtype=gram.dtype)

  def objective(alpha):
    return 0.5 * alpha @ quadratic @ alpha - jnp.sum(jnp.log(alpha))

  def residual(alpha):
    return jnp.max(jnp.abs(alpha * (quadratic @ alpha) - 1.0))

  def solved(alpha):
    # Rank-deficient K (T > D) puts weights ~1/sqrt(RIDGE) on its null space,
    # and the residual's own rounding then exceeds any tol near 1e-12.
    rounding = tolerances.rounding_bound(num_tasks, jnp.max(alpha * (jnp.abs(quadratic) @ alpha)))
    return residual(alpha) <= jnp.maximum(tol, rounding)

  def cond_fn(carry):
    step, alpha = carry
    return (step < max_iters) & ~solved(alpha)

  def body_fn(carry):
    step, alpha = carry
    gradient = quadratic @ alpha - 1.0 / alpha
    hessian = quadratic + jnp.diag(1.0 / alpha**2)
    direction = -jnp.linalg.solve(hessian, gradient)
    # Largest step in {1, 1/2, ..., 2^-30} keeping alpha > 0 and decreasing
    # either f (Armijo) or the optimality residual; the latter keeps Newton's
    # quadratic convergence where f is flat to rounding (large alpha).
    sizes = 0.5 ** jnp.arange(31, dtype=gram.dtype)
    candidates = alpha[None, :] + sizes[:, None] * direction[None, :]
    positive = jnp.all(candidates > 0, axis=1)
    safe = jnp.where(positive[:, None], candidates, 1.0)
    values = jax.vmap(objective)(safe)
    decrease = values <= objective(alpha) + 1e-4 * sizes * (gradient @ direction)
    closer = jax.vmap(residual)(safe) < residual(alpha)
    acceptable = positive & (decrease | closer)
    # First acceptable size (argmax is avoided: inside enable_x64 its cached
    # lowering can disagree on the index dtype).
    chosen = jnp.min(jnp.where(acceptable, jnp.arange(31, dtype=jnp.int32), 30))
    new_alpha = jnp.where(jnp.any(acceptable), candidates[chosen], alpha)
    return step + 1, new_alpha

  init = (jnp.array(0, jnp.int32), jnp.ones((num_tasks,), gram.dtype))
  num_steps, alpha = jax.lax.while_loop(cond_fn, body_fn, manual_axes.varying_like(init, quadratic))
  info = accelerated.SolverInfo(solved(alpha) | (frobenius == 0), num_steps)
  return jnp.where(frobenius > 0, alpha, 0.0), info


def scale_by_nash_mtl(
  num_tasks: int, tol: float = 1e-12, max_iters: int = 500, precision: str = "auto"
) -> optax.GradientTransformation:
  r"""Aggregates stacked per-task gradients with Nash-MTL.

  .. math::

    d = \sum_i \alpha_i g_i, \qquad \hat K \alpha = 1/\alpha

  (see :func:`nash_mtl_weights`). Every task's directional derivative along
  :math:`d` is then :math:`g_i^\top d = \|K\|_F / \alpha_i > 0`: the bargaining
  solution gives each task a positive share.

  Args:
    num_tasks: T.
    tol: tolerance on the optimality condition.
    max_iters: cap on Newton steps.

    precision: ``"auto"`` (float64 where the platform runs it natively,
      else float32), ``"float64"`` or ``"float32"`` (no float64 in the
      compiled program); see ``docs/precision.md``.
  Returns:
    An :class:`optax.GradientTransformation` with a
    :class:`~gradops_jax.WeightsState`.

  Example:
    >>> import jax.numpy as jnp
    >>> from gradops_jax import scale_by_nash_mtl
    >>> tx = scale_by_nash_mtl(2)
    >>> g = {'w': jnp.array([[1.0, 0.0], [0.0, 1.0]])}
    >>> d, _ = tx.update(g, tx.init({'w': jnp.zeros(2)}))

  References:
    Navon et al., `Multi-Task Learning as a Bargaining Game
    <https://arxiv.org/abs/2202.01017>`_, ICML 2022, Sec. 3.
  """
  return base.stateless_aggregator(
    num_tasks,
    lambda gram, _: nash_mtl_weights(gram, tol, max_iters),
    validation.solver_hyperparameters(tol, max_iters),
    precision=precision,
  )
