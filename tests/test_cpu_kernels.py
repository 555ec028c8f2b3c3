"""The CPU kernels (gradops_jax/_src/csrc/) against float64 NumPy: the Gram matrix and the combine."""

import logging
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gradops_jax

# White-box: the factor split that the kernel and XLA share, and the build itself.
from gradops_jax._src import kernels as cpu_kernels
from gradops_jax._src.passes import split_into_two_factors

GRAM_TARGETS = ("gradops_jax_gram_f32", "gradops_jax_gram_f64")
COMBINE_TARGETS = ("gradops_jax_combine_f32", "gradops_jax_combine_f64")
needs_compiler = pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler on this machine")


def _jitted_leaf_gram(leaf):
  """The leaf's Gram matrix; a NumPy float64 leaf stays float64 (x64 is on while it converts)."""
  with jax.enable_x64(True):
    return np.asarray(jax.jit(gradops_jax.leaf_gram)(leaf))


def _calls_kernel(function, *args, targets=GRAM_TARGETS):
  with jax.enable_x64(True):
    text = jax.jit(function).lower(*args).as_text()
  return any(target in text for target in targets)


def _jitted_combine(leaf, coefficients):
  """``sum_k coefficients[k] * leaf[k]`` by gram.combine, as the aggregators call it."""
  with jax.enable_x64(True):
    return np.asarray(jax.jit(gradops_jax.combine)({"w": leaf}, coefficients)["w"])


def _assert_combination_exact(combined, rows, coefficients):
  """Within the summation error of T terms in the rows' dtype, relative to the terms' sizes."""
  rows = np.asarray(rows, np.float64)
  terms = np.abs(np.asarray(coefficients, np.float64)[:, None] * rows)
  bound = 2 * (len(rows) + 1) * np.finfo(combined.dtype).eps * terms.sum(axis=0)
  expected = np.asarray(coefficients, np.float64) @ rows
  np.testing.assert_array_less(np.abs(np.asarray(combined, np.float64) - expected), bound + 1e-300)


def _assert_exact(gram, rows):
  """Within float64 summation error of |g_i| |g_j| (Cauchy-Schwarz) of the exact Gram matrix."""
  rows = np.asarray(rows, np.float64)
  norms = np.linalg.norm(rows, axis=1)
  bound = 1e-13 * np.outer(norms, norms) + 1e-300
  np.testing.assert_array_less(np.abs(gram - rows @ rows.T), bound)
  np.testing.assert_array_equal(gram, gram.T)


@needs_compiler
def test_kernel_is_built_and_used_on_cpu():
  assert cpu_kernels.available()
  leaf = jnp.ones((3, 10, 10), jnp.float32)
  assert _calls_kernel(gradops_jax.leaf_gram, leaf)
  assert _calls_kernel(gradops_jax.leaf_gram, np.ones((3, 100), np.float64))
  coefficients = np.ones(3)
  assert _calls_kernel(gradops_jax.combine, {"w": leaf}, coefficients, targets=COMBINE_TARGETS)
  assert _calls_kernel(gradops_jax.combine, {"w": np.ones((3, 100))}, coefficients, targets=COMBINE_TARGETS)


def test_other_dtypes_stay_in_xla():
  leaf = jnp.ones((3, 100), jnp.bfloat16)
  assert not _calls_kernel(gradops_jax.leaf_gram, leaf)
  np.testing.assert_array_equal(_jitted_leaf_gram(leaf), np.full((3, 3), 100.0))
  assert not _calls_kernel(gradops_jax.combine, {"w": leaf}, np.ones(3), targets=COMBINE_TARGETS)
  np.testing.assert_array_equal(_jitted_combine(leaf, np.ones(3)), np.full(100, 3.0))


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
  xla_gram = lambda leaf: gradops_jax.leaf_gram(leaf, implementation="scan")

  def loss(leaf, form):
    return jnp.sum(form(leaf) * weights)

  with jax.enable_x64(True):
    vmapped = jax.jit(jax.vmap(gradops_jax.leaf_gram))(batch)
    expected = jax.vmap(xla_gram)(batch)
    gradient = jax.jit(jax.grad(loss), static_argnums=1)(batch[0], gradops_jax.leaf_gram)
    expected_gradient = jax.grad(loss)(batch[0], xla_gram)
  np.testing.assert_allclose(vmapped, expected, rtol=1e-13)
  np.testing.assert_allclose(gradient, expected_gradient, rtol=1e-6)


@pytest.mark.parametrize(
  "environment, expected_log",
  [
    ({"GRADOPS_JAX_CPU_KERNEL": "0"}, None),
    ({"CXX": "/nonexistent/c++"}, "no C++ compiler"),
    ({"CXX": "false"}, "building the CPU kernels failed"),
  ],
)
def test_without_the_kernels_both_passes_stay_in_xla(monkeypatch, caplog, tmp_path, environment, expected_log):
  monkeypatch.setenv("GRADOPS_JAX_CACHE_DIR", str(tmp_path))
  for name, value in environment.items():
    monkeypatch.setenv(name, value)
  with caplog.at_level(logging.WARNING, logger="gradops_jax._src.kernels"):
    assert not cpu_kernels.available.__wrapped__()
  if expected_log is None:
    assert not caplog.records
  else:
    assert expected_log in caplog.text
  assert not list(tmp_path.iterdir())  # no half-written library left behind


def _sequential_combination(rows, coefficients):
  """The combine's arithmetic, literally: ``(g_k * a_k) * b_k`` added task after task in the rows' dtype."""
  with jax.enable_x64(True):
    factors = split_into_two_factors(jnp.asarray(coefficients), rows.dtype)
  scale_a, scale_b = (np.asarray(factor) for factor in factors)
  total = (rows[0] * scale_a[0]) * scale_b[0]
  for task in range(1, len(rows)):
    total = total + (rows[task] * scale_a[task]) * scale_b[task]
  return total


@needs_compiler
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
  "num_tasks, size",
  [
    (num_tasks, size)
    for num_tasks in (1, 2, 3, 5, 8, 13, 64)
    for size in (0, 1, 7, 1031, 2 * 65536 + 5, 1_100_003)
    if num_tasks * size <= 20_000_000  # at most 80 MB of input
  ],
)
def test_combine_kernel_is_the_sequential_sum(dtype, num_tasks, size):
  """Bit for bit the literal sum, and within its rounding bound of the float64 one.

  Groups of 4 tasks and their remainders (T = 1, 2, 3, 5, 13), block tails,
  several chunks, and outputs spanning whole huge pages (4.4 MB and more).
  """
  rng = np.random.default_rng(num_tasks * 1000 + size)
  rows = rng.standard_normal((num_tasks, size)).astype(dtype)
  coefficients = rng.standard_normal(num_tasks)
  combined = _jitted_combine(rows, coefficients)
  assert combined.dtype == dtype and combined.shape == (size,)
  np.testing.assert_array_equal(combined, _sequential_combination(rows, coefficients))
  _assert_combination_exact(combined, rows, coefficients)


@needs_compiler
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_combine_kernel_keeps_extreme_scales_and_coefficients(dtype):
  """Tasks from 1e-20 to 1e20 with coefficients that bring them to one scale
  (beyond float32's range, split into two factors), and exactly opposite tasks."""
  rng = np.random.default_rng(8)
  scales = np.array([1e-20, 1e-10, 1.0, 1e10, 1e20])
  rows = (rng.standard_normal((5, 70_001)) * scales[:, None]).astype(dtype)
  coefficients = 1.0 / scales
  combined = _jitted_combine(rows, coefficients)
  np.testing.assert_array_equal(combined, _sequential_combination(rows, coefficients))
  _assert_combination_exact(combined, rows, coefficients)
  opposite = np.stack([rows[2], -rows[2]])
  np.testing.assert_array_equal(_jitted_combine(opposite, np.array([3.0, 3.0])), 0.0)


def test_combine_kernel_under_vmap_and_grad_matches_xla():
  rng = np.random.default_rng(9)
  batch = jnp.asarray(rng.standard_normal((2, 3, 4, 500)), jnp.float32)
  coefficients = jnp.asarray(rng.standard_normal(3))
  weights = jnp.asarray(rng.standard_normal((4, 500)), jnp.float32)

  def xla_combine(tree, beta):
    return jax.tree.map(lambda leaf: gradops_jax.combine({"w": leaf}, beta, implementation="xla")["w"], tree)

  def loss(leaf, beta, form):
    return jnp.sum(form({"w": leaf}, beta)["w"] * weights)

  with jax.enable_x64(True):
    vmapped = jax.jit(jax.vmap(gradops_jax.combine, in_axes=(0, None)))({"w": batch}, coefficients)["w"]
    expected = jax.vmap(xla_combine, in_axes=(0, None))({"w": batch}, coefficients)["w"]
    gradient = jax.jit(jax.grad(loss), static_argnums=2)(batch[0], coefficients, gradops_jax.combine)
    expected_gradient = jax.grad(loss)(batch[0], coefficients, xla_combine)
  np.testing.assert_allclose(vmapped, expected, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(gradient, expected_gradient, rtol=1e-6)


def test_cache_key_names_the_compilers_target_not_proc_cpuinfo(monkeypatch):
  """The key comes from the compiler's predefined macros for the build's flags, so a native
  build is never loaded on another CPU where /proc/cpuinfo is unreadable (macOS, sandboxes)."""
  compiler = shutil.which("c++")
  if compiler is None:
    pytest.skip("no C++ compiler")
  native = cpu_kernels._target_description([compiler], ("-march=native",))
  baseline = cpu_kernels._target_description([compiler], ("-march=x86-64",) if "__x86_64__" in native else ())
  real_read_text = pathlib.Path.read_text

  def unreadable(path, *args, **kwargs):
    if str(path) == "/proc/cpuinfo":
      raise OSError("unreadable")
    return real_read_text(path, *args, **kwargs)

  monkeypatch.setattr(pathlib.Path, "read_text", unreadable)
  assert cpu_kernels._target_description([compiler], ("-march=native",)) == native
  if "__x86_64__" in native and "__AVX2__" in native:
    assert native != baseline
