"""One process of a 2-process GradOPS + Adam run; ``tests/test_multiprocess.py`` starts two.

    python -m tests.multiprocess PROCESS_ID PORT OUTPUT.npz

Each process runs JAX's multi-controller runtime (``jax.distributed``) with a
coordinator on ``localhost:PORT`` and 4 CPU devices, CPU collectives by gloo.
The parameters of a small multi-task model are sharded across all 8 devices
of both processes; after :data:`STEPS` steps of per-task gradients, GradOPS
and Adam, process 0 writes the gathered parameters to ``OUTPUT.npz``.
:func:`train` with no mesh is the single-process run they must equal.
"""

import os
import sys

import numpy as np

NUM_TASKS = 3
STEPS = 5
DEVICES_PER_PROCESS = 4


def problem():
  """Parameters and data of a 2-layer trunk with T linear heads (NumPy: equal in every process)."""
  rng = np.random.default_rng(0)
  params = {
    "w1": rng.standard_normal((16, 64)).astype(np.float32) / 4,
    "w2": rng.standard_normal((64, 64)).astype(np.float32) / 8,
    "heads": rng.standard_normal((64, NUM_TASKS)).astype(np.float32) / 8,
  }
  x = rng.standard_normal((32, 16)).astype(np.float32)
  y = rng.standard_normal((32, NUM_TASKS)).astype(np.float32)
  return params, x, y


def train(mesh=None):
  """:data:`STEPS` jitted steps; with ``mesh``, parameters sharded over its axis "x".

  Returns the final parameters as NumPy arrays (gathered from every process).
  """
  import jax
  import jax.numpy as jnp
  import optax
  from jax.experimental import multihost_utils
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  import gradops_jax

  def task_losses(params, x, y):
    hidden = jnp.tanh(jnp.tanh(x @ params["w1"]) @ params["w2"])
    return jnp.mean((hidden @ params["heads"] - y) ** 2, axis=0)

  tx = optax.chain(gradops_jax.scale_by_gradops(NUM_TASKS), optax.adam(1e-2))

  @jax.jit
  def step(params, opt_state, x, y):
    _, task_grads = gradops_jax.value_and_task_grads(task_losses)(params, x, y)
    updates, opt_state = tx.update(task_grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  params, x, y = problem()
  if mesh is not None:
    specs = {"w1": P(None, "x"), "w2": P(None, "x"), "heads": P("x", None)}

    def place(value, spec):
      # Every process holds the whole value; each device takes its slice.
      return jax.make_array_from_callback(value.shape, NamedSharding(mesh, spec), lambda index: value[index])

    params = {name: place(value, specs[name]) for name, value in params.items()}
    x, y = place(x, P()), place(y, P())
  opt_state = jax.jit(tx.init)(params)
  for _ in range(STEPS):
    params, opt_state = step(params, opt_state, x, y)
  if mesh is not None:
    assert all(params[name].sharding.spec == specs[name] for name in params), {k: v.sharding for k, v in params.items()}
    params = multihost_utils.process_allgather(params, tiled=True)
  return {name: np.asarray(value) for name, value in params.items()}


def main(process_id: int, port: int, output: str) -> None:
  flags = os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={DEVICES_PER_PROCESS}"
  os.environ["XLA_FLAGS"] = flags.strip()
  import jax

  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
    coordinator_address=f"localhost:{port}", num_processes=2, process_id=process_id, initialization_timeout=120
  )
  assert jax.device_count() == 2 * DEVICES_PER_PROCESS, jax.devices()
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("x",))
  params = train(mesh)
  if process_id == 0:
    np.savez(output, **params)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
