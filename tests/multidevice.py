"""Multi-device checks on 8 host CPU devices; run as a script, prints one JSON report.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m tests.multidevice
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m tests.multidevice --table

``tests/test_multidevice.py`` runs it in a subprocess (the device count must be
set before JAX starts) and asserts on the report; ``--table`` prints the
collectives of GradOPS's update per sharding style as the Markdown table of
``docs/integrations.md``. With every leaf sharded along its largest axis, it
compiles every registered method (and Recon's conflict scores chained with
GradOPS) under each sharding style of :data:`STYLES`, and reports the
collectives in the compiled HLO with their bytes, the output shardings, and
the largest difference from the single-device result. It also runs

* ``jax.shard_map`` with one problem per device (default ``check_vma``),
* data parallelism: a multi-task model's step with the batch sharded and the
  parameters replicated,
* 2-D meshes (data x model as 2 x 4 and 4 x 2): per-task gradients from
  ``value_and_task_grads`` with the batch on one axis and the parameters on
  the other, and
* the Gramian engine (``value_and_aggregated_grad``) on parameters sharded
  along their largest axis, under every style.
"""

import argparse
import json
import os
import re

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import gradops_jax  # noqa: E402
from gradops_jax import recon  # noqa: E402
from tests.registry import SPECS  # noqa: E402

NUM_TASKS = 3
SHAPES = {"embed": (96, 64), "kernel": (64, 256), "conv": (3, 3, 16, 32), "bias": (256,), "big": (40000,)}
RECON = "recon_scores+gradops"
FLOAT32_METHODS = ("gradops", "mgda")
BY_NAME = {spec.name: spec for spec in SPECS}
COLLECTIVES = ("all-reduce", "all-gather", "all-to-all", "collective-permute", "reduce-scatter")
_BYTES = {"f64": 8, "s64": 8, "u64": 8, "f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2, "pred": 1}
STYLES = {
  "auto_no_mesh": "Auto axes, inputs placed with NamedSharding, plain jax.jit, no mesh in context",
  "jit_shardings": "jax.jit(in_shardings=..., out_shardings=...) on host arrays, no mesh in context",
  "set_mesh": "Auto axes, inputs placed with NamedSharding, inside jax.set_mesh(mesh)",
  "explicit": "Explicit axes, inputs placed with NamedSharding, inside jax.set_mesh(mesh)",
}


# The Gramian engine: GradOPS under every style; UPGrad (another solve, the same passes) under the classic one.
ENGINE_METHODS = {style: ("gradops", "upgrad") if style == "auto_no_mesh" else ("gradops",) for style in STYLES}


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


def parameter_spec(name):
  """The PartitionSpec of parameter ``name``: its stacked gradient's without the task axis."""
  return P(*tuple(largest_axis_spec(SHAPES[name]))[1:])


def padded(spec, ndim):
  """A PartitionSpec as a tuple of ``ndim`` entries (Auto mode drops trailing Nones)."""
  return tuple(spec) + (None,) * (ndim - len(spec))


def stacked_grads():
  keys = jax.random.split(jax.random.key(0), len(SHAPES))
  grads = {name: jax.random.normal(key, (NUM_TASKS, *shape)) for key, (name, shape) in zip(keys, SHAPES.items())}
  grads["kernel"] = grads["kernel"].at[1].set(-0.5 * grads["kernel"][0])  # a conflict
  return grads


def transforms():
  """Every registered method, and Recon's conflict scores chained with GradOPS."""
  chosen = {spec.name: spec.factory(NUM_TASKS) for spec in SPECS}
  chosen[RECON] = optax.chain(recon.layer_conflict_scores(NUM_TASKS), gradops_jax.scale_by_gradops(NUM_TASKS))
  for name in FLOAT32_METHODS:  # the float32 mode's passes are sharded where the leaves lie too
    chosen[f"{name}_float32"] = BY_NAME[name].factory(NUM_TASKS, precision="float32")
  return chosen


def leaf_report(out, single):
  """How a sharded update ``out`` compares with the single-device ``single`` (values and shardings)."""
  return {
    "max_abs_diff": float(max(jnp.max(jnp.abs(out[k] - single[k])) for k in out)),
    "max_abs_update": float(max(jnp.max(jnp.abs(single[k])) for k in single)),
    "output_sharded_like_params": all(
      padded(out[k].sharding.spec, len(SHAPES[k])) == tuple(parameter_spec(k)) for k in out
    ),
  }


def compiled_in_style(style, fn, args, arg_specs, out_specs):
  """``fn`` jitted and called on ``args`` as a user of ``style`` would; returns ``(hlo, out)``.

  ``arg_specs`` and ``out_specs`` are pytrees of PartitionSpecs matching
  ``args`` and the output (``None`` where the placement is left to XLA).
  """

  def place(mesh, tree, specs):
    return jax.tree.map(lambda a, s: jax.device_put(a, NamedSharding(mesh, s)), tree, specs)

  def shardings(mesh, specs):
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs)

  if style in ("auto_no_mesh", "jit_shardings"):
    mesh = Mesh(np.array(jax.devices()), ("x",))  # every tutorial's mesh: Auto axes
    if style == "auto_no_mesh":
      jitted, args = jax.jit(fn), place(mesh, args, arg_specs)
    else:
      jitted = jax.jit(fn, in_shardings=shardings(mesh, arg_specs), out_shardings=shardings(mesh, out_specs))
    return jitted.lower(*args).compile().as_text(), jitted(*args)
  axis_type = jax.sharding.AxisType.Explicit if style == "explicit" else jax.sharding.AxisType.Auto
  mesh = jax.make_mesh((8,), ("x",), axis_types=(axis_type,))
  args = place(mesh, args, arg_specs)
  with jax.set_mesh(mesh):
    jitted = jax.jit(fn)
    return jitted.lower(*args).compile().as_text(), jitted(*args)


def every_method_in_style(style, chosen, singles):
  """All transforms' updates in one jitted function, sharded in ``style``."""
  grads = stacked_grads()
  params = jax.tree.map(lambda g: jnp.zeros(g.shape[1:]), grads)
  states = {name: tx.init(params) for name, tx in chosen.items()}

  def updates(g):
    return {name: tx.update(g, states[name])[0] for name, tx in chosen.items()}

  arg_specs = ({k: largest_axis_spec(SHAPES[k]) for k in grads},)
  out_specs = {name: {k: parameter_spec(k) for k in grads} for name in chosen}
  hlo, out = compiled_in_style(style, updates, (grads,), arg_specs, out_specs)
  return {
    "collectives": collectives(hlo),
    "gradient_bytes": int(sum(g.size * g.dtype.itemsize for g in grads.values())),
    "gram_bytes": len(grads) * NUM_TASKS**2 * 8,  # one float64 T x T partial sum per leaf
    "methods": {name: leaf_report(out[name], singles[name]) for name in chosen},
  }


def gradops_alone_in_style(style):
  """GradOPS's update alone: the figures of the docs' table."""
  grads = stacked_grads()
  tx = gradops_jax.scale_by_gradops(NUM_TASKS)
  state = tx.init(jax.tree.map(lambda g: g[0], grads))
  arg_specs = ({k: largest_axis_spec(SHAPES[k]) for k in grads},)
  out_specs = {k: parameter_spec(k) for k in grads}
  hlo, _ = compiled_in_style(style, lambda g: tx.update(g, state)[0], (grads,), arg_specs, out_specs)
  return collectives(hlo)


def shard_map_per_device(chosen):
  """Each device aggregates its own T task gradients inside ``jax.shard_map`` (``check_vma=True``)."""
  mesh = jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Explicit,))
  grads = jax.random.normal(jax.random.key(2), (8, NUM_TASKS, 3000))
  grads = grads.at[:, 1].multiply(-0.3)  # conflicts on every device
  params = jnp.zeros(3000)
  states = {name: tx.init(params) for name, tx in chosen.items()}

  def local(g):
    return {name: tx.update(g[0], states[name])[0][None] for name, tx in chosen.items()}

  sharded = jax.device_put(grads, NamedSharding(mesh, P("x")))
  with jax.set_mesh(mesh):
    mapped = jax.jit(jax.shard_map(local, in_specs=P("x"), out_specs=P("x")))
    hlo = mapped.lower(sharded).compile().as_text()
    out = mapped(sharded)
  # One program for the references: each device's problem on one device, every method.
  expected = jax.jit(jax.vmap(lambda g: {name: tx.update(g, states[name])[0] for name, tx in chosen.items()}))(grads)
  return {
    "collectives": collectives(hlo),
    "methods": {
      name: {
        "max_abs_diff": float(jnp.max(jnp.abs(out[name] - expected[name]))),
        "max_abs_update": float(jnp.max(jnp.abs(expected[name]))),
      }
      for name in chosen
    },
  }


def multitask_model(key, width=64, inputs=16):
  keys = jax.random.split(key, 5)
  params = {
    "w1": jax.random.normal(keys[0], (inputs, width)) / 4,
    "w2": jax.random.normal(keys[1], (width, width)) / 8,
    "heads": jax.random.normal(keys[2], (width, NUM_TASKS)) / 8,
  }
  x = jax.random.normal(keys[3], (64, inputs))
  y = jax.random.normal(keys[4], (64, NUM_TASKS))

  def task_losses(params, x, y):
    hidden = jnp.tanh(jnp.tanh(x @ params["w1"]) @ params["w2"])
    return jnp.mean((hidden @ params["heads"] - y) ** 2, axis=0)

  return params, x, y, task_losses


def data_parallel(mesh):
  """A 2-layer shared trunk with T linear heads, batch sharded, parameters replicated."""
  params, x, y, task_losses = multitask_model(jax.random.key(1))
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


TWO_D_SPECS = {"w1": P(None, "model"), "w2": P(None, "model"), "heads": P("model", None)}


def two_d_mesh(shape):
  """FSDP-style data x model mesh: batch on "data", every parameter sharded on "model".

  The classic pattern (Auto axes, ``NamedSharding`` placements, no mesh in
  context). The step (per-task gradients, GradOPS, Adam) must equal the
  single-device step and keep the parameters' sharding; the aggregator alone,
  on task gradients sharded like the parameters, must move no gradient.
  """
  mesh = Mesh(np.array(jax.devices()).reshape(shape), ("data", "model"))
  params, x, y, task_losses = multitask_model(jax.random.key(3), width=128)
  tx = optax.chain(gradops_jax.scale_by_gradops(NUM_TASKS), optax.adam(1e-2))
  opt_state = tx.init(params)

  def step(params, opt_state, x, y):
    _, grads = gradops_jax.value_and_task_grads(task_losses)(params, x, y)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  single_params, _ = jax.jit(step)(params, opt_state, x, y)
  put = lambda tree, specs: jax.tree.map(lambda a, s: jax.device_put(a, NamedSharding(mesh, s)), tree, specs)  # noqa: E731
  sharded_params = put(params, TWO_D_SPECS)

  def place_state(path, leaf):
    # Adam's moments are sharded like their parameters, its step count replicated.
    name = getattr(path[-1], "key", None)
    return jax.device_put(leaf, NamedSharding(mesh, TWO_D_SPECS.get(name, P())))

  sharded_state = jax.tree_util.tree_map_with_path(place_state, opt_state)
  xs = jax.device_put(x, NamedSharding(mesh, P("data", None)))
  ys = jax.device_put(y, NamedSharding(mesh, P("data", None)))
  out_params, _ = jax.jit(step)(sharded_params, sharded_state, xs, ys)

  aggregator = gradops_jax.scale_by_gradops(NUM_TASKS)
  agg_state = aggregator.init(params)
  task_grads = gradops_jax.value_and_task_grads(task_losses)(params, x, y)[1]
  task_specs = {k: P(None, *s) for k, s in TWO_D_SPECS.items()}
  sharded_grads = put(task_grads, task_specs)
  update = jax.jit(lambda g: aggregator.update(g, agg_state)[0])
  aggregator_hlo = update.lower(sharded_grads).compile().as_text()
  out_update = update(sharded_grads)
  return {
    "aggregator_collectives": collectives(aggregator_hlo),
    "task_gradient_bytes": int(sum(g.size * g.dtype.itemsize for g in jax.tree.leaves(task_grads))),
    "gram_bytes": len(params) * NUM_TASKS**2 * 8,
    "update_sharded_like_params": all(
      padded(out_update[k].sharding.spec, 2) == padded(s, 2) for k, s in TWO_D_SPECS.items()
    ),
    "params_sharded_like_params": all(
      padded(out_params[k].sharding.spec, 2) == padded(s, 2) for k, s in TWO_D_SPECS.items()
    ),
    "max_abs_diff": float(max(jnp.max(jnp.abs(out_params[k] - single_params[k])) for k in params)),
    "max_abs_param": float(max(jnp.max(jnp.abs(single_params[k])) for k in params)),
  }


def gramian_engine(style, name):
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

  tx = transforms()[name]
  engine = gradops_jax.value_and_aggregated_grad(losses, tx)
  state = tx.init(params)

  def update(p, c):
    return engine(state, p, c)[1]

  single = jax.jit(update)(params, coefficients)
  arg_specs = ({k: parameter_spec(k) for k in params}, {k: largest_axis_spec(SHAPES[k]) for k in params})
  out_specs = {k: parameter_spec(k) for k in params}
  hlo, out = compiled_in_style(style, update, (params, coefficients), arg_specs, out_specs)
  return {
    "collectives": collectives(hlo),
    "gram_bytes": len(params) * NUM_TASKS**2 * 8,
    **leaf_report(out, single),
  }


def table():
  """Markdown: GradOPS's collectives per sharding style, against the gradients' size."""
  gradient_bytes = sum(g.size * g.dtype.itemsize for g in stacked_grads().values())
  rows = {description: gradops_alone_in_style(style) for style, description in STYLES.items()}
  gradops = {"gradops": gradops_jax.scale_by_gradops(NUM_TASKS)}
  rows["jax.shard_map, one problem per device (default check_vma)"] = shard_map_per_device(gradops)["collectives"]
  two_d = two_d_mesh((2, 4))
  rows["2-D mesh 2 x 4 (data x model), Auto axes, no mesh in context; aggregator only"] = two_d[
    "aggregator_collectives"
  ]
  lines = [
    f"| style | all-reduce | gathers, all-to-all, permutes | bytes moved / gradient bytes ({gradient_bytes:,}) |",
    "|---|---|---|---|",
  ]
  for description, found in rows.items():
    moved = sum(found[op]["count"] for op in COLLECTIVES if op != "all-reduce")
    total = sum(found[op]["bytes"] for op in COLLECTIVES)
    size = two_d["task_gradient_bytes"] if description.startswith("2-D") else gradient_bytes
    lines.append(
      f"| {description} | {found['all-reduce']['count']} x, {found['all-reduce']['bytes']:,} B "
      f"| {moved} | {total / size:.5f} |"
    )
  lines.append(
    f"\nT = {NUM_TASKS}; leaves {', '.join(f'{k} {v}' for k, v in SHAPES.items())}, each sharded along its"
    " largest axis over 8 devices; the 2-D row's gradient bytes are its own model's"
    f" ({two_d['task_gradient_bytes']:,})."
  )
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--table", action="store_true", help="print GradOPS's collectives per style as Markdown")
  if parser.parse_args().table:
    print(table())
    return
  chosen = transforms()
  grads = stacked_grads()
  params = jax.tree.map(lambda g: jnp.zeros(g.shape[1:]), grads)
  states = {name: tx.init(params) for name, tx in chosen.items()}
  singles = jax.jit(lambda g: {name: tx.update(g, states[name])[0] for name, tx in chosen.items()})(grads)
  report = {
    "devices": jax.device_count(),
    "styles": {style: every_method_in_style(style, chosen, singles) for style in STYLES},
    "shard_map": shard_map_per_device(chosen),
    "two_d": {f"{rows}x{columns}": two_d_mesh((rows, columns)) for rows, columns in ((2, 4), (4, 2))},
    "data_parallel": {},
    "gramian_engine": {
      style: {name: gramian_engine(style, name) for name in ENGINE_METHODS[style]} for style in STYLES
    },
  }
  for axis_type in ("Auto", "Explicit"):
    mesh = jax.make_mesh((8,), ("x",), axis_types=(getattr(jax.sharding.AxisType, axis_type),))
    report["data_parallel"][axis_type] = data_parallel(mesh)
  print(json.dumps(report))


if __name__ == "__main__":
  main()
