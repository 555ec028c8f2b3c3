"""The precision modes: no float64 in the float32 program, its accuracy and guarantees, "auto" per platform."""

import functools
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gradops_jax
from tests import cases as cases_lib
from tests import jitting
from tests.registry import SPECS

CASES = cases_lib.hard_cases()
BY_NAME = {spec.name: spec for spec in SPECS}
# One factory object per mode, so that tests/jitting.py compiles each (method, T) once.
FLOAT32 = {spec.name: functools.partial(spec.factory, precision="float32") for spec in SPECS}
FLOAT64 = {spec.name: functools.partial(spec.factory, precision="float64") for spec in SPECS}
# 64-bit element types of StableHLO values: floats, signed and unsigned integers, complex
# (attributes such as slice sizes are always written as i64 arrays and are not values).
WIDE_TYPE = re.compile(r"tensor<(?:[0-9?]+x)*(f64|i64|ui64|complex<f64>)>")


def _tree(matrix):
  tree = cases_lib.split_into_pytree(matrix) if matrix.shape[1] >= 13 else {"w": matrix}
  return jax.tree.map(jnp.asarray, tree)


def _params(tree):
  return jax.tree.map(lambda leaf: jnp.zeros(leaf.shape[1:], leaf.dtype), tree)


def _flat(tree):
  return np.concatenate([np.asarray(leaf, np.float64).ravel() for leaf in jax.tree.leaves(tree)])


def _lowered_text(tx, tree, platforms=None):
  params = _params(tree)
  args = (tree, tx.init(params), params)
  if platforms is None:
    return jax.jit(tx.update).lower(*args).as_text()
  return jax.export.export(jax.jit(tx.update), platforms=platforms)(*args).mlir_module()


def _wide_types(text):
  values = re.sub(r"<\{.*?\}>", "", text)  # drop attribute dictionaries: their constants are not values
  return sorted(set(WIDE_TYPE.findall(values)))


@pytest.mark.parametrize("name", sorted(BY_NAME))
def test_float32_mode_compiles_no_64_bit_type(name):
  """No float64 at all; a 64-bit integer only in JAX's threefry counters, for the random task orders."""
  tree = _tree(CASES["conflicting_T5"])
  expected = [] if BY_NAME[name].deterministic else ["ui64"]
  assert _wide_types(_lowered_text(FLOAT32[name](5), tree)) == expected


def test_float32_mode_of_recon_and_the_gramian_engine_compiles_no_64_bit_type():
  tree = _tree(CASES["conflicting_T5"])
  chained = optax.chain(
    gradops_jax.recon.layer_conflict_scores(5, precision="float32"), gradops_jax.scale_by_upgrad(5, precision="float32")
  )
  assert _wide_types(_lowered_text(chained, tree)) == []
  shared = gradops_jax.aggregate_shared(
    gradops_jax.scale_by_gradops(5, precision="float32"),
    5,
    {"dense": {"kernel": True, "bias": True}, "scalar": False, "cube": True, "rest": True},
  )
  assert _wide_types(_lowered_text(shared, tree)) == []

  def losses(w):
    return jnp.stack([jnp.sum((w - k) ** 2) for k in range(3)])

  aggregator = gradops_jax.scale_by_mgda(3, precision="float32")
  engine = gradops_jax.value_and_aggregated_grad(losses, aggregator)
  w = jnp.arange(4.0)
  assert _wide_types(jax.jit(engine).lower(aggregator.init(w), w).as_text()) == []


def test_auto_lowers_to_float32_for_tpu_and_float64_for_cpu():
  """One jitted function: the TPU program has no 64-bit type, the CPU one computes in float64."""
  tree = _tree(CASES["conflicting_T5"])
  tx = gradops_jax.scale_by_gradops(5)
  assert _wide_types(_lowered_text(tx, tree, platforms=("tpu",))) == []
  assert "f64" in _wide_types(_lowered_text(tx, tree))  # this machine's CPU
  auto, _ = jitting.update(BY_NAME["gradops"].factory, tree)
  wide, _ = jitting.update(FLOAT64["gradops"], tree)
  chex.assert_trees_all_equal(auto, wide)


@pytest.mark.parametrize("precision", ["float16", None, "x64"])
def test_unknown_precision_is_a_value_error(precision):
  with pytest.raises(ValueError, match="precision must be one of"):
    gradops_jax.scale_by_upgrad(3, precision=precision)
  with pytest.raises(ValueError, match="precision must be one of"):
    gradops_jax.recon.layer_conflict_scores(3, precision=precision)


# Cases without nearly collinear tasks, and the others: pairs whose cosine float32 holds too
# coarsely for 1e-4 (docs/precision.md), where only finiteness and the guarantees are checked.
# T in {3, 4, 5, 8} only: one program per (method, T), so each T added costs 12 compiles.
RESOLVED = [
  "random_T5",
  "conflicting_T8",
  "zero_task",
  "all_zero",
  "exactly_opposite_plus_others",
  "three_way_cancel",
  "fallback_nonzero_mgda",
  "mixed_scales_1e-20_1e20",
  "huge_1e20",
  "tiny_1e-20",
  "one_task_1e10_larger",
  "more_tasks_than_dims",
  "rank_deficient_sum",
]
UNRESOLVED = ["near_collinear", "duplicated"]
# The no-conflict guarantee, for the three methods that give it, on T up to 32 and on a
# near-duplicate pair in a spanning set, where float32 drops the pair's dependency.
GUARANTEE_CASES = (
  RESOLVED
  + UNRESOLVED
  + [
    "near_collinear_1e-4",
    "near_duplicate_pair_spanning",
    "conflicting_T32",
    "opposite_unequal_T2",
    "random_T1",
  ]
)
# Methods whose float32 solve reaches the float64 one's answer to 1e-4 on every resolved case
# (docs/precision.md: CAGrad's and ConicGrad's objective-based solves, and Nash-MTL's ridge, do not).
ACCURATE = ["gradops", "gradops_alpha-2", "mgda", "upgrad", "pcgrad", "gradvac", "imtl_g", "aligned_mtl", "mean"]


@functools.lru_cache(maxsize=None)
def _both_modes(name, num_tasks):
  """One program per (method, T) with the update in both modes: half the executables of two.

  Each XLA:CPU executable holds memory maps, and a process may hold 65,530: this module's
  hundreds of programs are freed when it ends (``_free_programs``).
  """

  def run(task_grads):
    params = _params(task_grads)
    updates = []
    for factory in (FLOAT32[name], FLOAT64[name]):
      tx = factory(num_tasks)
      updates.append(tx.update(task_grads, tx.init(params), params)[0])
    return tuple(updates)

  return jax.jit(run)


@pytest.fixture(autouse=True)
def _free_programs():
  yield
  if _both_modes.cache_info().currsize >= 8:
    _both_modes.cache_clear()
    jax.clear_caches()


def _padded(matrix):
  """The case with zero columns up to D = 96: the same Gram matrix and update, one program per T."""
  return {"w": jnp.asarray(np.pad(matrix, ((0, 0), (0, 96 - matrix.shape[1]))))}


@pytest.mark.parametrize("case", RESOLVED + UNRESOLVED)
@pytest.mark.parametrize("name", sorted(BY_NAME))
def test_float32_mode_is_finite_and_close_to_float64_mode(name, case):
  matrix = CASES[case]
  narrow, wide = _both_modes(name, matrix.shape[0])(_padded(matrix))
  chex.assert_tree_all_finite(narrow)
  chex.assert_trees_all_equal_shapes_and_dtypes(narrow, wide)
  if case in UNRESOLVED or name not in ACCURATE or not BY_NAME[name].deterministic:
    return
  wide = _flat(wide)
  error = np.linalg.norm(_flat(narrow) - wide)
  # Relative, plus float32 rounding of the largest input where the tasks cancel to nothing.
  rounding = 1e-6 * np.linalg.norm(matrix.astype(np.float64), axis=1).max()
  assert error <= 1e-4 * np.linalg.norm(wide) + rounding, (error, np.linalg.norm(wide))


@pytest.mark.parametrize("case", GUARANTEE_CASES)
@pytest.mark.parametrize("name", ["gradops", "gradops_alpha-2", "upgrad"])
def test_float32_mode_keeps_the_no_conflict_guarantee(name, case):
  matrix = CASES[case]
  grads = np.pad(matrix, ((0, 0), (0, 96 - matrix.shape[1]))).astype(np.float64)
  update = _flat(_both_modes(name, matrix.shape[0])(_padded(matrix))[0])
  norms = np.linalg.norm(grads, axis=1)
  assert np.all(grads @ update >= -1e-5 * norms * max(np.linalg.norm(update), norms.max()))


def test_float32_gram_pass_is_accurate_to_float32_rounding_at_every_scale():
  """Entries within a few float32 roundings of the float64 Gram matrix, relative to the norms."""
  rng = np.random.default_rng(1)
  scales = 10.0 ** np.array([-9.0, -4.0, 0.0, 4.0, 9.0])
  matrix = (rng.standard_normal((5, 300_000)) * scales[:, None]).astype(np.float32)
  matrix[1] = (matrix[0] / scales[0] * scales[1]).astype(np.float32)  # a collinear pair 1e5 apart
  exact = matrix.astype(np.float64) @ matrix.T.astype(np.float64)
  for implementation in ("scan", "partitionable"):
    scaled = np.asarray(
      jax.jit(functools.partial(gradops_jax.task_gram_float32, num_tasks=5, implementation=implementation))(
        {"a": jnp.asarray(matrix[:, :1000].reshape(5, 10, 100)), "b": jnp.asarray(matrix[:, 1000:])}
      ),
      np.float64,
    )
    norms = np.sqrt(np.diag(exact))
    power = scaled[4, 4] / exact[4, 4]
    assert abs(np.log2(power) - np.round(np.log2(power))) < 1e-6  # one power of two
    error = np.abs(scaled / power - exact) / np.outer(norms, norms)
    bound = 1e-6 if implementation == "scan" else 1e-5
    assert error.max() <= bound, (implementation, error.max())


@pytest.mark.parametrize("engine", [False, True])
def test_vmap_around_a_scan_with_traced_hyperparameters_in_float32_mode(engine):
  """The two cases that the float64 scope cannot batch work in float32 mode: each run equals the run alone."""
  steps, runs, num_tasks = 2, 3, 3
  alphas = jnp.array([-1.0, 0.0, 2.0])
  factory = optax.inject_hyperparams(gradops_jax.scale_by_gradops, static_args=("num_tasks", "precision"))
  rng = np.random.default_rng(0)
  targets = jnp.asarray(rng.standard_normal((runs, steps, num_tasks, 4)), jnp.float32)

  def one_run(alpha, run_targets):
    tx = factory(num_tasks=num_tasks, alpha=alpha, precision="float32")
    w = jnp.zeros(4)

    def losses(w, target):
      return jnp.sum((w[None, :] - target) ** 2, axis=1) * jnp.array([1.0, 2.0, 0.5])

    def step(carry, target):
      w, state = carry
      if engine:
        _, update, state = gradops_jax.value_and_aggregated_grad(losses, tx)(state, w, target)
      else:
        grads = jax.jacrev(losses)(w, target)
        update, state = tx.update({"w": grads}, state, {"w": w})
        update = update["w"]
      return (w - 0.1 * update, state), update

    state = tx.init(w) if engine else tx.init({"w": w})
    return jax.lax.scan(step, (w, state), run_targets)[1]

  batched, alone = jax.jit(
    lambda: (jax.vmap(one_run)(alphas, targets), jax.lax.map(lambda args: one_run(*args), (alphas, targets)))
  )()
  chex.assert_trees_all_close(batched, alone, rtol=1e-5, atol=1e-6)


def test_float32_gram_pass_counts_a_task_below_its_range_as_zero():
  """docs/precision.md: a task under 2**-63 (about 1e-19) of the largest norm has a zero row."""
  matrix = np.ones((3, 8), np.float32) * np.array([[1e18], [1.0], [1e-18]], np.float32)
  scaled = np.asarray(gradops_jax.task_gram_float32({"w": jnp.asarray(matrix)}, 3))
  assert np.all(scaled[2] == 0) and np.all(scaled[:, 2] == 0)
  assert scaled[0, 0] > 0 and scaled[1, 1] > 0
