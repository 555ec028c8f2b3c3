r"""Every threshold of the package, and the one rule for the dtype it uses.

Dtype policy. The task-space solves run on the Gram matrix (float64, or
float32 in the float32 precision mode), but the gradients it came from carry
the rounding of *their* dtype. So:

* a decision about the **inputs** (is a direction in the span of the others,
  is a residual rounding, is a modified gradient cancelled) uses the machine
  epsilon of the least precise gradient dtype (:func:`input_rank_rtol`), at
  least the shortest relative residual the Gram matrix resolves
  (:math:`\sqrt{\epsilon_{64}}` in float64, :math:`\sqrt{10 T \epsilon_{32}}`
  in float32);
* a decision about a quantity computed **exactly on the Gram matrix** (the
  norm of a combination :math:`\|g_w\|^2 = w^\top K w`) uses the Gram
  matrix's dtype alone (:func:`gram_rank_rtol`);
* a test inside a solver compares against the rounding of its own
  arithmetic, in the Gram matrix's dtype (:func:`rounding_bound`,
  :func:`eigen_resolution`);
* whether an update is rounding noise compares its norm with the combine's
  error bound in the combine's accumulation dtype, and with what the Gram
  matrix resolves of it (:func:`without_rounding_noise`).
"""

from typing import Any

import jax
import jax.numpy as jnp

GRAM_DTYPE = jnp.float64


def least_precise_dtype(tree: Any):
  """The floating dtype with the largest machine epsilon among the leaves."""
  dtypes = [jnp.result_type(leaf) for leaf in jax.tree.leaves(tree)]
  return max(dtypes, key=lambda dtype: jnp.finfo(dtype).eps, default=jnp.float32)


def default_rank_rtol(num_tasks: int, dtype: Any = jnp.float32, gram_dtype: Any = GRAM_DTYPE) -> float:
  r"""Default rank tolerance: what the gradients' dtype and the Gram matrix's dtype resolve.

  .. math::

    \max\big(10 \sqrt{T}\,\epsilon_{\text{dtype}},\ r_{\text{Gram}}\big), \qquad
    r_{\text{Gram}} = \begin{cases}
      10 \sqrt{T}\,\sqrt{\epsilon_{64}} & \text{float64 Gram matrix} \\
      \sqrt{10\, T\, \epsilon_{32}} & \text{float32 Gram matrix}
    \end{cases}

  ``dtype`` is the dtype of the task *gradients* (float32 by default), not of
  the Gram matrix: both GradOPS entry points use it, so the same gradients
  give the same answer through :func:`gradops_jax.scale_by_gradops` and
  :func:`gradops_jax.gradops_solve`. With a float32 Gram matrix (the
  ``"float32"`` precision mode) the floor is the square root of
  :func:`eigen_resolution`, the smallest eigenvalue of a cosine matrix that a
  float32 eigensolver resolves (``docs/precision.md``).

  Args:
    num_tasks: T.
    dtype: the least precise dtype of the task gradients.
    gram_dtype: the dtype of the Gram matrix (float64 by default).

  Returns:
    The tolerance, a Python float.

  Example:
    >>> from gradops_jax import default_rank_rtol
    >>> round(default_rank_rtol(4), 8)
    2.384e-06
  """
  if jnp.finfo(gram_dtype).bits > 32:
    floor = 10.0 * num_tasks**0.5 * float(jnp.finfo(gram_dtype).eps) ** 0.5
  else:
    floor = eigen_resolution(num_tasks, gram_dtype) ** 0.5
  return float(max(10.0 * num_tasks**0.5 * float(jnp.finfo(dtype).eps), floor))


def input_rank_rtol(num_tasks: int, dtype: Any, gram_dtype: Any = GRAM_DTYPE) -> float:
  """Relative length below which a combination of the inputs is their rounding."""
  return default_rank_rtol(num_tasks, dtype, gram_dtype)


def gram_rank_rtol(num_tasks: int, gram_dtype: Any = GRAM_DTYPE) -> float:
  """Relative length below which a quantity exact on the Gram matrix is zero."""
  return default_rank_rtol(num_tasks, gram_dtype, gram_dtype)


def eigen_resolution(num_tasks: int, dtype: Any) -> float:
  """Eigenvalues of a unit-diagonal T x T matrix below this are rounding of the eigensolver."""
  return 10 * num_tasks * float(jnp.finfo(dtype).eps)


def rounding_bound(num_tasks: int, magnitude: jax.Array) -> jax.Array:
  r"""Bound :math:`2 (T + 2)\,\epsilon\,m` on the rounding of T-term sums of size ``magnitude``."""
  eps = jnp.finfo(jnp.result_type(magnitude)).eps
  return 2 * (num_tasks + 2) * eps * magnitude


def without_rounding_noise(gram: jax.Array, weights: jax.Array, input_dtype: Any) -> jax.Array:
  r"""The weights, or zeros where :math:`\sum_k \beta_k g_k` would be rounding noise.

  The combine adds T float32 terms (float64 for float64 gradients), so its
  result is off by up to :math:`\gamma \sum_k |\beta_k|\,\|g_k\|` in norm,
  :math:`\gamma = (T + 2)\,\epsilon`. When the exact combination's norm,
  :math:`\sqrt{\beta^\top K \beta}` from the Gram matrix, is within
  that bound, or within what the Gram matrix resolves of it
  (:math:`2 (T + 2)\,\epsilon_K` of the squared size, the larger bound in the
  float32 mode), the computed update would be noise in a random direction
  (Pareto-stationary tasks, such as two exactly opposite ones, whose
  weights cancel them): the weights are then zero, and so is the update.

  Args:
    gram: the ``(T, T)`` Gram matrix (float64, or float32 in the float32 mode).
    weights: the ``(T,)`` combination weights, in the Gram matrix's dtype.
    input_dtype: the least precise gradient dtype.

  Returns:
    ``weights``, or zeros of their shape and dtype.
  """
  num_tasks = gram.shape[0]
  accumulation = jnp.float64 if jnp.finfo(input_dtype).bits > 32 else jnp.float32
  gamma = (num_tasks + 2) * float(jnp.finfo(accumulation).eps)
  norms = jnp.sqrt(jnp.maximum(jnp.diagonal(gram), 0))
  size = jnp.sum(jnp.abs(weights) * norms)
  squared_norm = weights @ gram @ weights
  # The quadratic form's own error: a few of the Gram matrix's roundings per term.
  resolution = gamma**2 + 2 * (num_tasks + 2) * float(jnp.finfo(gram.dtype).eps)
  return jnp.where(squared_norm <= resolution * size**2, jnp.zeros_like(weights), weights)
