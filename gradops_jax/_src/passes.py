r"""The two passes of every aggregator over the gradients: reduce to T x T, combine once.

:func:`task_gram` reads every leaf once and returns the :math:`T \times T`
Gram matrix :math:`K_{ij} = \sum_\ell \langle g_i^{(\ell)}, g_j^{(\ell)} \rangle`
in float64 (exact products of float32 inputs); :func:`combine` reads every
leaf once more and returns :math:`\sum_k \beta_k g_k` with the parameters'
structure, shapes and dtypes. Neither builds a ``(T, D)`` copy. Each pass
has a C++ CPU kernel, an XLA form for one device, and a partitionable XLA
form for leaves that may be sharded; ``implementation`` chooses, and
``"auto"`` picks per leaf while the update is traced. The forms, their
numerics and their sharding are described in ``docs/design.md``.
"""

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp

from gradops_jax._src import kernels
from gradops_jax._src import manual_axes
from gradops_jax._src.tolerances import GRAM_DTYPE

GRAM_IMPLEMENTATIONS = ("auto", "kernel", "scan", "partitionable")
COMBINE_IMPLEMENTATIONS = ("auto", "kernel", "xla")


class _EngineOnly:
  """Refuses arithmetic: only this module's passes may read an engine leaf."""

  def _refuse(self, *args, **kwargs):
    raise TypeError(
      f"{type(self).__name__} is a leaf of gradops_jax.value_and_aggregated_grad, which only "
      "gradops_jax's Gram and combine passes read. A transform that computes with the task "
      "gradients or the update (an optimiser, optax.scale, ...) must come after the engine: "
      "chain the optimiser after the engine, not inside the aggregator."
    )

  __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = __truediv__ = __rtruediv__ = _refuse
  __neg__ = __pow__ = __matmul__ = __rmatmul__ = __array__ = __jax_array__ = _refuse


class JacobianRows(_EngineOnly):
  r"""One leaf of the stacked Jacobian inside the Gramian engine: for Gram reductions only.

  :func:`gradops_jax.value_and_aggregated_grad` hands an aggregator these in
  place of the stacked task gradients. :func:`leaf_gram` reduces them as
  usual; :func:`combine` does not read them but returns a
  :class:`PendingCombination`, which the engine turns into a vector-Jacobian
  product. So nothing but the Gram reduction consumes a stacked leaf, and XLA
  can free each one as soon as its :math:`T \times T` contribution is taken.
  Shape and dtype are those of the stacked leaf, for validation.
  """

  def __init__(self, rows: jax.Array, index: int):
    self.rows = rows
    self.index = index

  @property
  def shape(self) -> tuple:
    return tuple(self.rows.shape)

  @property
  def ndim(self) -> int:
    return self.rows.ndim

  @property
  def dtype(self):
    return self.rows.dtype

  def __repr__(self) -> str:
    return f"JacobianRows(shape={self.shape}, dtype={self.dtype})"


class PendingCombination(_EngineOnly):
  r"""Leaf ``index`` of :math:`\sum_k \beta_k g_k`, left for the Gramian engine to compute.

  A plain class, not a pytree node: it must stay one leaf through the
  aggregator's tree operations (:func:`optax.partition` merges its parts).
  """

  def __init__(self, factors: tuple, index: int, shape: tuple, dtype: Any):
    self.factors = factors
    self.index = index
    self.shape = shape
    self.dtype = dtype


def _check_implementation(implementation: str, allowed: tuple) -> None:
  if implementation not in allowed:
    raise ValueError(f"implementation must be one of {allowed}, got {implementation!r}.")


def _block_size(num_tasks: int) -> int:
  """Elements per block: a power of two, with at most 256 KiB of float64 rows (T > 32: 1024)."""
  return max(1024, 1 << (32768 // num_tasks).bit_length() - 1)


def _possible_shards() -> int:
  """How many devices the arrays being traced may be split across, by the context alone.

  The non-manual axes of the mesh in context (``jax.set_mesh``, or the rest of
  a partly manual ``shard_map``); with no mesh in context, every device of the
  job: under Auto axes the sharding of a jitted function's inputs is not part
  of their type, so any of them may be sharded over all devices. Inside a
  ``shard_map`` over every axis the arrays are local: 1.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return jax.device_count()
  return math.prod(size for name, size in mesh.shape.items() if name not in mesh.manual_axes)


def _has_explicit_sharding(leaf: jax.Array) -> bool:
  """Whether the leaf's type says it is sharded (Explicit mesh axes)."""
  spec = getattr(jax.typeof(leaf).sharding, "spec", None) or ()
  return any(axis is not None for axis in spec)


def _contracted_gram(leaf: jax.Array) -> jax.Array:
  r"""Gram matrix of a ``(T, ...)`` leaf: one float64 contraction over every parameter axis.

  The form for a leaf that may be sharded: no axis is merged with another,
  so XLA's partitioner contracts each shard where it lies and adds the
  :math:`T \times T` partial sums across devices, whichever axes the leaf is
  sharded on. (A reduction in two stages, over some axes and then over the
  rest, would send one partial Gram matrix per entry of the axes left after
  the first stage when the sharded axis is among the first.)
  """
  rows = leaf.astype(GRAM_DTYPE)
  axes = tuple(range(1, leaf.ndim))
  # Explicit axes make the result's sharding part of its type: the T x T sum lies on every device.
  replicated = jax.sharding.PartitionSpec() if _has_explicit_sharding(leaf) else None
  return jax.lax.dot_general(
    rows, rows, ((axes, axes), ((), ())), precision=jax.lax.Precision.HIGHEST, out_sharding=replicated
  )


def _scanned_gram(rows: jax.Array) -> jax.Array:
  """Gram matrix of ``(T, D)`` rows on one device, reduced block by block in a scan.

  The rows are read in blocks of :func:`_block_size`
  columns inside a :func:`jax.lax.scan`, so that each block is read from
  memory once and converted to float64 in cache, where one small matrix
  product forms its :math:`T^2` inner products (faster on CPU than a fused
  multiply-and-reduce, which XLA vectorises less well), with no
  temporary buffer beyond the block. A dynamic slice of a sharded axis would
  make XLA gather the leaf, hence :func:`_contracted_gram` for
  sharded leaves.
  """
  zeros = manual_axes.varying_like(jnp.zeros((rows.shape[0], rows.shape[0]), GRAM_DTYPE), rows)
  return _reduce_in_blocks(rows, _contracted_gram, jnp.add, zeros)


def _reduce_in_blocks(rows: jax.Array, block_gram: Callable, add: Callable, total: Any) -> Any:
  """``total`` with ``block_gram`` of every block of :func:`_block_size` columns of ``rows`` added by ``add``.

  The blocks are read in a :func:`jax.lax.scan` (one call when there are fewer
  than two), then the columns left over; the float64 and the float32 Gram
  passes differ only in ``block_gram`` and ``add``.
  """
  block = _block_size(rows.shape[0])
  num_blocks = rows.shape[1] // block
  if num_blocks < 2:
    return add(total, block_gram(rows))

  def accumulate(total, index):
    return add(total, block_gram(jax.lax.dynamic_slice_in_dim(rows, index * block, block, axis=1))), None

  total, _ = jax.lax.scan(accumulate, total, jnp.arange(num_blocks))
  if rows.shape[1] > num_blocks * block:
    total = add(total, block_gram(rows[:, num_blocks * block :]))
  return total


def _may_be_sharded(leaf: jax.Array) -> bool:
  """Whether the leaf has an Explicit sharding or may be split by the context (:func:`_possible_shards`).

  A leaf that may be sharded takes the XLA forms, which XLA's partitioner
  splits where the leaf lies; the C++ kernel is a custom call, whose operands
  the partitioner would gather onto every device.
  """
  return _has_explicit_sharding(leaf) or _possible_shards() > 1


def leaf_gram(leaf: jax.Array, implementation: str = "auto") -> jax.Array:
  r"""Gram matrix of the task gradients of one ``(T, ...)`` leaf, in float64.

  .. math::

    K^{(\ell)}_{ij} = \langle g_i^{(\ell)}, g_j^{(\ell)} \rangle

  with exact products (see the module docstring). :func:`task_gram` is the sum
  of these over the leaves; a transform that needs them per leaf (the layer
  conflict scores of :mod:`gradops_jax.recon`) calls this same function, and
  XLA merges the identical computations of two transforms jitted together,
  so the gradients are still read once. Must be called inside
  ``jax.enable_x64(True)``.

  Args:
    leaf: a ``(T, ...)`` array.
    implementation: ``"auto"`` (the choice below), ``"kernel"`` (the C++
      kernel on CPU where it is available, else the scan), ``"scan"`` (XLA,
      one device) or ``"partitionable"`` (XLA, one contraction that XLA's
      partitioner splits where the leaf lies). ``"auto"`` takes
      ``"partitionable"`` when the leaf may be sharded, else ``"kernel"``.

  Returns:
    The ``(T, T)`` float64 Gram matrix of the leaf.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from gradops_jax import leaf_gram
    >>> with jax.enable_x64(True):
    ...   print(leaf_gram(jnp.array([[1.0, 2.0], [3.0, 4.0]])))
    [[ 5. 11.]
     [11. 25.]]
  """
  _check_implementation(implementation, GRAM_IMPLEMENTATIONS)
  leaf = _rows_of(leaf)
  if implementation == "auto":
    implementation = "partitionable" if _may_be_sharded(leaf) else "kernel"
  if implementation == "partitionable":
    return _contracted_gram(leaf)
  rows = jnp.reshape(leaf, (leaf.shape[0], -1))
  if implementation == "scan":
    return _scanned_gram(rows)
  return kernels.gram(rows, _scanned_gram)


def task_gram(task_grads: Any, num_tasks: int, implementation: str = "auto") -> jax.Array:
  r"""Gram matrix of the task gradients, summed over the leaves of a pytree.

  .. math::

    K_{ij} = \sum_{\text{leaves } \ell} \langle g_i^{(\ell)}, g_j^{(\ell)} \rangle

  Must be called inside ``jax.enable_x64(True)``; returns float64.

  Args:
    task_grads: pytree whose every leaf has shape ``(num_tasks, ...)``.
    num_tasks: T.
    implementation: as for :func:`leaf_gram`.

  Returns:
    The ``(T, T)`` float64 Gram matrix.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from gradops_jax import task_gram
    >>> grads = {'a': jnp.array([[1.0], [2.0]]), 'b': jnp.array([[0.0, 1.0], [1.0, 0.0]])}
    >>> with jax.enable_x64(True):
    ...   print(task_gram(grads, num_tasks=2))
    [[2. 2.]
     [2. 5.]]
  """
  gram = jnp.zeros((num_tasks, num_tasks), GRAM_DTYPE)
  for leaf in jax.tree.leaves(task_grads):
    gram = gram + leaf_gram(leaf, implementation)
  return gram


def _two_sum(total: jax.Array, term: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``total + term`` rounded, and its rounding error exactly (Knuth's TwoSum, any order of magnitudes)."""
  rounded = total + term
  term_part = rounded - total
  error = (total - (rounded - term_part)) + (term - term_part)
  return rounded, error


def _add_compensated(pair: tuple[jax.Array, jax.Array], term: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Adds ``term`` to the double-float32 sum ``(high, low)``, keeping the rounding error in ``low``."""
  high, low = pair
  high, error = _two_sum(high, term)
  return high, low + error


def _rows_of(leaf: Any) -> jax.Array:
  return leaf.rows if isinstance(leaf, JacobianRows) else jnp.asarray(leaf)


def task_exponents(task_grads: Any, num_tasks: int) -> jax.Array:
  """``(T,)`` int32 exponents :math:`e_i` with :math:`\\max |g_i| \\in [2^{e_i - 1}, 2^{e_i})` (0 for a zero task)."""
  largest = jnp.zeros((num_tasks,), jnp.float32)
  for leaf in jax.tree.leaves(task_grads):
    rows = _rows_of(leaf)
    axes = tuple(range(1, rows.ndim))
    largest = jnp.maximum(largest, jnp.max(jnp.abs(rows), axis=axes).astype(jnp.float32))
  return jnp.frexp(largest)[1]


def _scaled_leaf_gram_float32(leaf: jax.Array, scales: jax.Array, implementation: str) -> tuple[jax.Array, jax.Array]:
  r"""Double-float32 Gram matrix ``(high, low)`` of a ``(T, ...)`` leaf with task ``i`` scaled by ``scales[i]``.

  The scales are powers of two that bring every task's largest entry to
  :math:`[1/2, 1)`, so no product overflows or underflows whatever the
  task's scale. On one device the rows are reduced block by block as in
  :func:`_scanned_gram`, each block by one float32 matrix product and added
  to the running sum with TwoSum, so that the error is that of one block's
  product, not of a length-D float32 sum; a leaf that may be sharded takes
  one float32 contraction, which XLA's partitioner splits where it lies.
  """
  rows = leaf.astype(jnp.float32)

  def block_gram(block):
    scaled = block * scales.reshape((-1,) + (1,) * (block.ndim - 1))
    axes = tuple(range(1, block.ndim))
    replicated = jax.sharding.PartitionSpec() if _has_explicit_sharding(leaf) else None
    return jax.lax.dot_general(
      scaled, scaled, ((axes, axes), ((), ())), precision=jax.lax.Precision.HIGHEST, out_sharding=replicated
    )

  num_tasks = leaf.shape[0]
  zeros = manual_axes.varying_like(jnp.zeros((num_tasks, num_tasks), jnp.float32), rows)
  if implementation == "auto":
    implementation = "partitionable" if _may_be_sharded(leaf) else "scan"
  if implementation == "partitionable":
    return block_gram(rows), zeros
  return _reduce_in_blocks(jnp.reshape(rows, (num_tasks, -1)), block_gram, _add_compensated, (zeros, zeros))


def task_gram_float32(task_grads: Any, num_tasks: int, implementation: str = "auto") -> jax.Array:
  r"""The Gram matrix of the task gradients scaled by one power of two, in float32 arithmetic only.

  .. math::

    \hat K = 2^{-2c} K, \qquad
    K_{ij} = 2^{e_i + e_j} \sum_\ell \langle 2^{-e_i} g_i^{(\ell)}, 2^{-e_j} g_j^{(\ell)} \rangle,

  with :math:`e_i` the exponent of task :math:`i`'s largest entry
  (:func:`task_exponents`) and :math:`c` that of the largest norm, so
  :math:`\hat K` has diagonal at most 1 and the aggregators' weights, which
  do not change when every task is scaled by one factor, are those of
  :math:`K`. The sums over each task's scaled entries are double-float32
  (TwoSum over blocks and leaves), so each entry is within a few float32
  roundings of :math:`2^{-2c} K_{ij}` relative to :math:`\|g_i\| \|g_j\|`.
  A task whose norm is below about :math:`2^{-63}` of the largest (1e-19)
  has subnormal entries in :math:`\hat K`, which XLA flushes to zero: it
  counts as a zero task. Accuracy and cost: ``docs/precision.md``.

  Args:
    task_grads: pytree whose every leaf has shape ``(num_tasks, ...)``.
    num_tasks: T.
    implementation: ``"auto"``, ``"scan"`` or ``"partitionable"``
      (``"kernel"`` means ``"scan"``: the C++ kernel is float64).

  Returns:
    The ``(T, T)`` float32 matrix :math:`\hat K`.

  Example:
    >>> import jax.numpy as jnp
    >>> from gradops_jax import task_gram_float32
    >>> grads = {'w': jnp.array([[3e20, 4e20], [0.0, 1e20]])}  # |g_1|^2 = 2.5e41: beyond float32
    >>> print(task_gram_float32(grads, num_tasks=2))  # K / 2**138: the weights of K
    [[0.71746486 0.11479437]
     [0.11479437 0.02869859]]
  """
  _check_implementation(implementation, GRAM_IMPLEMENTATIONS)
  if implementation == "kernel":
    implementation = "scan"
  exponents = task_exponents(task_grads, num_tasks)
  scales = jnp.ldexp(jnp.ones((num_tasks,), jnp.float32), -exponents)
  zeros = jnp.zeros((num_tasks, num_tasks), jnp.float32)
  high, low = zeros, zeros
  for leaf in jax.tree.leaves(task_grads):
    leaf_high, leaf_low = _scaled_leaf_gram_float32(_rows_of(leaf), scales, implementation)
    high, low = _add_compensated((high, low), leaf_high)
    low = low + leaf_low
  scaled = high + low
  norm_exponents = exponents + jnp.frexp(jnp.sqrt(jnp.maximum(jnp.diagonal(scaled), 0.0)))[1]
  active = jnp.diagonal(scaled) > 0
  largest = jnp.max(jnp.where(active, norm_exponents, jnp.iinfo(jnp.int32).min))
  largest = jnp.where(jnp.any(active), largest, 0)
  shifts = exponents - largest
  scaled = jnp.ldexp(scaled, shifts[:, None] + shifts[None, :])
  # A task whose squared norm underflowed is a zero task: no products with the others either.
  kept = jnp.diagonal(scaled) > 0
  return jnp.where(kept[:, None] & kept[None, :], scaled, 0.0)


def split_into_two_factors(coefficients: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
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


def _combine_in_xla(rows: jax.Array, scale_a: jax.Array, scale_b: jax.Array) -> jax.Array:
  """``sum_t (rows[t] * scale_a[t]) * scale_b[t]`` in the factors' dtype, rounded to the rows' dtype."""

  def term(task):
    return (rows[task].astype(scale_a.dtype) * scale_a[task]) * scale_b[task]

  combined = jax.lax.fori_loop(1, rows.shape[0], lambda task, total: total + term(task), term(0), unroll=8)
  return combined.astype(rows.dtype)


def _accumulation_dtype(dtype) -> Any:
  """float32, or the leaf's dtype where wider (no implicit promotion: strict mode must work)."""
  return jnp.dtype(dtype) if jnp.finfo(dtype).bits > 32 else jnp.dtype(jnp.float32)


def accumulation_dtypes(task_grads: Any) -> tuple:
  """The names of the dtypes the combine accumulates the leaves of ``task_grads`` in, sorted."""
  return tuple(sorted({_accumulation_dtype(leaf.dtype).name for leaf in jax.tree.leaves(task_grads)}))


def weight_factors(weights: jax.Array, dtypes: tuple) -> dict:
  """``{dtype name: (a, b)}`` with ``a * b`` the weights, in range for that accumulation dtype.

  The combine reads the weights through these factors only, so the solve
  may run in another dtype (float64 weights of tasks 1e40 apart in scale
  exceed float32's range although the update does not) and both modes of
  :mod:`gradops_jax._src.precision` hand the combine arrays of one type.
  """
  return {name: split_into_two_factors(weights, jnp.dtype(name)) for name in dtypes}


def combine_factors(task_grads: Any, factors: dict, implementation: str = "auto") -> Any:
  """:func:`combine` with the weights given as :func:`weight_factors`."""
  _check_implementation(implementation, COMBINE_IMPLEMENTATIONS)

  def combine_leaf(leaf):
    scale_a, scale_b = factors[_accumulation_dtype(leaf.dtype).name]
    if isinstance(leaf, JacobianRows):
      return PendingCombination((scale_a, scale_b), leaf.index, leaf.shape[1:], leaf.dtype)
    leaf = jnp.asarray(leaf)
    chosen = implementation
    if chosen == "auto":
      chosen = "xla" if _may_be_sharded(leaf) else "kernel"
    if chosen == "xla":
      return _combine_in_xla(leaf, scale_a, scale_b)
    rows = jnp.reshape(leaf, (leaf.shape[0], -1))
    return jnp.reshape(kernels.combine(rows, scale_a, scale_b, _combine_in_xla), leaf.shape[1:])

  return jax.tree.map(combine_leaf, task_grads)


def combine(task_grads: Any, weights: jax.Array, implementation: str = "auto") -> Any:
  r"""The linear combination :math:`\sum_k \beta_k g_k`, leaf by leaf.

  .. math::

    d = \sum_{k=1}^{T} (g_k\, a_k)\, b_k, \qquad a_k b_k = \beta_k

  with :math:`a_k` a power of two chosen so that neither factor leaves the
  accumulation dtype's range. Accumulates in float32 (or the leaf's dtype if
  wider), task after task, and rounds once to the leaf's dtype. The loop over
  tasks is a :func:`jax.lax.fori_loop` unrolled by 8, which XLA fuses into one
  elementwise pass per 8 tasks: the leaf is read once, no ``(T, D)``
  temporary is formed, and a sharded leaf is combined where it lies. On one
  CPU device, float32 and float64 leaves are combined by
  the C++ kernel instead (the same sum, with
  huge pages for the output). Must be called inside ``jax.enable_x64(True)``
  when ``coefficients`` is float64.

  Args:
    task_grads: pytree whose every leaf has shape ``(T, *shape)``.
    weights: ``(T,)`` combination weights :math:`\beta`.
    implementation: ``"auto"`` (XLA's loop for a leaf that may be sharded,
      else ``"kernel"``), ``"kernel"`` (the C++ kernel on CPU where it is
      available, else XLA) or ``"xla"``.

  Returns:
    A pytree with leaves of shape ``shape`` and the leaves' dtypes.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from gradops_jax import combine
    >>> grads = {'w': jnp.array([[1.0, 2.0], [3.0, 4.0]])}
    >>> combine(grads, jnp.array([1.0, 0.5]))['w'].tolist()
    [2.5, 4.0]
  """
  weights = jnp.asarray(weights)
  return combine_factors(task_grads, weight_factors(weights, accumulation_dtypes(task_grads)), implementation)
