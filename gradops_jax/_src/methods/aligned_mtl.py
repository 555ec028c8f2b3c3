r"""Aligned-MTL: align the principal components of the task gradients."""

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float
import optax

from gradops_jax._src import base
from gradops_jax._src.solvers import accelerated


def aligned_mtl_weights(gram: Float[Array, "T T"], rank_rtol: float) -> Float[Array, " T"]:
  r"""Aligned-MTL coefficients from the Gram matrix.

  With the eigendecomposition :math:`K = V \Lambda V^\top` restricted to its
  numerical rank R (eigenvalues above ``rank_rtol`` times the largest), the
  balance transformation of Senushkin et al. (2023, Algorithm 1) is

  .. math::

    B = \sqrt{\lambda_R}\; V_R \Lambda_R^{-1/2} V_R^\top,

  which makes the transformed task gradients :math:`B^\top G` orthogonal with
  equal norms :math:`\sqrt{\lambda_R}` (the smallest singular value), and the
  update is :math:`d = G^\top B w` with the mean preference
  :math:`w = \mathbf 1/T`. When every gradient is zero :math:`B = I`.

  Args:
    gram: ``(T, T)`` Gram matrix.
    rank_rtol: relative eigenvalue threshold of the numerical rank.

  Returns:
    ``(T,)`` coefficients :math:`\beta = B w`.
  """
  num_tasks = gram.shape[0]
  eigenvalues, eigenvectors = jnp.linalg.eigh(gram)
  largest = jnp.max(eigenvalues)
  kept = eigenvalues > rank_rtol * largest
  smallest_kept = jnp.min(jnp.where(kept, eigenvalues, jnp.inf))
  inverse_sqrt = jnp.where(kept, jax.lax.rsqrt(jnp.where(kept, eigenvalues, 1.0)), 0.0)
  balance = jnp.sqrt(jnp.where(jnp.any(kept), smallest_kept, 0.0)) * (
    (eigenvectors * inverse_sqrt[None, :]) @ eigenvectors.T
  )
  balance = jnp.where(jnp.any(kept), balance, jnp.eye(num_tasks, dtype=gram.dtype))
  return balance @ jnp.full((num_tasks,), 1.0 / num_tasks, gram.dtype)


def scale_by_aligned_mtl(num_tasks: int, precision: str = "auto") -> optax.GradientTransformation:
  r"""Aggregates stacked per-task gradients with Aligned-MTL.

  .. math::

    d = G^\top B\, \mathbf 1 / T, \qquad
    B = \sqrt{\lambda_R}\; V_R \Lambda_R^{-1/2} V_R^\top

  (see :func:`aligned_mtl_weights`). The numerical rank uses the threshold
  :math:`T \epsilon` of the least precise gradient dtype, relative to the
  largest eigenvalue, as the reference implementation does.

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
    >>> from gradops_jax import scale_by_aligned_mtl
    >>> tx = scale_by_aligned_mtl(2)
    >>> g = {'w': jnp.array([[2.0, 0.0], [0.0, 1.0]])}
    >>> tx.update(g, tx.init({'w': jnp.zeros(2)}))[0]['w'].tolist()
    [0.5, 0.5]

  References:
    Senushkin et al., `Independent Component Alignment for Multi-Task Learning
    <https://arxiv.org/abs/2305.19000>`_, CVPR 2023, Algorithm 1.
  """
  return base.stateless_aggregator(
    num_tasks,
    lambda gram, input_dtype: (
      aligned_mtl_weights(gram, num_tasks * float(jnp.finfo(input_dtype).eps)),
      accelerated.no_iterations(),
    ),
    precision=precision,
  )
