"""The kernel cache survives corrupt files, hanging or odd compilers and untrusted directories.

Each scenario runs in a fresh process (a truncated library used to crash the
process that loaded it) with a stand-in compiler that copies a real build, so
no scenario compiles C++ itself.
"""

import os
import pathlib
import stat
import subprocess
import sys
import time

import pytest

from gradops_jax._src import kernels

FAKE_COMPILER = """#!/bin/sh
# A stand-in C++ compiler: --version, the predefined macros, or "-o OUT" (copies $REAL_LIBRARY).
[ "$1" = "--version" ] && { echo "stand-in 1.0"; exit 0; }
for arg in "$@"; do [ "$arg" = "-dM" ] && { echo "#define __STAND_IN__ 1"; exit 0; }; done
out=""; previous=""
for arg in "$@"; do [ "$previous" = "-o" ] && out="$arg"; previous="$arg"; done
echo run >> "$COUNT_FILE"
[ -n "$HANG" ] && sleep 600
cp "$REAL_LIBRARY" "$out"
"""


@pytest.fixture(scope="module")
def real_library():
  """The library this process uses (built once for the whole run), copied by the stand-in compiler."""
  if not kernels.available():
    pytest.skip("no C++ compiler, or kernels turned off")
  return kernels._build(kernels._compiler_command(), native=True, build=False)


@pytest.fixture
def setup(tmp_path, real_library):
  compiler = tmp_path / "fake-c++"
  compiler.write_text(FAKE_COMPILER)
  compiler.chmod(0o755)
  cache = tmp_path / "cache"
  env = dict(
    os.environ,
    CXX=str(compiler),
    GRADOPS_JAX_CACHE_DIR=str(cache),
    REAL_LIBRARY=str(real_library),
    COUNT_FILE=str(tmp_path / "count"),
    JAX_PLATFORMS="cpu",
  )
  env.pop("GRADOPS_JAX_CPU_KERNEL", None)
  return env, cache, tmp_path / "count"


def _available(env, timeout=120):
  result = subprocess.run(
    [sys.executable, "-c", "from gradops_jax._src import kernels; print(kernels.available())"],
    env=env,
    capture_output=True,
    text=True,
    timeout=timeout,
  )
  assert result.returncode == 0, result.stderr[-2000:]
  return result.stdout.strip().splitlines()[-1] == "True", result.stderr


def _library(cache):
  (library,) = cache.glob("cpu_kernels-*.so")
  return library


@pytest.mark.parametrize("corruption", ["truncated", "empty", "other_library"])
def test_a_corrupt_cached_library_is_rebuilt_never_loaded(setup, real_library, corruption):
  env, cache, _ = setup
  assert _available(env)[0]
  library = _library(cache)
  if corruption == "truncated":
    with open(library, "r+b") as file:
      file.truncate(100_000)
  elif corruption == "empty":
    library.write_bytes(b"")
  else:
    import ctypes.util

    other = pathlib.Path(ctypes.util.find_library("m") or "/lib/x86_64-linux-gnu/libm.so.6")
    candidates = [p for p in (other, pathlib.Path("/lib/x86_64-linux-gnu/libm.so.6")) if p.exists()]
    if not candidates:
      pytest.skip("no other shared library to plant")
    library.write_bytes(candidates[0].resolve().read_bytes())
  assert _available(env)[0]
  assert library.read_bytes() == real_library.read_bytes()


def test_a_hanging_compiler_is_killed_within_the_bound(setup):
  env, cache, _ = setup
  env.update(HANG="1", GRADOPS_JAX_BUILD_TIMEOUT="2")
  start = time.monotonic()
  ok, log = _available(env)
  assert not ok and "did not finish within 2 s" in log
  assert time.monotonic() - start < 30
  leftover = subprocess.run(["pgrep", "-f", "sleep 600"], capture_output=True, text=True).stdout
  assert not leftover.strip(), "an orphaned compiler process was left running"


def test_cxx_with_arguments_is_a_command_line(setup):
  env, cache, _ = setup
  env["CXX"] = f"env GRADOPS_JAX_LAUNCHER=1 {env['CXX']}"  # a launcher before the compiler, like ccache
  assert _available(env)[0]


def test_an_unloadable_build_is_not_retried_on_every_run(setup, tmp_path):
  env, cache, count = setup
  (tmp_path / "not_a_library").write_text("not a shared library")
  env["REAL_LIBRARY"] = str(tmp_path / "not_a_library")
  ok, log = _available(env)
  assert not ok and "does not load" in log
  runs = count.read_text().count("run")
  assert not _available(env)[0]
  assert count.read_text().count("run") == runs  # the failure was recorded, not rebuilt
  assert not list(cache.glob("*.so"))  # and no unloadable library was cached


def test_a_cache_others_can_write_is_refused(setup):
  env, cache, _ = setup
  cache.mkdir(mode=0o700)
  cache.chmod(0o777)
  ok, log = _available(env)
  assert not ok and "writable by others" in log
  assert not list(cache.glob("*.so"))
  cache.chmod(0o700)
  assert _available(env)[0]
  _library(cache).chmod(0o666)
  ok, _ = _available(env)  # a group/world-writable library is not loaded: rebuilt over it
  assert ok and not (_library(cache).stat().st_mode & (stat.S_IWGRP | stat.S_IWOTH))


def test_export_works_with_the_kernels_disabled_in_code():
  import jax
  import jax.numpy as jnp

  import gradops_jax

  tx = gradops_jax.scale_by_gradops(2)
  params = {"w": jnp.zeros(5)}
  grads = {"w": jnp.asarray([[1.0, 0.0, 2.0, 0.0, 1.0], [-1.0, 1.0, 0.0, 3.0, 0.0]])}
  expected, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  with gradops_jax.kernels_disabled():
    exported = jax.export.export(jax.jit(tx.update))(grads, tx.init(params), params)
  assert "gradops_jax_" not in exported.mlir_module()
  updates, _ = exported.call(grads, tx.init(params), params)
  import numpy as np

  np.testing.assert_allclose(updates["w"], expected["w"], rtol=1e-6)


SERIALIZE = """
import pickle, sys, jax, jax.numpy as jnp
from jax.experimental import serialize_executable
import gradops_jax
tx = gradops_jax.scale_by_gradops(2)
params = {"w": jnp.zeros(5)}
grads = {"w": jnp.asarray([[1.0, 0.0, 2.0, 0.0, 1.0], [-1.0, 1.0, 0.0, 3.0, 0.0]])}
compiled = jax.jit(tx.update).lower(grads, tx.init(params), params).compile()
assert "gradops_jax_gram" in compiled.as_text()
payload = serialize_executable.serialize(compiled)
pickle.dump((payload, compiled(grads, tx.init(params), params)[0]["w"].tolist()), open(sys.argv[1], "wb"))
"""

LOAD = """
import pickle, sys, jax, jax.numpy as jnp, numpy as np
from jax.experimental import serialize_executable
import gradops_jax  # registers the cached kernels' handlers
tx = gradops_jax.scale_by_gradops(2)
params = {"w": jnp.zeros(5)}
grads = {"w": jnp.asarray([[1.0, 0.0, 2.0, 0.0, 1.0], [-1.0, 1.0, 0.0, 3.0, 0.0]])}
# JAX registers its own LAPACK handlers on first use: a fresh process must use them once before it
# loads an executable that calls them (a JAX limitation, not this package's).
jnp.linalg.eigh(jnp.eye(2)); jnp.linalg.cholesky(jnp.eye(2)); jnp.linalg.pinv(jnp.eye(2))
(payload, in_tree, out_tree), expected = pickle.load(open(sys.argv[1], "rb"))
loaded = serialize_executable.deserialize_and_load(payload, in_tree, out_tree)
np.testing.assert_allclose(loaded(grads, tx.init(params), params)[0]["w"], expected, rtol=1e-6)
print("ok")
"""


def test_a_serialized_executable_runs_in_a_new_process(tmp_path):
  if not kernels.available():
    pytest.skip("kernels not available")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  for script in (SERIALIZE, LOAD):
    result = subprocess.run(
      [sys.executable, "-c", script, str(tmp_path / "executable.pkl")],
      env=env,
      capture_output=True,
      text=True,
      timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.strip().endswith("ok")
