r"""IMTL-G: the update whose projections on every unit task gradient are equal."""

import jax.numpy as jnp
from jaxtyping import Array, Float
import optax

from gradops_jax._src import base
from gradops_jax._src import linalg
from gradops_jax._src.solvers import accelerated


def imtl_g_weights(gram: Float[Array, "T T"]) -> Float[Array, " T"]:
  r"""IMTL-G coefficients from the Gram matrix.

  With unit gradients :math:`u_i = g_i / \|g_i\|`, IMTL-G finds
  :math:`\alpha` with :math:`\sum_i \alpha_i = 1` such that
  :math:`d = \sum_i \alpha_i g_i` has the same projection on every
  :math:`u_i`, :math:`d \cdot (u_1 - u_i) = 0`; the paper's closed form
  :math:`\alpha_{2:T} = g_1 U^\top (D U^\top)^{-1}` with
  :math:`D = [g_1 - g_i]_i`, :math:`U = [u_1 - u_i]_i` is the solution of
  these T equations. They are solved here on unit gradients, for scale
  invariance: with :math:`\alpha_k = a_k / \|g_k\|` and the cosine matrix
  :math:`C`, the equal-projection equations :math:`(C a)_i = (C a)_r` are
  homogeneous in :math:`a`, so :math:`a` spans their null space
  (one-dimensional whenever the closed form is defined), found as the
  eigenvector of the smallest eigenvalue of :math:`M^\top M`; then
  :math:`\alpha` is normalised to sum to one. Zero gradients get
  :math:`\alpha_i = 0`; the first non-zero task is the reference :math:`r`.
  Where the closed form is undefined (a larger null space, or one on which
  :math:`\sum_k \alpha_k` vanishes, as for two exactly opposite tasks) the
  result is that deterministic eigenvector, or zero.

  Args:
    gram: ``(T, T)`` Gram matrix.

  Returns:
    ``(T,)`` coefficients :math:`\alpha` (zero when every gradient is zero).
  """
  num_tasks = gram.shape[0]
  norms, inverse_norms, cosine = linalg.cosine_from_gram(gram)
  active = norms > 0
  task_ids = jnp.arange(num_tasks, dtype=jnp.int32)
  reference = jnp.min(jnp.where(active, task_ids, num_tasks - 1))
  is_equation = active & (task_ids != reference)
  equations = jnp.where(is_equation[:, None], cosine - cosine[reference][None, :], 0.0)
  # Zero gradients: the constraint a_k = 0.
  equations = equations + jnp.diag((~active).astype(gram.dtype))
  if jnp.finfo(gram.dtype).bits > 32:
    _, eigenvectors = jnp.linalg.eigh(equations.T @ equations)
    null_vector = eigenvectors[:, 0]
  else:
    # float32 cannot afford the squared condition number of the normal matrix: the right
    # singular vector of the smallest singular value, from an SVD of the equations.
    null_vector = jnp.linalg.svd(equations)[2][-1]
  alpha = null_vector * inverse_norms
  total = jnp.sum(alpha)
  cancelled = jnp.maximum(1e-12, 2 * (num_tasks + 2) * jnp.finfo(gram.dtype).eps)
  defined = jnp.abs(total) > cancelled * jnp.sum(jnp.abs(alpha))
  return jnp.where(defined, alpha / jnp.where(defined, total, 1.0), 0.0)


def scale_by_imtl_g(num_tasks: int, precision: str = "auto") -> optax.GradientTransformation:
  r"""Aggregates stacked per-task gradients with IMTL-G.

  .. math::

    d = \sum_i \alpha_i g_i, \quad \sum_i \alpha_i = 1, \quad
    d \cdot u_1 = d \cdot u_2 = \dots = d \cdot u_T

  (see :func:`imtl_g_weights`).

  Args:
    num_tasks: T.

    precision: ``"auto"`` (float64 where the platform runs it natively,
      else float32), ``"float64"`` or ``"float32"`` (no float64 in the
      compiled program); see ``docs/precision.md``.
  Returns:
    An :class:`optax.GradientTransformation` with a
    :class:`~gradops_jax.WeightsState`.

  Example:
    >>> import jax.numpy as jnp
    >>> from gradops_jax import scale_by_imtl_g
    >>> tx = scale_by_imtl_g(2)
    >>> g = {'w': jnp.array([[2.0, 0.0], [0.0, 1.0]])}
    >>> d = tx.update(g, tx.init({'w': jnp.zeros(2)}))[0]['w']

  References:
    Liu et al., `Towards Impartial Multi-task Learning
    <https://openreview.net/forum?id=IMPnRXEWpvr>`_, ICLR 2021, Sec. 3.2.
  """
  return base.stateless_aggregator(
    num_tasks, lambda gram, _: (imtl_g_weights(gram), accelerated.no_iterations()), precision=precision
  )
