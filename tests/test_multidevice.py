"""Sharded updates on 8 host CPU devices (run in a subprocess by tests/multidevice.py).

With every leaf sharded along its largest axis, only small partial Gram sums
may cross devices (no all-gather or all-to-all of the gradients), the update
must keep the parameters' sharding and equal the single-device update. With
the batch sharded and the parameters replicated, the aggregator itself must
communicate nothing.
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).parents[1]
MOVING = ("all-gather", "all-to-all", "collective-permute", "reduce-scatter")


@pytest.fixture(scope="module")
def report():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
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


@pytest.mark.parametrize("axis_type", ["Auto", "Explicit"])
@pytest.mark.parametrize("method", ["gradops", "pcgrad", "mgda", "upgrad", "linear_scalarization"])
def test_parameter_sharded_update_communicates_only_partial_grams(report, axis_type, method):
  run = report["parameter_sharded"][axis_type][method]
  for op in MOVING:
    assert run["collectives"][op]["count"] == 0, (op, run["collectives"])
  # Partial Gram sums only: at most T*T float64 per row of a leaf, far below the gradients.
  assert run["collectives"]["all-reduce"]["bytes"] <= 0.01 * run["gradient_bytes"]
  if method == "linear_scalarization":
    assert run["collectives"]["all-reduce"]["count"] == 0
  else:
    assert run["collectives"]["all-reduce"]["count"] >= 1
  assert run["output_sharded_like_params"]
  assert run["max_abs_diff"] <= 1e-6 * run["max_abs_update"]


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


@pytest.mark.parametrize("axis_type", ["Auto", "Explicit"])
@pytest.mark.parametrize("method", ["gradops", "upgrad"])
def test_gramian_engine_on_sharded_parameters_gathers_nothing(report, axis_type, method):
  run = report["gramian_engine"][axis_type][method]
  for op in MOVING:
    assert run["collectives"][op]["count"] == 0, (op, run["collectives"])
  assert run["collectives"]["all-reduce"]["bytes"] <= 0.01 * run["gradient_bytes"]
  assert run["output_sharded_like_params"]
  assert run["max_abs_diff"] <= 1e-6 * run["max_abs_update"]
