r"""Stage 1 and stage 3 of every aggregator: reduce to T x T, combine once.

All the aggregation methods of this package see the task gradients
:math:`g_1, \dots, g_T` only through their Gram matrix
:math:`K_{ij} = g_i \cdot g_j`, until the very end where the update is one
linear combination :math:`d = \sum_k \beta_k g_k`. This module holds the two
passes over the (possibly huge) gradient pytree:

* :func:`task_gram` reads every leaf once and returns the :math:`T \times T`
  Gram matrix summed over leaves.
* :func:`combine` reads every leaf once more and returns
  :math:`\sum_k \beta_k g_k` with the parameters' structure, shapes and dtypes.

Neither pass builds a flattened ``(T, D)`` copy: each leaf is reduced block
by block (cache-sized blocks, one fused reduction each) or combined in place,
and the only cross-leaf (and, under sharding, cross-device) traffic is a
:math:`T \times T` sum.

Numerics. The Gram matrix is accumulated in float64 from float32 (or
bfloat16/float16) inputs. The product of two float32 numbers is exact in
float64 (24 + 24 significant bits < 53), so the only rounding is that of a
float64 sum: the Gram matrix is exact to about 1e-16 relative, whatever the
scale of the inputs (float32's whole range, 1e-45 to 3e38, squares into
float64's range). This matters: the projections of GradOPS and PCGrad solve
least-squares problems with the Gram matrix, which squares the condition
number of the task gradients. Measured on three tasks with two of them at
cosine :math:`1 - 10^{-6}` (condition number about 700), the projected
gradient computed from a float32 Gram matrix was off by 1e-1 relative, from the
R factor of a float32 Householder QR by 4e-5, and from this float64 Gram matrix
by 1e-9 (``tests/test_gram.py`` keeps that comparison). The float64 work runs
inside ``jax.enable_x64`` locally; users do not need to enable x64.
"""

from typing import Any

import jax
import jax.numpy as jnp

GRAM_DTYPE = jnp.float64
COMBINE_BLOCK = 4096


def _block_gram(rows: jax.Array) -> jax.Array:
  """Exact-product Gram matrix of a ``(T, b)`` float32 block, in float64.

  One fused reduction: the products are formed and summed on the fly, without
  materialising a ``(T, T, b)`` or converted ``(T, b)`` array.
  """
  rows = rows.astype(GRAM_DTYPE)
  return jnp.sum(rows[:, None, :] * rows[None, :, :], axis=-1)


def _block_size(num_tasks: int) -> int:
  """Columns per block: about 256 KiB of float64 rows, so a block stays in cache."""
  return max(1024, 32768 // num_tasks)


def _leaf_gram(leaf: jax.Array) -> jax.Array:
  """Exact-product Gram matrix of one ``(T, ...)`` leaf, in float64.

  Large leaves are reduced block by block in a ``lax.scan`` so that each block
  is read from memory once and all :math:`T^2` products are formed while it is
  in cache (one fused reduction over a whole large leaf re-reads it
  :math:`T^2` times, and XLA stops fusing it at about 1e7 elements).
  """
  num_tasks = leaf.shape[0]
  rows = jnp.reshape(leaf, (num_tasks, -1))
  size = rows.shape[1]
  block = _block_size(num_tasks)
  num_blocks = size // block
  if num_blocks < 2:
    return _block_gram(rows)

  def accumulate(gram, index):
    chunk = jax.lax.dynamic_slice_in_dim(rows, index * block, block, axis=1)
    return gram + _block_gram(chunk), None

  init = jnp.zeros((num_tasks, num_tasks), GRAM_DTYPE)
  gram, _ = jax.lax.scan(accumulate, init, jnp.arange(num_blocks))
  if size > num_blocks * block:
    gram = gram + _block_gram(rows[:, num_blocks * block :])
  return gram


def task_gram(task_grads: Any, num_tasks: int) -> jax.Array:
  r"""Gram matrix of the task gradients, summed over the leaves of a pytree.

  .. math::

    K_{ij} = \sum_{\text{leaves } \ell} \langle g_i^{(\ell)}, g_j^{(\ell)} \rangle

  Must be called inside ``jax.enable_x64(True)``; returns float64.

  Args:
    task_grads: pytree whose every leaf has shape ``(num_tasks, ...)``.
    num_tasks: T.

  Returns:
    The ``(T, T)`` float64 Gram matrix.
  """
  gram = jnp.zeros((num_tasks, num_tasks), GRAM_DTYPE)
  for leaf in jax.tree.leaves(task_grads):
    gram = gram + _leaf_gram(leaf)
  return gram


def _split_into_two_factors(coefficients: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
  """Splits float64 coefficients ``c`` into ``a * b`` with a power of two ``a``.

  Both factors stay within the range of ``dtype`` for ``|c|`` up to the square
  of its largest number, so that ``(g * a) * b`` neither overflows nor
  underflows in ``dtype`` when ``g * c`` itself is representable (a huge
  coefficient on a tiny gradient, as scale-normalised methods produce).
  """
  mantissa, exponent = jnp.frexp(coefficients)
  half = exponent // 2
  power_of_two = jnp.ldexp(jnp.ones_like(mantissa), half)
  rest = jnp.ldexp(mantissa, exponent - half)
  return power_of_two.astype(dtype), rest.astype(dtype)


def combine(task_grads: Any, coefficients: jax.Array) -> Any:
  r"""The linear combination :math:`\sum_k \beta_k g_k`, leaf by leaf.

  Accumulates in float32 (or the leaf's dtype if wider) and rounds once to the
  leaf's dtype. Must be called inside ``jax.enable_x64(True)`` when
  ``coefficients`` is float64.

  Args:
    task_grads: pytree whose every leaf has shape ``(T, *shape)``.
    coefficients: ``(T,)`` combination weights :math:`\beta`.

  Returns:
    A pytree with leaves of shape ``shape`` and the leaves' dtypes.
  """

  def combine_block(rows, scale_a, scale_b):
    return jnp.sum((rows * scale_a[:, None]) * scale_b[:, None], axis=0)

  def combine_leaf(leaf):
    accumulation_dtype = jnp.promote_types(leaf.dtype, jnp.float32)
    scale_a, scale_b = _split_into_two_factors(coefficients, accumulation_dtype)
    rows = jnp.reshape(leaf, (leaf.shape[0], -1)).astype(accumulation_dtype)
    size = rows.shape[1]
    num_blocks = size // COMBINE_BLOCK
    if num_blocks < 2:
      combined = combine_block(rows, scale_a, scale_b)
    else:
      # Block by block (a reduction over the task axis of a whole large leaf
      # is XLA's slow path on CPU), written in place into the output.
      def write_block(out, index):
        start = index * COMBINE_BLOCK
        chunk = jax.lax.dynamic_slice_in_dim(rows, start, COMBINE_BLOCK, axis=1)
        block = combine_block(chunk, scale_a, scale_b)
        return jax.lax.dynamic_update_slice_in_dim(out, block, start, axis=0), None

      combined, _ = jax.lax.scan(
          write_block, jnp.zeros((size,), accumulation_dtype), jnp.arange(num_blocks)
      )
      if size > num_blocks * COMBINE_BLOCK:
        tail = combine_block(rows[:, num_blocks * COMBINE_BLOCK :], scale_a, scale_b)
        combined = combined.at[num_blocks * COMBINE_BLOCK :].set(tail)
    return jnp.reshape(combined, leaf.shape[1:]).astype(leaf.dtype)

  return jax.tree.map(combine_leaf, task_grads)


def cosine_from_gram(gram: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
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
  """
  norms = jnp.sqrt(jnp.maximum(jnp.diag(gram), 0.0))
  active = norms > 0
  inverse_norms = jnp.where(active, 1.0 / jnp.where(active, norms, 1.0), 0.0)
  cosine = jnp.clip(gram * inverse_norms[:, None] * inverse_norms[None, :], -1.0, 1.0)
  identity = jnp.eye(gram.shape[0], dtype=bool)
  cosine = jnp.where(identity, active.astype(gram.dtype), cosine)
  return norms, inverse_norms, cosine
