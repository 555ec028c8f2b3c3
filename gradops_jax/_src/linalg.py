r"""Small T x T linear algebra shared by the methods: cosines, scalings, masked blocks."""

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float


def cosine_from_gram(
  gram: Float[Array, "T T"],
) -> tuple[Float[Array, " T"], Float[Array, " T"], Float[Array, "T T"]]:
  r"""Norms and cosine matrix of the task gradients from their Gram matrix.

  .. math::

    n_i = \sqrt{K_{ii}}, \qquad C_{ij} = \frac{K_{ij}}{n_i n_j}

  Solving in cosine space makes the methods invariant to the scale of each
  task and keeps scales from 1e-20 to 1e20 in range. Zero gradients get
  :math:`n_i = 0`, a zero row and column in :math:`C`, and a zero diagonal.

  Args:
    gram: ``(T, T)`` Gram matrix.

  Returns:
    ``(norms, inverse_norms, cosine)``, with ``inverse_norms`` zero where the
    norm is zero.

  Example:
    >>> import jax.numpy as jnp
    >>> from gradops_jax import cosine_from_gram
    >>> norms, _, cosine = cosine_from_gram(jnp.array([[4.0, -2.0], [-2.0, 1.0]]))
    >>> norms.tolist(), cosine.tolist()
    ([2.0, 1.0], [[1.0, -1.0], [-1.0, 1.0]])
  """
  norms = jnp.sqrt(jnp.maximum(jnp.diag(gram), 0.0))
  active = norms > 0
  inverse_norms = jnp.where(active, 1.0 / jnp.where(active, norms, 1.0), 0.0)
  cosine = jnp.clip(gram * inverse_norms[:, None] * inverse_norms[None, :], -1.0, 1.0)
  identity = jnp.eye(gram.shape[0], dtype=bool)
  cosine = jnp.where(identity, active.astype(gram.dtype), cosine)
  return norms, inverse_norms, cosine


def scale_to_unit_diagonal(gram: Float[Array, "T T"]) -> tuple[jax.Array, jax.Array]:
  """The Gram matrix divided by its largest diagonal entry (by 1 when that is 0), and that divisor.

  Scaling every gradient by the same factor leaves the weights of a
  scale-equivariant method unchanged and keeps its tolerances relative.
  """
  scale = jnp.max(jnp.diag(gram))
  scale = jnp.where(scale > 0, scale, 1.0)
  return gram / scale, scale


def largest_eigenvalue_bound(matrix: Float[Array, "T T"]) -> jax.Array:
  """An upper bound on the largest eigenvalue of a symmetric ``matrix`` (its 2-norm when PSD).

  The eigensolver's value, raised by a relative 1e-6 (far above its
  rounding), and at least the smallest normal number: the Lipschitz constant
  of a first-order solver's fixed step, which must not be underestimated.
  """
  return jnp.maximum(jnp.linalg.eigvalsh(matrix)[-1] * (1 + 1e-6), jnp.finfo(matrix.dtype).tiny)


def masked_block(matrix: jax.Array, mask: jax.Array) -> jax.Array:
  """``matrix`` on the block ``mask x mask``, the identity elsewhere.

  The coordinates outside the block decouple with eigenvalue 1, so a solve or
  an eigendecomposition of the result acts on the block alone with static
  shapes.
  """
  identity = jnp.eye(matrix.shape[0], dtype=matrix.dtype)
  return jnp.where(mask[:, None] & mask[None, :], matrix, identity)


def thresholded_pseudo_inverse(matrix: jax.Array, threshold: float) -> tuple[jax.Array, jax.Array]:
  """Pseudo-inverse of ``matrix`` dropping eigenvalues not above ``threshold``, and each row's weight in them.

  ``matrix`` is symmetric positive semi-definite; eigen-directions at or below
  the threshold are treated as its null space (rounding, not signal).

  Returns:
    ``(pseudo_inverse, dropped)``: ``dropped[i]`` is the squared norm of row
    ``i`` of the dropped eigenvectors, how much coordinate ``i`` takes part in
    that null space.
  """
  eigenvalues, eigenvectors = jnp.linalg.eigh(matrix)
  kept = eigenvalues > threshold
  inverse = jnp.where(kept, 1.0 / jnp.where(kept, eigenvalues, 1.0), 0.0)
  dropped = jnp.sum(jnp.where(kept[None, :], 0.0, eigenvectors**2), axis=1)
  return (eigenvectors * inverse[None, :]) @ eigenvectors.T, dropped
