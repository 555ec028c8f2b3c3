"""The Gramian engine against the stacked engine and the summed loss: memory and step time.

    python -m benchmarks.engines --quick      # about a minute on 2 CPU cores
    python -m benchmarks.engines --full       # the sizes in benchmarks/README.md

Three training steps of the same Flax NNX model, each with Adam and donated
parameters and optimiser state: the summed loss (``jax.grad`` of the sum of
the task losses), the stacked engine (:func:`gradops_jax.value_and_task_grads`,
then the aggregator's ``update``) and the Gramian engine
(:func:`gradops_jax.value_and_aggregated_grad`). Memory is XLA's compiled
memory analysis of each step (temporary bytes, in parameter buffers: the
model's parameter count times 4 bytes); times are medians of calls measured
side by side (:func:`benchmarks.run.median_times`). ``run.py`` includes this
section.
"""

import os
import pathlib
import platform
import sys

from flax import nnx
import jax
import jax.numpy as jnp
import optax

import gradops_jax
from benchmarks.run import cpu_model
from benchmarks.run import median_times
from benchmarks.run import mode_parser

RESULTS = pathlib.Path(__file__).parent / "results"


class DeepMLP(nnx.Module):
  """``depth`` dense layers of ``width`` with ReLU, and one linear output per task."""

  def __init__(self, width, depth, num_tasks, rngs):
    self.layers = nnx.List([nnx.Linear(width, width, rngs=rngs) for _ in range(depth)])
    self.head = nnx.Linear(width, num_tasks, rngs=rngs)

  def __call__(self, x):
    for layer in self.layers:
      x = nnx.relu(layer(x))
    return self.head(x)


class ResidualCNN(nnx.Module):
  """A ResNet-like CNN: a stem, ``blocks`` residual blocks of two 3x3 convolutions, one output per task."""

  def __init__(self, channels, blocks, num_tasks, rngs):
    self.stem = nnx.Conv(3, channels, (3, 3), rngs=rngs)
    self.convs = nnx.List([nnx.Conv(channels, channels, (3, 3), rngs=rngs) for _ in range(2 * blocks)])
    self.head = nnx.Linear(channels, num_tasks, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.stem(x))
    for first, second in zip(self.convs[::2], self.convs[1::2]):
      x = nnx.relu(x + second(nnx.relu(first(x))))
    return self.head(jnp.mean(x, axis=(1, 2)))


def model_and_data(kind, size, num_tasks, batch):
  """``(graphdef, params, x, y)`` of one model; ``size`` is (width, depth) or (channels, blocks, image side)."""
  rngs = nnx.Rngs(0)
  if kind == "mlp":
    width, depth = size
    model = DeepMLP(width, depth, num_tasks, rngs)
    x = jax.random.normal(jax.random.key(1), (batch, width))
  else:
    channels, blocks, side = size
    model = ResidualCNN(channels, blocks, num_tasks, rngs)
    x = jax.random.normal(jax.random.key(1), (batch, side, side, 3))
  y = jax.random.normal(jax.random.key(2), (batch, num_tasks))
  graphdef, params = nnx.split(model, nnx.Param)
  return graphdef, params, x, y


def training_steps(task_losses, aggregator, optimizer):
  """The three training steps ``(params, opt_state, agg_state, *batch) -> (params, opt_state, agg_state)``.

  ``summed``: the gradient of the summed task losses; ``stacked``:
  :func:`gradops_jax.value_and_task_grads` then ``aggregator.update``;
  ``gramian``: :func:`gradops_jax.value_and_aggregated_grad`. Each ends with
  ``optimizer``. Not jitted (``tests/test_gramian_engine.py`` uses them too).
  """
  engine = gradops_jax.value_and_aggregated_grad(task_losses, aggregator)

  def summed(params, opt_state, agg_state, *batch):
    grads = jax.grad(lambda p: jnp.sum(task_losses(p, *batch)))(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, agg_state

  def stacked(params, opt_state, agg_state, *batch):
    _, task_grads = gradops_jax.value_and_task_grads(task_losses)(params, *batch)
    updates, agg_state = aggregator.update(task_grads, agg_state, params)
    updates, opt_state = optimizer.update(updates, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, agg_state

  def gramian(params, opt_state, agg_state, *batch):
    _, updates, agg_state = engine(agg_state, params, *batch)
    updates, opt_state = optimizer.update(updates, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, agg_state

  return {"summed": summed, "stacked": stacked, "gramian": gramian}


def steps(graphdef, aggregator, optimizer):
  """:func:`training_steps` of an NNX model's MSE task losses, jitted with parameters and states donated."""

  def task_losses(params, x, y):
    return jnp.mean((nnx.merge(graphdef, params)(x) - y) ** 2, axis=0)

  return {
    name: jax.jit(step, donate_argnums=(0, 1, 2))
    for name, step in training_steps(task_losses, aggregator, optimizer).items()
  }


def memory(step, *args):
  """XLA's compiled memory analysis of ``step(*args)``: (temporary bytes, total bytes live)."""
  analysis = step.lower(*args).compile().memory_analysis()
  total = (
    analysis.argument_size_in_bytes
    + analysis.output_size_in_bytes
    - analysis.alias_size_in_bytes
    + analysis.temp_size_in_bytes
  )
  return analysis.temp_size_in_bytes, total


def bench_engines(models, tasks, repeats, timed_tasks=(3, 8)):
  """Memory (every T) and step time (``timed_tasks``) of the three steps on each model."""
  rows = []
  for kind, size, batch in models:
    for num_tasks in tasks:
      graphdef, params, x, y = model_and_data(kind, size, num_tasks, batch)
      num_params = sum(leaf.size for leaf in jax.tree.leaves(params))
      largest = max(leaf.size for leaf in jax.tree.leaves(params))
      aggregator, optimizer = gradops_jax.scale_by_gradops(num_tasks), optax.adam(1e-3)
      compiled = steps(graphdef, aggregator, optimizer)
      row = {
        "model": kind,
        "size": list(size),
        "batch": batch,
        "T": num_tasks,
        "params": num_params,
        "largest_leaf_share": largest / num_params,
      }
      for name, step in compiled.items():
        args = (params, optimizer.init(params), aggregator.init(params), x, y)
        temp, _ = memory(step, *args)
        row[f"{name}_temp_buffers"] = temp / (4 * num_params)
      if num_tasks in timed_tasks:
        calls = {}
        for name, step in compiled.items():
          state = [jax.tree.map(jnp.copy, params), optimizer.init(params), aggregator.init(params)]

          def call(step=step, state=state):
            state[:] = step(*state, x, y)
            return state[0]

          calls[name] = (call, ())
        times = median_times(calls, repeats)
        row.update({f"{name}_ms": 1e3 * seconds for name, seconds in times.items()})
        row["gramian_over_stacked"] = times["gramian"] / times["stacked"]
        row["gramian_over_summed"] = times["gramian"] / times["summed"]
      rows.append(row)
      print(f"engines: {kind} {size} T={num_tasks} done", file=sys.stderr, flush=True)
  return rows


def bench_budget(budget_bytes, num_tasks, width, depths, batch):
  """The deepest MLP (of ``width``) whose step fits ``budget_bytes`` of live memory, per step kind."""
  largest = {}
  for depth in depths:
    graphdef, params, x, y = model_and_data("mlp", (width, depth), num_tasks, batch)
    aggregator, optimizer = gradops_jax.scale_by_gradops(num_tasks), optax.adam(1e-3)
    for name, step in steps(graphdef, aggregator, optimizer).items():
      _, total = memory(step, params, optimizer.init(params), aggregator.init(params), x, y)
      if total <= budget_bytes:
        largest[name] = {"depth": depth, "params": sum(leaf.size for leaf in jax.tree.leaves(params))}
  return {"budget_bytes": budget_bytes, "T": num_tasks, "width": width, "batch": batch, "largest": largest}


# (kind, size, batch): a deep MLP (parameters dominate memory), a CNN whose
# parameters dominate (small feature maps) and one whose activations do.
MODES = {
  "tiny": {
    "models": [("mlp", (64, 4), 8), ("cnn", (8, 2, 4), 4)],
    "tasks": [2, 3],
    "repeats": 2,
    "budget": (2**22, 64, [2, 4, 8], 8),
  },
  "quick": {
    "models": [("mlp", (512, 24), 64), ("cnn", (256, 8, 4), 16), ("cnn", (32, 4, 8), 32)],
    "tasks": [2, 3, 8, 16],
    "repeats": 5,
    "budget": (2**28, 512, [8, 16, 32, 48, 64, 96], 64),
  },
  "full": {
    "models": [("mlp", (1024, 32), 64), ("cnn", (512, 12, 4), 16), ("cnn", (64, 8, 8), 32)],
    "tasks": [2, 3, 8, 16],
    "repeats": 7,
    "budget": (2**30, 1024, [8, 16, 32, 48, 64, 96, 128], 64),
  },
}


def markdown(rows, budget):
  lines = [
    "## 10. Gramian engine vs stacked engine (GradOPS + Adam, donated state)",
    "",
    "Temporary memory in parameter buffers (XLA's compiled memory analysis); step times side by side.",
    "",
    "| model | size | batch | params | largest leaf | T | summed | stacked | Gramian | Gramian ms | stacked ms "
    "| summed ms | Gramian / stacked | Gramian / summed |",
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    times = (
      f"{r['gramian_ms']:.1f} | {r['stacked_ms']:.1f} | {r['summed_ms']:.1f} | "
      f"{r['gramian_over_stacked']:.2f} | {r['gramian_over_summed']:.2f}"
      if "gramian_ms" in r
      else " | | | | "
    )
    lines.append(
      f"| {r['model']} | {'x'.join(map(str, r['size']))} | {r['batch']} | {r['params']:,} "
      f"| {r['largest_leaf_share']:.3f} | {r['T']} | {r['summed_temp_buffers']:.2f} "
      f"| {r['stacked_temp_buffers']:.2f} | {r['gramian_temp_buffers']:.2f} | {times} |"
    )
  lines += [
    "",
    f"Deepest MLP of width {budget['width']} (batch {budget['batch']}, T={budget['T']}) whose step fits "
    f"{budget['budget_bytes'] / 2**20:.0f} MiB of live memory (arguments, outputs and temporaries):",
    "",
    "| step | depth | parameters |",
    "|---|---|---|",
  ]
  for name in ("summed", "stacked", "gramian"):
    fit = budget["largest"].get(name)
    lines.append(f"| {name} | {fit['depth']} | {fit['params']:,} |" if fit else f"| {name} | none fits | |")
  return "\n".join(lines) + "\n"


def run(mode):
  settings = MODES[mode]
  rows = bench_engines(settings["models"], settings["tasks"], settings["repeats"])
  budget_bytes, width, depths, batch = settings["budget"]
  budget = bench_budget(budget_bytes, 8, width, depths, batch)
  return rows, budget


def main(argv=None):
  args = mode_parser(__doc__, MODES, RESULTS).parse_args(argv)
  mode = args.mode or "quick"
  rows, budget = run(mode)
  machine = f"{platform.machine()} ({cpu_model()}), {len(os.sched_getaffinity(0))} cores, jax {jax.__version__}"
  table = f"# Engines ({mode})\n\nMachine: {machine}\n\n" + markdown(rows, budget)
  print(table)
  args.out.mkdir(parents=True, exist_ok=True)
  (args.out / f"engines-{mode}.md").write_text(table)
  return rows, budget


if __name__ == "__main__":
  main()
