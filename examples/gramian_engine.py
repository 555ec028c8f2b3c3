"""The Gramian engine: a deep multi-task MLP trained with GradOPS without holding T gradients.

``nnx_value_and_aggregated_grad`` gives the update that GradOPS gives on the
stacked task gradients, from one backward pass batched over the tasks (each
leaf's stacked gradients reduced to the T x T Gram matrix as they are
produced) and one backward pass of the GradOPS-weighted sum of the losses.
The optimiser is a plain ``optax.adam`` in ``nnx.Optimizer``. Run
``python examples/gramian_engine.py``: it prints the task losses falling and
the temporary memory of the compiled step with each engine, in parameter
buffers.
"""

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import gradops_jax

NUM_TASKS = 8


class DeepMultiTask(nnx.Module):
  def __init__(self, width: int, depth: int, rngs: nnx.Rngs):
    self.layers = nnx.List([nnx.Linear(width, width, rngs=rngs) for _ in range(depth)])
    self.heads = nnx.Linear(width, NUM_TASKS, rngs=rngs)

  def __call__(self, x):
    for layer in self.layers:
      x = nnx.relu(layer(x))
    return self.heads(x)


def task_losses(model, x, y):
  return jnp.mean((model(x) - y) ** 2, axis=0)  # (NUM_TASKS,)


def make_data(width: int, key, n: int = 64):
  x = jax.random.normal(key, (n, width))
  mixing = jax.random.normal(jax.random.fold_in(key, 1), (width, NUM_TASKS)) / jnp.sqrt(width)
  return x, jnp.tanh(x @ mixing)


def temporary_buffers(step, *args) -> float:
  """Temporary memory of the compiled step, in parameter buffers."""
  params = nnx.state(args[0], nnx.Param)
  analysis = step.lower(*args).compile().memory_analysis()
  return analysis.temp_size_in_bytes / (4 * sum(leaf.size for leaf in jax.tree.leaves(params)))


def main(steps: int = 200, width: int = 128, depth: int = 12, batch: int = 64):
  x, y = make_data(width, jax.random.key(1), batch)
  model = DeepMultiTask(width, depth, nnx.Rngs(0))
  aggregator = gradops_jax.scale_by_gradops(NUM_TASKS)
  agg_state = aggregator.init(nnx.state(model, nnx.Param))
  optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
  engine = gradops_jax.nnx_value_and_aggregated_grad(task_losses, aggregator)

  @nnx.jit
  def gramian_step(model, optimizer, agg_state, x, y):
    losses, update, agg_state = engine(agg_state, model, x, y)
    optimizer.update(model, update)
    return losses, agg_state

  @nnx.jit
  def stacked_step(model, optimizer, agg_state, x, y):
    losses, task_grads = gradops_jax.nnx_value_and_task_grads(task_losses)(model, x, y)
    update, agg_state = aggregator.update(task_grads, agg_state, nnx.state(model, nnx.Param))
    optimizer.update(model, update)
    return losses, agg_state

  for name, step in (("Gramian", gramian_step), ("stacked", stacked_step)):
    buffers = temporary_buffers(step, model, optimizer, agg_state, x, y)
    print(f"{name} engine: {buffers:.2f} parameter buffers of temporaries")
  for index in range(steps + 1):
    losses, agg_state = gramian_step(model, optimizer, agg_state, x, y)
    if index % 50 == 0:
      print(f"step {index:4d}  mean task loss {float(jnp.mean(losses)):.4f}  worst {float(jnp.max(losses)):.4f}")
  return losses


if __name__ == "__main__":
  main()
