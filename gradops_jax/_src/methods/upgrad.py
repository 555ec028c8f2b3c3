r"""UPGrad: the mean of the task gradients projected onto their dual cone."""

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float
import optax

from gradops_jax._src import base
from gradops_jax._src import linalg
from gradops_jax._src import validation
from gradops_jax._src.solvers import accelerated
from gradops_jax._src.solvers import nonnegative


def upgrad_weights(
  gram: Float[Array, "T T"], tol: float = 1e-12, max_iters: int = 2000
) -> tuple[Float[Array, " T"], accelerated.SolverInfo]:
  r"""UPGrad coefficients from the Gram matrix.

  The projection of :math:`g_i` onto the dual cone
  :math:`\{x : g_j \cdot x \ge 0\ \forall j\}` is :math:`G^\top u^{(i)}` with

  .. math::

    u^{(i)} = \arg\min_{u \ge e_i} u^\top K u
    = e_i + \arg\min_{v \ge 0} \tfrac12 v^\top K v + (K e_i)^\top v,

  (Quinton and Rey, 2024, Proposition 1) and the update is the mean of the
  projections, :math:`\beta = \frac1T \sum_i u^{(i)}`. The T non-negative
  QPs are solved together, vmapped over tasks, on the cosine matrix (the
  cone does not change when the :math:`g_j` are rescaled), which makes the
  result invariant to the scale of each task.

  Args:
    gram: ``(T, T)`` Gram matrix.
    tol: relative KKT tolerance of each QP.
    max_iters: iteration cap of each QP.

  Returns:
    ``(T,)`` weights :math:`\beta`, and the info of the slowest of the T QPs.
  """
  num_tasks = gram.shape[0]
  norms, inverse_norms, cosine = linalg.cosine_from_gram(gram)
  # The cone is unchanged by positive scaling of the g_j: solve on unit
  # gradients, x = n_i (u_i + sum_j nu_j u_j) with nu >= 0, so that tasks of
  # very different scales are resolved equally well. Zero gradients decouple.
  unit_quadratic = linalg.masked_block(cosine, norms > 0)
  unit_shifts, info = jax.vmap(
    lambda column: nonnegative.nonnegative_quadratic_minimizer(unit_quadratic, column, tol, max_iters)
  )(cosine)
  shifts = norms[:, None] * unit_shifts * inverse_norms[None, :]
  weights = jnp.mean(jnp.eye(num_tasks, dtype=gram.dtype) + shifts, axis=0)
  return weights, accelerated.merge_infos(info)


def scale_by_upgrad(
  num_tasks: int, tol: float = 1e-12, max_iters: int = 2000, precision: str = "auto"
) -> optax.GradientTransformation:
  r"""Aggregates stacked per-task gradients with UPGrad.

  .. math::

    d = \frac1T \sum_i \pi_{C}(g_i), \qquad
    C = \{x : g_j \cdot x \ge 0\ \forall j\},

  computed from the Gram matrix (see :func:`upgrad_weights`). The update never
  conflicts with any task gradient.

  Args:
    num_tasks: T.
    tol: relative KKT tolerance of the QPs.
    max_iters: iteration cap of the QPs.

    precision: ``"auto"`` (float64 where the platform runs it natively,
      else float32), ``"float64"`` or ``"float32"`` (no float64 in the
      compiled program); see ``docs/precision.md``.
  Returns:
    An :class:`optax.GradientTransformation` with a
    :class:`~gradops_jax.WeightsState`.

  Example:
    >>> import jax.numpy as jnp
    >>> from gradops_jax import scale_by_upgrad
    >>> tx = scale_by_upgrad(2)
    >>> g = {'w': jnp.array([[1.0, 0.0], [-1.0, 1.0]])}
    >>> d = tx.update(g, tx.init({'w': jnp.zeros(2)}))[0]['w']

  References:
    Quinton and Rey, `Jacobian Descent For Multi-Objective Optimization
    <https://arxiv.org/abs/2406.16232>`_, 2024, Eq. 5 and Proposition 1.
  """
  return base.stateless_aggregator(
    num_tasks,
    lambda gram, _: upgrad_weights(gram, tol, max_iters),
    validation.solver_hyperparameters(tol, max_iters),
    precision=precision,
  )
