r"""CAGrad: conflict-averse gradient descent."""

import jax.numpy as jnp
from jaxtyping import Array, Float
import optax

from gradops_jax._src import base
from gradops_jax._src import linalg
from gradops_jax._src import tolerances
from gradops_jax._src import validation
from gradops_jax._src.solvers import accelerated
from gradops_jax._src.solvers import nonnegative
from gradops_jax._src.solvers import simplex


def cagrad_weights(
  gram: Float[Array, "T T"],
  c: float = 0.5,
  rescale: bool = True,
  tol: float = 1e-10,
  max_iters: int = 5000,
  zero_rtol: float = 0.0,
) -> tuple[Float[Array, " T"], accelerated.SolverInfo]:
  r"""CAGrad coefficients from the Gram matrix.

  With the mean gradient :math:`g_0 = \frac1T \sum_i g_i` and
  :math:`g_w = \sum_i w_i g_i`, CAGrad solves the dual (Liu et al., 2021,
  Eq. 4 and Algorithm 1)

  .. math::

    w^\star = \arg\min_{w \in \Delta_T}\ g_w^\top g_0 + c\,\|g_0\|\,\|g_w\|,
    \qquad d = \frac{g_0 + \frac{c\|g_0\|}{\|g_{w^\star}\|} g_{w^\star}}{1 + c^2},

  the last division being the official code's default ``rescale=1``. The
  convex problem is solved in task space with :math:`g_w^\top g_0 = w^\top K
  \mathbf{1}/T` and :math:`\|g_w\|^2 = w^\top K w` (see
  the accelerated loop of the package), on the Gram matrix scaled
  to unit largest diagonal, to a Frank-Wolfe gap of ``tol``.

  When the dual optimum has :math:`g_{w^\star} = 0` (0 lies in the convex hull
  of the gradients, so no update improves every task), the formula divides by
  zero (the official code by 1e-8); the optimal updates are then the points of
  the ball with :math:`g_i^\top d \ge 0` for all :math:`i`, and the one closest
  to :math:`g_0` (its projection onto that cone) is returned.

  Args:
    gram: ``(T, T)`` Gram matrix.
    c: the radius :math:`c \ge 0` of the ball around :math:`g_0`
      (the paper's :math:`c`; 0 gives the mean gradient).
    rescale: divide by :math:`1 + c^2` as the official implementation does.
    tol: Frank-Wolfe gap tolerance (on the scaled problem).
    max_iters: iteration cap.
    zero_rtol: :math:`\|g_w\|` below this, relative to the largest task
      gradient, counts as zero.

  Returns:
    ``(T,)`` weights :math:`\beta` with :math:`d = \sum_k \beta_k g_k`, and
    the dual solve's info.
  """
  num_tasks = gram.shape[0]
  scaled, _ = linalg.scale_to_unit_diagonal(gram)
  mean = jnp.full((num_tasks,), 1.0 / num_tasks, gram.dtype)
  radius = c * jnp.sqrt(jnp.maximum(mean @ scaled @ mean, 0.0))
  tiny = jnp.finfo(gram.dtype).tiny

  def value_and_grad(w):
    norm = jnp.sqrt(jnp.maximum(w @ scaled @ w, 0.0))
    value = w @ scaled @ mean + radius * norm
    gradient = scaled @ mean + radius * (scaled @ w) / jnp.maximum(norm, tiny)
    return value, gradient

  w, info = simplex.minimize_on_simplex(value_and_grad, num_tasks, gram.dtype, tol, max_iters)
  norm = jnp.sqrt(jnp.maximum(w @ scaled @ w, 0.0))
  coefficients = mean + radius / jnp.maximum(norm, tiny) * w
  # Degenerate dual optimum g_w = 0 (0 is in the convex hull): the optimal
  # value is 0 and the optimal updates are the d in the ball with g_i . d >= 0
  # for all i; take the one closest to g0, its projection onto that cone.
  shift, _ = nonnegative.nonnegative_quadratic_minimizer(scaled, scaled @ mean)
  degenerate = norm <= zero_rtol
  coefficients = jnp.where(degenerate, mean + shift, coefficients)
  return (coefficients / (1.0 + c**2) if rescale else coefficients), info


def scale_by_cagrad(
  num_tasks: int,
  c: float = 0.5,
  rescale: bool = True,
  tol: float = 1e-10,
  max_iters: int = 5000,
  precision: str = "auto",
) -> optax.GradientTransformation:
  r"""Aggregates stacked per-task gradients with CAGrad.

  .. math::

    \max_d \min_i g_i^\top d \quad \text{s.t.} \quad \|d - g_0\| \le c \|g_0\|

  solved through its dual in task space (see :func:`cagrad_weights`).

  Args:
    num_tasks: T.
    c: radius of the ball around the mean gradient, :math:`c \ge 0`.
    rescale: divide the update by :math:`1 + c^2` (official default).
    tol: Frank-Wolfe gap tolerance of the dual.
    max_iters: iteration cap of the dual.

    precision: ``"auto"`` (float64 where the platform runs it natively,
      else float32), ``"float64"`` or ``"float32"`` (no float64 in the
      compiled program); see ``docs/precision.md``.
  Returns:
    An :class:`optax.GradientTransformation` with a
    :class:`~gradops_jax.WeightsState`.

  Example:
    >>> import jax.numpy as jnp
    >>> from gradops_jax import scale_by_cagrad
    >>> tx = scale_by_cagrad(2, c=0.5)
    >>> g = {'w': jnp.array([[1.0, 0.0], [-1.0, 2.0]])}
    >>> d, _ = tx.update(g, tx.init({'w': jnp.zeros(2)}))

  References:
    Liu et al., `Conflict-Averse Gradient Descent for Multi-task Learning
    <https://arxiv.org/abs/2110.14048>`_, NeurIPS 2021, Algorithm 1.
  """
  return base.stateless_aggregator(
    num_tasks,
    lambda gram, _: cagrad_weights(
      # g_w is exact on the Gram matrix whatever the input dtype.
      gram,
      c,
      rescale,
      tol,
      max_iters,
      tolerances.gram_rank_rtol(num_tasks, gram.dtype),
    ),
    {
      "c": (c, validation.NONNEGATIVE),
      **validation.solver_hyperparameters(tol, max_iters),
    },
    precision=precision,
  )
