r"""The two passes on CPU as small C++ kernels called through the XLA FFI: building and caching.

``csrc/gram.cc`` forms the float64 Gram matrix of a ``(T, D)`` array in
register tiles of task pairs; ``csrc/combine.cc`` forms
:math:`\sum_k (g_k a_k) b_k` task after task, rounded as written, and asks for
transparent huge pages for its output; both run their chunks on XLA's
thread pool (``csrc/chunk_runner.h``), so results do not depend on timing.
The library is compiled on first use with ``$CXX`` (else ``c++``) for the CPU
it runs on, cached under ``$GRADOPS_JAX_CACHE_DIR`` (default
``~/.cache/gradops_jax``), and lowered per platform, so GPU and TPU keep
XLA's passes. Without a compiler, after a failed build, or with
``GRADOPS_JAX_CPU_KERNEL=0``, both passes stay in XLA. Details in
``docs/design.md``.
"""

import ctypes
import functools
import hashlib
import logging
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile
import threading
from typing import Callable

import jax
import jax.numpy as jnp
import jaxlib

_SOURCES = tuple(pathlib.Path(__file__).parent / "csrc" / name for name in ("gram.cc", "combine.cc"))
_HEADERS = tuple(pathlib.Path(__file__).parent / "csrc" / name for name in ("chunk_runner.h",))
# (pass, dtype of the (T, D) input) -> (FFI target name, handler symbol in the library).
_HANDLERS = {
  ("gram", jnp.dtype(jnp.float32)): ("gradops_jax_gram_f32", "GramF32"),
  ("gram", jnp.dtype(jnp.float64)): ("gradops_jax_gram_f64", "GramF64"),
  ("combine", jnp.dtype(jnp.float32)): ("gradops_jax_combine_f32", "CombineF32"),
  ("combine", jnp.dtype(jnp.float64)): ("gradops_jax_combine_f64", "CombineF64"),
}
_FLAGS = ("-O3", "-std=c++17", "-ffp-contract=off", "-shared", "-fPIC")

logger = logging.getLogger(__name__)
_BUILD_LOCK = threading.Lock()
_REGISTERED: list = []  # the library whose handlers XLA calls, once registered


def _cache_dir() -> pathlib.Path:
  if "GRADOPS_JAX_CACHE_DIR" in os.environ:
    return pathlib.Path(os.environ["GRADOPS_JAX_CACHE_DIR"])
  base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
  return pathlib.Path(base) / "gradops_jax"


def _target_description(compiler: str, flags: tuple) -> str:
  """The compiler's own view of the target it builds for: its predefined macros.

  With ``-march=native`` these name the CPU's instruction sets (``__AVX2__``,
  ``__AVX512F__``, ...) as the compiler detects them, on every OS, so a
  cached build is never loaded on a CPU it was not compiled for.
  """
  macros = subprocess.run(
    [compiler, *(flag for flag in flags if flag.startswith(("-m", "-std"))), "-dM", "-E", "-x", "c++", os.devnull],
    capture_output=True,
    text=True,
    check=True,
    timeout=60,
  ).stdout
  return platform.machine() + "\n" + "\n".join(sorted(macros.splitlines()))


def _build(compiler: str, native: bool) -> pathlib.Path:
  """Compiles the kernels into the cache, unless a build for this setup is there."""
  flags = _FLAGS + (("-march=native",) if native else ())
  version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True, timeout=60).stdout
  key = hashlib.sha256(
    "\n".join(
      [
        *(path.read_text() for path in _SOURCES + _HEADERS),
        version,
        " ".join(flags),
        jaxlib.__version__,
        _target_description(compiler, flags),
      ]
    ).encode()
  ).hexdigest()[:20]
  library = _cache_dir() / f"cpu_kernels-{key}.so"
  if library.exists():
    return library
  library.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=library.parent) as scratch:
    built = pathlib.Path(scratch) / library.name
    subprocess.run(
      [compiler, *flags, "-isystem", jax.ffi.include_dir(), *map(str, _SOURCES), "-o", str(built)],
      capture_output=True,
      text=True,
      check=True,
      timeout=300,
    )
    os.replace(built, library)  # atomic: concurrent builds leave one whole file
  return library


@functools.cache
def available() -> bool:
  """Whether the kernels are built and registered (builds them on the first call).

  Returns:
    ``True`` when :func:`gram` and :func:`combine` will run the kernels on
    CPU, ``False`` when both passes stay in XLA (kernels turned off, no
    compiler, or a failed build; the log says which).

  Example:
    >>> from gradops_jax import kernels_available
    >>> isinstance(kernels_available(), bool)
    True
  """
  with _BUILD_LOCK:  # functools.cache alone may run this twice in two threads
    return _build_and_register()


def _build_and_register() -> bool:
  if os.environ.get("GRADOPS_JAX_CPU_KERNEL", "1") == "0":
    return False
  compiler = shutil.which(os.environ.get("CXX", "c++"))
  if compiler is None:
    logger.warning("gradops_jax: no C++ compiler found; the Gram and combine passes stay in XLA on CPU.")
    return False
  errors = []
  for native in (True, False):
    try:
      library = ctypes.CDLL(str(_build(compiler, native)))
    except (OSError, subprocess.SubprocessError) as error:
      errors.append(getattr(error, "stderr", None) or str(error))
      continue
    if not _REGISTERED:  # once per process; the list keeps the library loaded
      for target, symbol in _HANDLERS.values():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
      _REGISTERED.append(library)
    return True
  logger.warning(
    "gradops_jax: building the CPU kernels failed; the Gram and combine passes stay in XLA.\n%s",
    "\n".join(errors),
  )
  return False


def _kernel_gram(rows: jax.Array) -> jax.Array:
  num_tasks = rows.shape[0]
  target, _ = _HANDLERS["gram", rows.dtype]
  result = jax.ShapeDtypeStruct((num_tasks, num_tasks), jnp.float64)
  return jax.ffi.ffi_call(target, result, vmap_method="sequential")(rows)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _per_platform_gram(rows: jax.Array, fallback: Callable[[jax.Array], jax.Array]) -> jax.Array:
  return jax.lax.platform_dependent(rows, cpu=_kernel_gram, default=fallback)


@_per_platform_gram.defjvp
def _per_platform_gram_jvp(fallback, primals, tangents):
  (rows,), (tangent,) = primals, tangents
  rows64, tangent64 = rows.astype(jnp.float64), tangent.astype(jnp.float64)
  half = jnp.dot(tangent64, rows64.T, precision=jax.lax.Precision.HIGHEST)
  return _per_platform_gram(rows, fallback), half + half.T


def gram(rows: jax.Array, fallback: Callable[[jax.Array], jax.Array]) -> jax.Array:
  r"""Float64 Gram matrix :math:`R R^\top` of ``(T, D)`` rows: the kernel on CPU, else ``fallback``.

  .. math::

    K_{ij} = \sum_k r_{ik} r_{jk}

  The choice is made when the program is lowered, per platform
  (:func:`jax.lax.platform_dependent`), so one jitted function runs the
  kernel on CPU and ``fallback`` on GPU and TPU. ``fallback`` also runs on
  CPU for other dtypes and when the kernel is not :func:`available`. The
  derivative is that of the formula,
  :math:`\dot K = \dot R R^\top + R \dot R^\top`. Call it inside
  ``jax.enable_x64(True)``.

  Args:
    rows: a ``(T, D)`` array.
    fallback: the XLA computation of the same matrix.

  Returns:
    The ``(T, T)`` float64 Gram matrix.

  References:
    `The XLA FFI <https://docs.jax.dev/en/latest/ffi.html>`_.
  """
  if ("gram", rows.dtype) not in _HANDLERS or not available():
    return fallback(rows)
  return _per_platform_gram(rows, fallback)


def _kernel_combine(rows: jax.Array, scale_a: jax.Array, scale_b: jax.Array) -> jax.Array:
  target, _ = _HANDLERS["combine", rows.dtype]
  result = jax.ShapeDtypeStruct(rows.shape[1:], rows.dtype)
  return jax.ffi.ffi_call(target, result, vmap_method="sequential")(rows, scale_a, scale_b)


@functools.partial(jax.custom_jvp, nondiff_argnums=(3,))
def _per_platform_combine(rows, scale_a, scale_b, fallback):
  return jax.lax.platform_dependent(rows, scale_a, scale_b, cpu=_kernel_combine, default=fallback)


@_per_platform_combine.defjvp
def _per_platform_combine_jvp(fallback, primals, tangents):
  return _per_platform_combine(*primals, fallback), jax.jvp(fallback, primals, tangents)[1]


CombineFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def combine(rows: jax.Array, scale_a: jax.Array, scale_b: jax.Array, fallback: CombineFn) -> jax.Array:
  r"""The combination of ``(T, D)`` rows with coefficients ``a * b``: the kernel on CPU, else ``fallback``.

  .. math::

    d_k = \sum_{t=1}^{T} (r_{tk}\, a_t)\, b_t

  summed task after task in the rows' dtype, as
  :func:`gradops_jax.combine` does in XLA (its coefficients are split
  into two factors to stay in range). The choice is made per platform when
  the program is lowered, as for :func:`gram`; ``fallback`` also runs on CPU
  when the rows are not float32 or float64, when the factors have another
  dtype, and when the kernels are not :func:`available`. The derivative is
  that of ``fallback``.

  Args:
    rows: a ``(T, D)`` array.
    scale_a: ``(T,)`` first factors of the coefficients.
    scale_b: ``(T,)`` second factors.
    fallback: the XLA computation of the same ``(D,)`` vector.

  Returns:
    The ``(D,)`` combination, in the rows' dtype.

  References:
    `The XLA FFI <https://docs.jax.dev/en/latest/ffi.html>`_;
    `transparent huge pages <https://docs.kernel.org/admin-guide/mm/transhuge.html>`_.
  """
  same_dtype = scale_a.dtype == scale_b.dtype == rows.dtype
  if ("combine", rows.dtype) not in _HANDLERS or not same_dtype or not available():
    return fallback(rows, scale_a, scale_b)
  return _per_platform_combine(rows, scale_a, scale_b, fallback)
