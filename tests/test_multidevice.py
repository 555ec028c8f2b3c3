"""Sharded updates on 8 host CPU devices (run in a subprocess by tests/multidevice.py).

Under every sharding style (Auto axes with no mesh in context, ``jit``'s
``in_shardings``/``out_shardings``, ``jax.set_mesh``, Explicit axes), with
every leaf sharded along its largest axis, only small partial Gram sums may
cross devices (no all-gather, all-to-all, permute or reduce-scatter of the
gradients), and every method's update must keep the parameters' sharding and
equal the single-device update. Inside ``jax.shard_map`` each device solves its
own problem with no communication. With the batch sharded and the parameters
replicated, the aggregator itself must communicate nothing.
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from tests.registry import NAMES

ROOT = pathlib.Path(__file__).parents[1]
MOVING = ("all-gather", "all-to-all", "collective-permute", "reduce-scatter")
STYLES = ("auto_no_mesh", "jit_shardings", "set_mesh", "explicit")
TRANSFORMS = NAMES + ["recon_scores+gradops"] + [f"{name}_float32" for name in ("gradops", "mgda")]


@pytest.fixture(scope="module")
def report():
  # The session's XLA flags (conftest's optimisation level) plus 8 host devices.
  flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
  env = dict(os.environ, XLA_FLAGS=flags.strip(), JAX_PLATFORMS="cpu")
  result = subprocess.run(
    [sys.executable, "-m", "tests.multidevice"],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=900,
    check=False,
  )
  assert result.returncode == 0, result.stderr[-4000:]
  return json.loads(result.stdout.strip().splitlines()[-1])


def test_runs_on_eight_devices(report):
  assert report["devices"] == 8
  assert sorted(report["styles"]) == sorted(STYLES)


def assert_only_partial_grams(found, limit):
  """No gradient moves; the all-reduces carry at most ``limit`` bytes (T x T float64 per leaf)."""
  for op in MOVING:
    assert found[op]["count"] == 0, (op, found)
  assert 1 <= found["all-reduce"]["count"]
  assert found["all-reduce"]["bytes"] <= limit, found


@pytest.mark.parametrize("style", STYLES)
def test_every_method_communicates_only_partial_grams(report, style):
  # All transforms are compiled in one program per style, so these are the collectives of all of them.
  run = report["styles"][style]
  assert_only_partial_grams(run["collectives"], len(TRANSFORMS) * run["gram_bytes"])
  assert len(TRANSFORMS) * run["gram_bytes"] <= 0.01 * run["gradient_bytes"]


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("method", TRANSFORMS)
def test_sharded_update_equals_one_device_and_keeps_sharding(report, style, method):
  run = report["styles"][style]["methods"][method]
  assert run["output_sharded_like_params"]
  # Sharding reorders float32 sums: the float32 mode agrees to its own accuracy (docs/precision.md).
  rtol = 1e-4 if method.endswith("_float32") else 1e-6
  assert run["max_abs_diff"] <= rtol * run["max_abs_update"]


@pytest.mark.parametrize("method", TRANSFORMS)
def test_shard_map_with_default_checks_solves_each_device_alone(report, method):
  run = report["shard_map"]["methods"][method]
  assert run["max_abs_diff"] <= 1e-6 * run["max_abs_update"]


def test_shard_map_communicates_nothing(report):
  for op, found in report["shard_map"]["collectives"].items():
    assert found["count"] == 0, op


@pytest.mark.parametrize("shape", ["2x4", "4x2"])
def test_two_dimensional_mesh_step(report, shape):
  run = report["two_d"][shape]
  assert_only_partial_grams(run["aggregator_collectives"], run["gram_bytes"])
  assert run["update_sharded_like_params"]
  assert run["params_sharded_like_params"]
  assert run["max_abs_diff"] <= 1e-6 * run["max_abs_param"]


@pytest.mark.parametrize("axis_type", ["Auto", "Explicit"])
def test_data_parallel_aggregator_communicates_nothing(report, axis_type):
  run = report["data_parallel"][axis_type]
  for op in ("all-reduce",) + MOVING:
    assert run["aggregator_collectives"][op]["count"] == 0
  # The step's only traffic is the backward pass's all-reduce of the per-task gradients.
  assert run["step_collectives"]["all-reduce"]["bytes"] <= run["task_gradient_bytes"]
  for op in MOVING:
    assert run["step_collectives"][op]["count"] == 0
  assert run["max_relative_diff"] <= 1e-5


@pytest.mark.parametrize("style, method", [(style, "gradops") for style in STYLES] + [("auto_no_mesh", "upgrad")])
def test_gramian_engine_on_sharded_parameters_gathers_nothing(report, style, method):
  run = report["gramian_engine"][style][method]
  assert_only_partial_grams(run["collectives"], run["gram_bytes"])
  assert run["output_sharded_like_params"]
  assert run["max_abs_diff"] <= 1e-6 * run["max_abs_update"]
