r"""Which arithmetic the T x T work runs in: float64 in a local scope, or float32 throughout.

Every transform takes ``precision``:

* ``"float64"``: the Gram matrix, the solve and the weights in float64,
  inside a local ``jax.enable_x64(True)`` scope (:func:`in_float64`). The
  most accurate mode, and the fastest on CPU, where the C++ kernel forms the
  float64 Gram matrix.
* ``"float32"``: no float64 anywhere in the compiled program, for TPUs and
  other backends without native float64 (:func:`in_float32`). The Gram pass
  scales each task by a power of two and adds its blocks with compensated
  float32 sums (:func:`gradops_jax._src.passes.task_gram_float32`); the
  tolerances follow float32's resolution (:mod:`gradops_jax._src.tolerances`).
* ``"auto"`` (the default): ``"float64"`` on the platforms that run float64
  natively (:data:`FLOAT64_PLATFORMS`), ``"float32"`` elsewhere, chosen by
  :func:`jax.lax.platform_dependent` when the program is lowered, so one
  jitted function serves every platform.

The accuracy of the two modes, and what changes for nearly collinear tasks,
is in ``docs/precision.md``.
"""

import functools
from typing import Any, Callable

import jax
import numpy as np

from gradops_jax._src import forward_only

PRECISIONS = ("auto", "float64", "float32")
# Platforms whose float64 is native hardware arithmetic; TPUs emulate it (or refuse it).
FLOAT64_PLATFORMS = ("cpu", "cuda", "rocm")


def check_precision(precision: Any) -> str:
  """``precision`` if it is one of :data:`PRECISIONS`, else a :class:`ValueError`."""
  if not isinstance(precision, str) or precision not in PRECISIONS:
    raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}.")
  return precision


def is_array(leaf: Any) -> bool:
  return isinstance(leaf, (jax.Array, np.ndarray, np.generic))


def holds_tracer(tree: Any) -> bool:
  return any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(tree))


def _forward_only(fn: Callable[..., Any], reverse_mode: bool, scoped_jvp: Callable[..., Any]) -> Callable[..., Any]:
  """``fn`` as a :func:`jax.custom_jvp` whose rule is ``scoped_jvp``, guarded when ``reverse_mode=False``."""
  differentiable = jax.custom_jvp(fn)

  @differentiable.defjvp
  def jvp(primals, tangents):
    out, out_tangents = scoped_jvp(primals, tangents)
    if not reverse_mode:
      out_tangents = forward_only.guard_tangents(out_tangents, "a gradops_jax aggregator")
    return out, out_tangents

  return differentiable


def in_float64(fn: Callable[..., Any], closes_over: Any = (), reverse_mode: bool = True) -> Callable[..., Any]:
  """``fn`` run inside ``jax.enable_x64(True)``, also when a ``vmap`` or a JVP reaches it later.

  ``jax.vmap`` around a ``lax.scan`` (or ``while_loop``, ``fori_loop``,
  ``lax.map``) does not call the loop body again: it batches the body's
  already traced program, outside the local x64 scope, where the float64
  constants of the solvers no longer type-check. So ``fn`` is a
  :func:`jax.custom_batching.custom_vmap` whose batching rule traces it afresh
  inside the scope, and a :func:`jax.custom_jvp` whose rule differentiates it
  inside the scope (JAX would otherwise trace the JVP rules of the passes
  lazily, after the scope has closed).

  A ``custom_vmap`` function may not close over traced values, so ``fn`` runs
  as it is (inside the scope, but re-batched like any traced program) when
  ``closes_over`` (the values ``fn`` reads besides its arguments, such as
  hyperparameters) holds a tracer, or when the arguments are not all arrays
  (the Gramian engine's leaves).

  With ``reverse_mode=False``, reverse-mode differentiation raises a
  :class:`TypeError` that names forward mode
  (:func:`gradops_jax._src.forward_only.guard_tangents`) instead of failing
  inside JAX; forward mode is unchanged.
  """

  def scoped(*args):
    with jax.enable_x64(True):
      return fn(*args)

  batchable = jax.custom_batching.custom_vmap(scoped)

  @batchable.def_vmap
  def batched(axis_size, in_batched, *args):
    del axis_size
    in_axes = jax.tree.map(lambda is_batched: 0 if is_batched else None, tuple(in_batched))
    out = jax.vmap(scoped, in_axes=in_axes)(*args)
    return out, jax.tree.map(lambda _: True, out)

  def scoped_jvp(primals, tangents):
    with jax.enable_x64(True):
      return jax.jvp(scoped, primals, tangents)

  differentiable = _forward_only(batchable, reverse_mode, scoped_jvp)

  def run(*args):
    arrays = all(is_array(leaf) for leaf in jax.tree.leaves(args))
    return differentiable(*args) if args and arrays and not holds_tracer(closes_over) else scoped(*args)

  return run


def in_float32(fn: Callable[..., Any], closes_over: Any = (), reverse_mode: bool = True) -> Callable[..., Any]:
  """``fn`` as it is (no scope, so ``vmap`` and JVPs reach it like any function), guarded like :func:`in_float64`.

  With ``reverse_mode=False`` and array arguments, ``fn`` is a
  :func:`jax.custom_jvp` whose tangents raise the forward-mode error when
  transposed; with traced hyperparameters or the Gramian engine's leaves it
  runs as it is.
  """
  differentiable = _forward_only(fn, reverse_mode, lambda primals, tangents: jax.jvp(fn, primals, tangents))

  def run(*args):
    arrays = all(is_array(leaf) for leaf in jax.tree.leaves(args))
    guarded = args and not reverse_mode and arrays and not holds_tracer(closes_over)
    return differentiable(*args) if guarded else fn(*args)

  return run


def run(
  precision: str,
  fn: Callable[..., Any],
  args: tuple,
  closes_over: Any = (),
  reverse_mode: bool = True,
) -> Any:
  """``fn(float64, *args)`` in the arithmetic ``precision`` names.

  Args:
    precision: one of :data:`PRECISIONS`.
    fn: ``fn(float64: bool, *args)``, returning arrays of the same types for
      both values of ``float64``.
    args: its arguments (pytrees; the Gramian engine's leaves are passed by
      closure to the platform branches of ``"auto"``).
    closes_over: the values ``fn`` reads besides its arguments.
    reverse_mode: as for :func:`in_float64`.

  Returns:
    ``fn``'s result. With ``"auto"``, both modes are traced and the one for
    the platform is kept when the program is lowered.
  """
  wide = in_float64(functools.partial(fn, True), closes_over, reverse_mode)
  narrow = in_float32(functools.partial(fn, False), closes_over, reverse_mode)
  if precision == "float64":
    return wide(*args)
  if precision == "float32":
    return narrow(*args)
  branches = {platform: (lambda: wide(*args)) for platform in FLOAT64_PLATFORMS}
  return jax.lax.platform_dependent(**branches, default=lambda: narrow(*args))
