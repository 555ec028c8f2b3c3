"""The CPU Gram kernel (gradops_jax/csrc/gram_kernel.cc) against a float64 NumPy Gram matrix."""

import logging
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gradops_jax import cpu_gram
from gradops_jax import gram as gram_lib

KERNEL_TARGETS = ("gradops_jax_gram_f32", "gradops_jax_gram_f64")


def _jitted_leaf_gram(leaf):
  """The leaf's Gram matrix; a NumPy float64 leaf stays float64 (x64 is on while it converts)."""
  with jax.enable_x64(True):
    return np.asarray(jax.jit(gram_lib.leaf_gram)(leaf))


def _calls_kernel(function, *args):
  with jax.enable_x64(True):
    text = jax.jit(function).lower(*args).as_text()
  return any(target in text for target in KERNEL_TARGETS)


def _assert_exact(gram, rows):
  """Within float64 summation error of |g_i| |g_j| (Cauchy-Schwarz) of the exact Gram matrix."""
  rows = np.asarray(rows, np.float64)
  norms = np.linalg.norm(rows, axis=1)
  bound = 1e-13 * np.outer(norms, norms) + 1e-300
  np.testing.assert_array_less(np.abs(gram - rows @ rows.T), bound)
  np.testing.assert_array_equal(gram, gram.T)


@pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler on this machine")
def test_kernel_is_built_and_used_on_cpu():
  assert cpu_gram.available()
  leaf = jnp.ones((3, 10, 10), jnp.float32)
  assert _calls_kernel(gram_lib.leaf_gram, leaf)
  assert _calls_kernel(gram_lib.leaf_gram, np.ones((3, 100), np.float64))


def test_other_dtypes_stay_in_xla():
  leaf = jnp.ones((3, 100), jnp.bfloat16)
  assert not _calls_kernel(gram_lib.leaf_gram, leaf)
  np.testing.assert_array_equal(_jitted_leaf_gram(leaf), np.full((3, 3), 100.0))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("num_tasks", [1, 2, 3, 4, 5, 6, 7, 8, 13, 64])
@pytest.mark.parametrize("size", [0, 1, 7, 1031, 300_007])
def test_kernel_matches_float64_numpy(dtype, num_tasks, size):
  """Every tile layout, block tails and multi-chunk sizes.

  T <= 4: one tile of T rows; 5, 6 and 13: tiles of 3 (5 and 13 padded with a zero row, 6 not);
  7, 8 and 64: tiles of 4 (7 padded). Sizes not a multiple of the vector width have column tails.
  """
  rng = np.random.default_rng(num_tasks * 1000 + size)
  rows = rng.standard_normal((num_tasks, size)).astype(dtype)
  _assert_exact(_jitted_leaf_gram(rows), rows)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_kernel_keeps_scales_from_1e_minus_20_to_1e20(dtype):
  rng = np.random.default_rng(3)
  scales = np.array([1e-20, 1e-10, 1.0, 1e10, 1e20])[:, None]
  rows = (rng.standard_normal((5, 50_001)) * scales).astype(dtype)
  _assert_exact(_jitted_leaf_gram(rows), rows)


def test_opposite_duplicate_and_zero_tasks_are_exact():
  rng = np.random.default_rng(4)
  task = rng.standard_normal(100_003).astype(np.float32)
  rows = np.stack([task, -task, task, np.zeros_like(task), 3 * task])
  gram = _jitted_leaf_gram(rows)
  _assert_exact(gram, rows)
  np.testing.assert_array_equal(gram[3], 0.0)
  np.testing.assert_array_equal(gram[0, 1], -gram[0, 0])


def test_kernel_result_does_not_depend_on_scheduling():
  """Chunks depend only on the shape, so repeated calls agree to the last bit."""
  rows = jnp.asarray(np.random.default_rng(6).standard_normal((8, 2_000_003)), jnp.float32)
  first = _jitted_leaf_gram(rows)
  for _ in range(5):
    np.testing.assert_array_equal(_jitted_leaf_gram(rows), first)


def test_kernel_under_vmap_and_grad_matches_xla():
  rng = np.random.default_rng(7)
  batch = jnp.asarray(rng.standard_normal((2, 3, 4, 500)), jnp.float32)
  weights = jnp.asarray(rng.standard_normal((3, 3)))
  xla_gram = lambda leaf: gram_lib._scanned_gram(jnp.reshape(leaf, (leaf.shape[0], -1)))

  def loss(leaf, form):
    return jnp.sum(form(leaf) * weights)

  with jax.enable_x64(True):
    vmapped = jax.jit(jax.vmap(gram_lib.leaf_gram))(batch)
    expected = jax.vmap(xla_gram)(batch)
    gradient = jax.jit(jax.grad(loss), static_argnums=1)(batch[0], gram_lib.leaf_gram)
    expected_gradient = jax.grad(loss)(batch[0], xla_gram)
  np.testing.assert_allclose(vmapped, expected, rtol=1e-13)
  np.testing.assert_allclose(gradient, expected_gradient, rtol=1e-6)


@pytest.mark.parametrize(
    "environment, expected_log",
    [
        ({"GRADOPS_JAX_CPU_KERNEL": "0"}, None),
        ({"CXX": "/nonexistent/c++"}, "no C++ compiler"),
        ({"CXX": "false"}, "building the CPU Gram kernel failed"),
    ],
)
def test_without_the_kernel_the_gram_pass_stays_in_xla(
    monkeypatch, caplog, tmp_path, environment, expected_log
):
  monkeypatch.setenv("GRADOPS_JAX_CACHE_DIR", str(tmp_path))
  for name, value in environment.items():
    monkeypatch.setenv(name, value)
  with caplog.at_level(logging.WARNING, logger="gradops_jax.cpu_gram"):
    assert not cpu_gram.available.__wrapped__()
  if expected_log is None:
    assert not caplog.records
  else:
    assert expected_log in caplog.text
  assert not list(tmp_path.iterdir())  # no half-written library left behind
