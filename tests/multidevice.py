"""Multi-device checks on 8 host CPU devices; run as a script, prints one JSON report.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m tests.multidevice

``tests/test_multidevice.py`` runs it in a subprocess (the device count must be
set before JAX starts) and asserts on the report. For every method and both
mesh axis types (Auto and Explicit) it compiles the update for

* parameter sharding: every leaf sharded along its largest axis,
* data parallelism: a multi-task model's step with the batch sharded and the
  parameters replicated, and
* the Gramian engine (``value_and_aggregated_grad``) on parameters sharded
  along their largest axis,

and reports the collectives in the compiled HLO with their bytes, the output
shardings, and the largest difference from the single-device result.
"""

import json
import os
import re

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import gradops_jax  # noqa: E402

NUM_TASKS = 3
SHAPES = {"embed": (96, 64), "kernel": (64, 256), "conv": (3, 3, 16, 32), "bias": (256,), "big": (40000,)}
METHODS = {
  "gradops": lambda: gradops_jax.scale_by_gradops(NUM_TASKS, alpha=-1.0),
  "pcgrad": lambda: gradops_jax.scale_by_pcgrad(NUM_TASKS),
  "mgda": lambda: gradops_jax.scale_by_mgda(NUM_TASKS),
  "upgrad": lambda: gradops_jax.scale_by_upgrad(NUM_TASKS),
  "linear_scalarization": lambda: gradops_jax.scale_by_linear_scalarization(NUM_TASKS),
}
COLLECTIVES = ("all-reduce", "all-gather", "all-to-all", "collective-permute", "reduce-scatter")
_BYTES = {"f64": 8, "s64": 8, "u64": 8, "f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2, "pred": 1}


def collectives(hlo_text):
  """Collective ops in compiled HLO: {op: {"count": n, "bytes": result bytes}}."""
  report = {op: {"count": 0, "bytes": 0} for op in COLLECTIVES}
  for line in hlo_text.splitlines():
    match = re.search(r"=\s*(.*?)\s+(" + "|".join(COLLECTIVES) + r")(-start)?\(", line)
    if not match:
      continue
    op = match.group(2)
    report[op]["count"] += 1
    for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", match.group(1)):
      size = int(np.prod([int(d) for d in dims.split(",") if d])) if dims else 1
      report[op]["bytes"] += size * _BYTES.get(dtype, 4)
  return report


def largest_axis_spec(shape):
  """A PartitionSpec for a stacked leaf (T, *shape): its largest parameter axis on 'x'."""
  axis = int(np.argmax(shape))
  spec = [None] * (len(shape) + 1)
  spec[axis + 1] = "x"
  return P(*spec)


def padded(spec, ndim):
  """A PartitionSpec as a tuple of ``ndim`` entries (Auto mode drops trailing Nones)."""
  return tuple(spec) + (None,) * (ndim - len(spec))


def stacked_grads():
  keys = jax.random.split(jax.random.key(0), len(SHAPES))
  grads = {name: jax.random.normal(key, (NUM_TASKS, *shape)) for key, (name, shape) in zip(keys, SHAPES.items())}
  grads["kernel"] = grads["kernel"].at[1].set(-0.5 * grads["kernel"][0])  # a conflict
  return grads


def sharded_report(hlo, stacked, out, single):
  """Collectives of ``hlo``, the stacked gradients' bytes, and how the sharded update ``out``
  compares with the single-device ``single`` (values and shardings)."""
  return {
    "collectives": collectives(hlo),
    "gradient_bytes": int(sum(g.size * g.dtype.itemsize for g in stacked.values())),
    "max_abs_diff": float(max(jnp.max(jnp.abs(out[k] - single[k])) for k in out)),
    "max_abs_update": float(max(jnp.max(jnp.abs(single[k])) for k in single)),
    "output_sharded_like_params": all(
      padded(out[k].sharding.spec, len(SHAPES[k])) == tuple(largest_axis_spec(SHAPES[k]))[1:] for k in out
    ),
  }


def parameter_sharded(mesh, name):
  grads = stacked_grads()
  params = jax.tree.map(lambda g: jnp.zeros(g.shape[1:]), grads)
  tx = METHODS[name]()
  state = tx.init(params)
  single, _ = jax.jit(tx.update)(grads, state)
  sharded = {k: jax.device_put(g, NamedSharding(mesh, largest_axis_spec(SHAPES[k]))) for k, g in grads.items()}
  with jax.set_mesh(mesh):
    update = jax.jit(lambda g: tx.update(g, state)[0])
    hlo = update.lower(sharded).compile().as_text()
    out = update(sharded)
  return sharded_report(hlo, grads, out, single)


def data_parallel(mesh):
  """A 2-layer shared trunk with T linear heads, batch sharded, parameters replicated."""
  width, batch = 64, 64
  keys = jax.random.split(jax.random.key(1), 5)
  params = {
    "w1": jax.random.normal(keys[0], (16, width)) / 4,
    "w2": jax.random.normal(keys[1], (width, width)) / 8,
    "heads": jax.random.normal(keys[2], (width, NUM_TASKS)) / 8,
  }
  x = jax.random.normal(keys[3], (batch, 16))
  y = jax.random.normal(keys[4], (batch, NUM_TASKS))

  def task_losses(params, x, y):
    hidden = jnp.tanh(jnp.tanh(x @ params["w1"]) @ params["w2"])
    return jnp.mean((hidden @ params["heads"] - y) ** 2, axis=0)

  tx = gradops_jax.scale_by_gradops(NUM_TASKS)
  state = tx.init(params)

  def step(params, x, y):
    _, grads = gradops_jax.value_and_task_grads(task_losses)(params, x, y)
    return tx.update(grads, state, params)[0]

  single = jax.jit(step)(params, x, y)
  replicated = jax.device_put(params, NamedSharding(mesh, P()))
  xs = jax.device_put(x, NamedSharding(mesh, P("x", None)))
  ys = jax.device_put(y, NamedSharding(mesh, P("x", None)))
  with jax.set_mesh(mesh):
    compiled = jax.jit(step).lower(replicated, xs, ys).compile()
    out = jax.jit(step)(replicated, xs, ys)
    grads_shape = jax.eval_shape(lambda p: jax.tree.map(lambda v: jnp.zeros((NUM_TASKS, *v.shape)), p), params)
    replicated_grads = jax.tree.map(lambda s: jax.device_put(jnp.ones(s.shape), NamedSharding(mesh, P())), grads_shape)
    aggregator_hlo = jax.jit(lambda g: tx.update(g, state, params)[0]).lower(replicated_grads).compile().as_text()
  relative = max(float(jnp.max(jnp.abs(out[k] - single[k])) / jnp.max(jnp.abs(single[k]))) for k in out)
  return {
    "step_collectives": collectives(compiled.as_text()),
    "aggregator_collectives": collectives(aggregator_hlo),
    "task_gradient_bytes": int(sum(NUM_TASKS * v.size * 4 for v in params.values())),
    "max_relative_diff": relative,
  }


def gramian_engine(mesh, name):
  """The Gramian engine with every parameter sharded along its largest axis.

  The losses are ``L_t = sum_leaves <C_t, sin(params)>`` with ``C`` sharded
  like the stacked gradients, so each task's gradient lies where its
  parameter does; only partial Gram sums may cross devices.
  """
  coefficients = stacked_grads()
  params = jax.tree.map(lambda c: jnp.linspace(-1.0, 1.0, c[0].size).reshape(c.shape[1:]), coefficients)

  def losses(params, coefficients):
    # An elementwise product and a reduction: no contraction of sharded axes to annotate.
    return sum(
      jnp.sum(coefficients[k] * jnp.sin(params[k])[None], axis=tuple(range(1, coefficients[k].ndim)))
      for k in sorted(params)
    )

  tx = METHODS[name]()
  engine = gradops_jax.value_and_aggregated_grad(losses, tx)
  state = tx.init(params)
  single = jax.jit(lambda p, c: engine(state, p, c)[1])(params, coefficients)
  sharded_coefficients = {
    k: jax.device_put(c, NamedSharding(mesh, largest_axis_spec(SHAPES[k]))) for k, c in coefficients.items()
  }
  sharded_params = {
    k: jax.device_put(p, NamedSharding(mesh, P(*tuple(largest_axis_spec(SHAPES[k]))[1:]))) for k, p in params.items()
  }
  with jax.set_mesh(mesh):
    update = jax.jit(lambda p, c: engine(state, p, c)[1])
    hlo = update.lower(sharded_params, sharded_coefficients).compile().as_text()
    out = update(sharded_params, sharded_coefficients)
  return sharded_report(hlo, coefficients, out, single)


def main():
  report = {"devices": jax.device_count(), "parameter_sharded": {}, "data_parallel": {}, "gramian_engine": {}}
  for axis_type in ("Auto", "Explicit"):
    mesh = jax.make_mesh((8,), ("x",), axis_types=(getattr(jax.sharding.AxisType, axis_type),))
    report["parameter_sharded"][axis_type] = {name: parameter_sharded(mesh, name) for name in METHODS}
    report["data_parallel"][axis_type] = data_parallel(mesh)
    report["gramian_engine"][axis_type] = {name: gramian_engine(mesh, name) for name in ("gradops", "upgrad")}
  print(json.dumps(report))


if __name__ == "__main__":
  main()
