"""Two processes of JAX's multi-controller runtime train like one (``tests/multiprocess.py``).

The test starts both processes on a localhost coordinator, bounds them with a
timeout and stops them whatever happens; the parameters after the steps,
sharded over the 8 devices of both processes, must equal a single-process,
single-device run to float32 rounding.
"""

import contextlib
import os
import pathlib
import signal
import socket
import subprocess
import sys

import numpy as np

from tests import multiprocess

ROOT = pathlib.Path(__file__).parents[1]
TIMEOUT = 300


def free_port() -> int:
  with socket.socket() as probe:
    probe.bind(("localhost", 0))
    return probe.getsockname()[1]


def test_two_processes_on_eight_devices_train_like_one_device(tmp_path):
  port, output = free_port(), tmp_path / "params.npz"
  env = dict(os.environ, JAX_PLATFORMS="cpu")  # the session's XLA flags (conftest's optimisation level)
  with contextlib.ExitStack() as stack:
    logs = [stack.enter_context(open(tmp_path / f"process{index}.log", "w+")) for index in range(2)]
    processes = [
      subprocess.Popen(
        [sys.executable, "-m", "tests.multiprocess", str(index), str(port), str(output)],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group, so that stopping it stops its children
      )
      for index, log in enumerate(logs)
    ]
    try:
      codes = [process.wait(timeout=TIMEOUT) for process in processes]
    finally:
      for process in processes:
        if process.poll() is None:
          os.killpg(process.pid, signal.SIGKILL)
          process.wait()
    for code, log in zip(codes, logs):
      log.seek(0)
      assert code == 0, log.read()[-4000:]
  sharded = np.load(output)
  single = multiprocess.train()
  for name, expected in single.items():
    # float32 rounding: the sharded Gram sums and backward pass add in another order.
    np.testing.assert_allclose(sharded[name], expected, rtol=0, atol=1e-6 * np.max(np.abs(expected)))
