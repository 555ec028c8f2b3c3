r"""ConicGrad: the best worst-case task improvement inside a cone around the mean gradient.

With :math:`g_0` the mean gradient and :math:`c = \cos\theta`,

.. math::

  \max_{d} \min_i g_i^\top d \quad \text{s.t.} \quad
  \hat g_0^\top d \ge c\,\|d\|,\ \|d\| \le \|g_0\|,

solved through its dual :math:`\min_{w \in \Delta_T} \sigma_{\mathcal C}(g_w)`
over the simplex, whose support function has a closed form. The derivation
(ours: only the paper's abstract was available) is in
``docs/methods/conicgrad.md``.
"""

import jax.numpy as jnp
from jaxtyping import Array, Float
import optax

from gradops_jax._src import base
from gradops_jax._src import linalg
from gradops_jax._src import tolerances
from gradops_jax._src import validation
from gradops_jax._src.solvers import accelerated
from gradops_jax._src.solvers import simplex


def _cone_maximiser(scaled, mean, radius, c, w):
  """Coefficients of d*(w) and the support value, in task space."""
  tiny = jnp.finfo(scaled.dtype).tiny
  sine = jnp.sqrt(jnp.maximum(1.0 - c**2, 0.0))
  norm = jnp.sqrt(jnp.maximum(w @ scaled @ w, 0.0))
  safe_radius = jnp.maximum(radius, tiny)
  along = (w @ scaled @ mean) / safe_radius  # a = v . g0_hat
  across = jnp.sqrt(jnp.maximum(norm**2 - along**2, 0.0))  # b
  inside = along >= c * norm
  rim = ~inside & (along * c + across * sine > 0)
  inside_beta = radius * w / jnp.maximum(norm, tiny)
  safe_across = jnp.maximum(across, tiny)
  rim_beta = (radius * c - radius * sine * along / safe_across) / safe_radius * mean + (radius * sine / safe_across) * w
  beta = jnp.where(inside & (norm > 0), inside_beta, jnp.where(rim, rim_beta, 0.0))
  value = jnp.where(inside, radius * norm, jnp.where(rim, radius * (along * c + across * sine), 0.0))
  return beta, value


def conicgrad_weights(
  gram: Float[Array, "T T"],
  c: float = 0.5,
  tol: float = 1e-10,
  max_iters: int = 5000,
  zero_rtol: float = 0.0,
) -> tuple[Float[Array, " T"], accelerated.SolverInfo]:
  r"""ConicGrad coefficients from the Gram matrix (see the module docstring).

  .. math::

    d^\star = \arg\max_{\hat g_0^\top d \ge c\|d\|,\ \|d\| \le \|g_0\|}
    \ \min_i g_i^\top d

  Args:
    gram: ``(T, T)`` Gram matrix.
    c: cosine of the cone's half-angle, in [0, 1].
    tol: Frank-Wolfe gap tolerance of the dual, on the Gram matrix scaled to
      unit largest diagonal.
    max_iters: iteration cap of the dual.
    zero_rtol: a mean gradient shorter than this, relative to the largest
      task gradient, counts as zero (it is rounding of cancelling tasks).

  Returns:
    ``(T,)`` weights :math:`\beta` with :math:`d^\star = \sum_k \beta_k g_k`
    (zero when the optimal worst-task improvement is zero, then :math:`d = 0`
    is optimal, or the mean gradient is zero), and the dual solve's info.
  """
  num_tasks = gram.shape[0]
  scaled, _ = linalg.scale_to_unit_diagonal(gram)
  mean = jnp.full((num_tasks,), 1.0 / num_tasks, gram.dtype)
  radius = jnp.sqrt(jnp.maximum(mean @ scaled @ mean, 0.0))

  def value_and_grad(w):
    beta, value = _cone_maximiser(scaled, mean, radius, c, w)
    return value, scaled @ beta

  w, info = simplex.minimize_on_simplex(value_and_grad, num_tasks, gram.dtype, tol, max_iters)
  beta, value = _cone_maximiser(scaled, mean, radius, c, w)
  # 0 is in the cone, so the optimum is >= 0; when it is 0 (to the solver's
  # tolerance), d = 0 is optimal and the dual maximiser would be noise.
  positive = (radius > zero_rtol) & (value > zero_rtol * radius)
  return jnp.where(positive, beta, 0.0), info


def scale_by_conicgrad(
  num_tasks: int, c: float = 0.5, tol: float = 1e-10, max_iters: int = 5000, precision: str = "auto"
) -> optax.GradientTransformation:
  r"""Aggregates stacked per-task gradients with ConicGrad.

  .. math::

    \max_d \min_i g_i^\top d \quad \text{s.t.} \quad
    \frac{g_0^\top d}{\|g_0\|\|d\|} \ge c,\ \|d\| \le \|g_0\|

  solved through its dual in task space (derivation in the module docstring).

  Args:
    num_tasks: T.
    c: cosine of the cone's half-angle around the mean gradient, in [0, 1];
      1 gives the mean gradient, 0 the half-space of non-negative progress on
      the mean loss.
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
    >>> from gradops_jax import scale_by_conicgrad
    >>> tx = scale_by_conicgrad(2, c=0.5)
    >>> g = {'w': jnp.array([[1.0, 0.0], [-1.0, 2.0]])}
    >>> d, _ = tx.update(g, tx.init({'w': jnp.zeros(2)}))

  References:
    Hassanpour et al., `Fantastic Multi-Task Gradient Updates and How to Find
    Them In a Cone <https://arxiv.org/abs/2502.00217>`_, 2025 (problem
    statement; the derivation is ours).
  """
  return base.stateless_aggregator(
    num_tasks,
    lambda gram, input_dtype: conicgrad_weights(
      gram, c, tol, max_iters, tolerances.input_rank_rtol(num_tasks, input_dtype, gram.dtype)
    ),
    {
      "c": (c, validation.UNIT_INTERVAL),
      **validation.solver_hyperparameters(tol, max_iters),
    },
    precision=precision,
  )
