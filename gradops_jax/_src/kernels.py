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
import json
import logging
import os
import pathlib
import platform
import shlex
import shutil
import signal
import stat
import subprocess
import tempfile
import threading
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import jaxlib
from jax._src import config as jax_config  # bool_state: a flag that JAX keys its caches on

from gradops_jax._src import manual_axes

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
# A JAX configuration state, so that it is part of the jit cache key: a function traced once with
# the kernels and once without gets two programs, not the first one twice.
_KERNELS_ENABLED = jax_config.bool_state(
  "gradops_jax_cpu_kernels",
  True,
  help="Whether gradops_jax's Gram and combine passes call their C++ CPU kernels.",
  include_in_jit_key=True,
  include_in_trace_context=True,
)


def kernels_disabled():
  """Traces the Gram and combine passes with XLA only: no C++ custom call in the program.

  Use it around :func:`jax.export.export` (which refuses custom calls without
  compatibility guarantees), or to compile a program that must run where the
  kernels cannot be built. The setting is part of JAX's jit cache key, so a
  function traced here gets its own program even if it was traced with the
  kernels before. ``jax.config.update("gradops_jax_cpu_kernels", False)``
  sets it globally.

  Example:
    >>> import jax, jax.numpy as jnp, gradops_jax
    >>> tx = gradops_jax.scale_by_gradops(2)
    >>> params = {'w': jnp.zeros(3)}
    >>> with gradops_jax.kernels_disabled():
    ...   text = jax.jit(tx.update).lower({'w': jnp.ones((2, 3))}, tx.init(params)).as_text()
    >>> 'gradops_jax_gram' in text
    False
  """
  return _KERNELS_ENABLED(False)


def _cache_dir() -> pathlib.Path:
  if "GRADOPS_JAX_CACHE_DIR" in os.environ:
    return pathlib.Path(os.environ["GRADOPS_JAX_CACHE_DIR"])
  base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
  return pathlib.Path(base) / "gradops_jax"


def _target_description(compiler: Sequence[str], flags: tuple) -> str:
  """The compiler's own view of the target it builds for: its predefined macros.

  With ``-march=native`` these name the CPU's instruction sets (``__AVX2__``,
  ``__AVX512F__``, ...) as the compiler detects them, on every OS, so a
  cached build is never loaded on a CPU it was not compiled for.
  """
  macros = _run_bounded(
    [*compiler, *(flag for flag in flags if flag.startswith(("-m", "-std"))), "-dM", "-E", "-x", "c++", os.devnull],
    _BUILD_TIMEOUT_SECONDS,
  )
  return platform.machine() + "\n" + "\n".join(sorted(macros.splitlines()))


# Bound on one compiler run: a build takes seconds; a hung compiler must not stall the first trace.
_BUILD_TIMEOUT_SECONDS = float(os.environ.get("GRADOPS_JAX_BUILD_TIMEOUT", "60"))


class _BuildTimeout(Exception):
  pass


def _run_bounded(command: list, timeout: float) -> str:
  """Runs ``command`` in its own process group; on timeout kills the whole group (no orphans)."""
  process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
  try:
    stdout, stderr = process.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    os.killpg(process.pid, signal.SIGKILL)
    process.communicate()
    raise _BuildTimeout(f"{command[0]} did not finish within {timeout:g} s; it was killed") from None
  if process.returncode != 0:
    raise subprocess.CalledProcessError(process.returncode, command, stdout, stderr)
  return stdout


def _compiler_command() -> list:
  """``$CXX`` (else ``c++``) as a command line: ``CXX="ccache g++"`` is a launcher and a compiler."""
  words = shlex.split(os.environ.get("CXX", "c++"))
  if not words:
    return []
  resolved = shutil.which(words[0])
  return [] if resolved is None else [resolved, *words[1:]]


def _check_trusted(path: pathlib.Path) -> None:
  """Refuses a cache directory or file that others could have written: owned by someone else, or
  group- or world-writable. Loading a library runs its code in this process."""
  info = path.stat()
  if info.st_uid != os.getuid() or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
    raise PermissionError(
      f"{path} is not owned by this user or is writable by others (mode {stat.filemode(info.st_mode)}); "
      "refusing to load a kernel library from it. Set GRADOPS_JAX_CACHE_DIR to a private directory."
    )


def _digest(path: pathlib.Path) -> str:
  return hashlib.sha256(path.read_bytes()).hexdigest()


def _write_durably(path: pathlib.Path, data: bytes) -> None:
  """Writes ``data`` to ``path`` atomically and durably: temporary file, fsync, rename, fsync the directory."""
  temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
  with open(temporary, "wb") as file:
    file.write(data)
    file.flush()
    os.fsync(file.fileno())
  os.replace(temporary, path)
  directory = os.open(path.parent, os.O_RDONLY)
  try:
    os.fsync(directory)
  finally:
    os.close(directory)


def _verified(library: pathlib.Path) -> bool:
  """Whether the cached library is the whole file this package wrote: recorded size and hash.

  A truncated library (a short copy, a crash before the data reached the disk) would crash the
  process when loaded; a different or empty file at the cached path must not be loaded either.
  """
  manifest = library.with_suffix(".json")
  try:
    recorded = json.loads(manifest.read_text())
    _check_trusted(library)
    return library.stat().st_size == recorded["size"] and _digest(library) == recorded["sha256"]
  except (OSError, ValueError, KeyError, TypeError):
    return False


@functools.cache
def _library_key(compiler: tuple, flags: tuple) -> str:
  """The cache key of a build: asks the compiler twice, so it is worked out once per process."""
  version = _run_bounded([*compiler, "--version"], _BUILD_TIMEOUT_SECONDS)
  return hashlib.sha256(
    "\n".join(
      [
        *(path.read_text() for path in _SOURCES + _HEADERS),
        " ".join(compiler),
        version,
        " ".join(flags),
        jaxlib.__version__,
        _target_description(compiler, flags),
      ]
    ).encode()
  ).hexdigest()[:20]


def _build(compiler: list, native: bool, build: bool = True) -> Optional[pathlib.Path]:
  """Compiles the kernels into the cache, unless a verified build for this setup is there.

  With ``build=False``, returns the verified cached library or ``None``.
  """
  flags = _FLAGS + (("-march=native",) if native else ())
  key = _library_key(tuple(compiler), flags)
  directory = _cache_dir()
  directory.mkdir(parents=True, exist_ok=True, mode=0o700)
  _check_trusted(directory)
  library = directory / f"cpu_kernels-{key}.so"
  failed = library.with_suffix(".failed")
  if failed.exists():  # this compiler and these flags made a library that does not load: do not retry
    raise OSError(failed.read_text())
  if _verified(library):
    return library
  if not build:
    return None
  with tempfile.TemporaryDirectory(dir=directory) as scratch:
    built = pathlib.Path(scratch) / library.name
    _run_bounded(
      [*compiler, *flags, "-isystem", jax.ffi.include_dir(), *map(str, _SOURCES), "-o", str(built)],
      _BUILD_TIMEOUT_SECONDS,
    )
    try:
      handle = ctypes.CDLL(str(built))
      for _, symbol in _HANDLERS.values():
        getattr(handle, symbol)
    except (OSError, AttributeError) as error:
      _write_durably(failed, f"the library built by {' '.join(compiler)} does not load: {error}".encode())
      raise OSError(failed.read_text()) from error
    data = built.read_bytes()
  _write_durably(library, data)
  _write_durably(
    library.with_suffix(".json"), json.dumps({"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}).encode()
  )
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
  compiler = _compiler_command()
  if not compiler:
    logger.warning(
      "gradops_jax: no C++ compiler found (CXX=%r); the Gram and combine passes stay in XLA on CPU.",
      os.environ.get("CXX", "c++"),
    )
    return False
  errors = []
  for native in (True, False):
    try:
      path = _build(compiler, native)
      assert path is not None
      library = ctypes.CDLL(str(path))
      handlers = [(target, getattr(library, symbol)) for target, symbol in _HANDLERS.values()]
    except _BuildTimeout as error:
      errors.append(str(error))
      break  # the second build would hang the same way
    except (OSError, AttributeError, subprocess.SubprocessError) as error:
      errors.append(getattr(error, "stderr", None) or str(error))
      continue
    if not _REGISTERED:  # once per process; the list keeps the library loaded
      for target, handler in handlers:
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(handler), platform="cpu")
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
  return manual_axes.varying_like(jax.ffi.ffi_call(target, result, vmap_method="sequential")(rows), rows)


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
  if ("gram", rows.dtype) not in _HANDLERS or not _KERNELS_ENABLED.value or not available():
    return fallback(rows)
  return _per_platform_gram(rows, fallback)


def _kernel_combine(rows: jax.Array, scale_a: jax.Array, scale_b: jax.Array) -> jax.Array:
  target, _ = _HANDLERS["combine", rows.dtype]
  result = jax.ShapeDtypeStruct(rows.shape[1:], rows.dtype)
  combined = jax.ffi.ffi_call(target, result, vmap_method="sequential")(rows, scale_a, scale_b)
  return manual_axes.varying_like(combined, rows, scale_a, scale_b)


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
  if ("combine", rows.dtype) not in _HANDLERS or not same_dtype or not _KERNELS_ENABLED.value or not available():
    return fallback(rows, scale_a, scale_b)
  return _per_platform_combine(rows, scale_a, scale_b, fallback)


def register_cached() -> None:
  """Registers the handlers of an already built, verified library, without building one.

  Called when the package is imported, so that an executable serialized with
  the kernels (``jax.experimental.serialize_executable``) runs in a new
  process that imports :mod:`gradops_jax`. Never compiles and never raises.
  """
  if os.environ.get("GRADOPS_JAX_CPU_KERNEL", "1") == "0" or _REGISTERED:
    return
  try:
    compiler = _compiler_command()
    path = _build(compiler, native=True, build=False) if compiler else None
    if path is not None:
      available()
  except Exception:  # a cache that cannot be used now is diagnosed on first use
    logger.debug("gradops_jax: no cached kernel registered at import", exc_info=True)
