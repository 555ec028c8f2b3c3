r"""MGDA: the min-norm point of the convex hull of the task gradients."""

import optax

from gradops_jax._src import base
from gradops_jax._src import validation
from gradops_jax._src.solvers import min_norm


def scale_by_mgda(
  num_tasks: int, tol: float = 1e-12, max_iters: int = 2000, precision: str = "auto"
) -> optax.GradientTransformation:
  r"""Aggregates stacked per-task gradients with MGDA.

  .. math::

    d = \sum_i \lambda_i g_i, \qquad
    \lambda = \arg\min_{\lambda \in \Delta_T} \Big\|\sum_i \lambda_i g_i\Big\|^2

  solved exactly in task space (see
  :func:`gradops_jax.weightings.mgda`), not with a fixed number of
  Frank-Wolfe steps. :math:`d` is the direction of steepest common descent;
  it is zero exactly at Pareto-stationary points.

  Args:
    num_tasks: T.
    tol: relative duality-gap tolerance of the simplex QP.
    max_iters: iteration cap of the simplex QP.

    precision: ``"auto"`` (float64 where the platform runs it natively,
      else float32), ``"float64"`` or ``"float32"`` (no float64 in the
      compiled program); see ``docs/precision.md``.
  Returns:
    An :class:`optax.GradientTransformation` with a
    :class:`~gradops_jax.WeightsState`.

  Example:
    >>> import jax.numpy as jnp
    >>> from gradops_jax import scale_by_mgda
    >>> tx = scale_by_mgda(2)
    >>> g = {'w': jnp.array([[1.0, 0.0], [0.0, 1.0]])}
    >>> tx.update(g, tx.init({'w': jnp.zeros(2)}))[0]['w'].tolist()
    [0.5, 0.5]

  References:
    Sener and Koltun, `Multi-Task Learning as Multi-Objective Optimization
    <https://arxiv.org/abs/1810.04650>`_, NeurIPS 2018, Eq. 3 and Sec. 3.1.
  """
  return base.stateless_aggregator(
    num_tasks,
    lambda gram, _: min_norm.min_norm_simplex_weights(gram, tol, max_iters),
    validation.solver_hyperparameters(tol, max_iters),
    precision=precision,
  )
