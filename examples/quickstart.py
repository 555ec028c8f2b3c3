"""Quickstart: a two-head Flax NNX model trained with GradOPS + Adam, the recommended way.

Two regression tasks share a trunk; their targets pull the trunk in partly
opposite directions. Each step computes the two task gradients with
``nnx_value_and_task_grads``; GradOPS deconflicts the trunk's (the heads are
task-specific, so ``aggregate_shared`` gives each its own task's gradient),
with ``alpha = -1`` to favour the task the joint direction helps least. Run
``python examples/quickstart.py``: it prints both task losses falling, how
often the trunk gradients conflicted, and the last α-weights, beside the
same model trained on the summed loss.
"""

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import gradops_jax

NUM_TASKS = 2


class TwoHeads(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.trunk = nnx.Linear(8, 32, rngs=rngs)
    self.heads = nnx.List([nnx.Linear(32, 1, rngs=rngs) for _ in range(NUM_TASKS)])

  def __call__(self, x):
    hidden = nnx.relu(self.trunk(x))
    return jnp.concatenate([head(hidden) for head in self.heads], axis=-1)


def make_data(key, n=512):
  x = jax.random.normal(key, (n, 8))
  targets = jnp.stack([jnp.sin(x[:, 0]) + x[:, 1], x[:, 1] * x[:, 2] - x[:, 0]], axis=-1)
  return x, targets


def task_losses(model, x, y):
  return jnp.mean((model(x) - y) ** 2, axis=0)  # shape (2,): one loss per task


def is_shared(path):
  return path[0].key == "trunk"  # the heads are task-specific


@nnx.jit
def train_step(model, optimizer, x, y):
  losses, task_grads = gradops_jax.nnx_value_and_task_grads(task_losses)(model, x, y)
  optimizer.update(model, task_grads)
  return losses


@nnx.jit
def summed_loss_step(model, optimizer, x, y):
  def summed(model):  # the task losses before the update, as train_step reports them
    losses = task_losses(model, x, y)
    return jnp.sum(losses), losses

  (_, losses), grads = nnx.value_and_grad(summed, has_aux=True)(model)
  optimizer.update(model, grads)
  return losses


def main(steps: int = 300):
  x, y = make_data(jax.random.key(1))
  model = TwoHeads(nnx.Rngs(0))
  tx = optax.chain(
    gradops_jax.aggregate_shared(gradops_jax.scale_by_gradops(NUM_TASKS, alpha=-1.0), NUM_TASKS, is_shared),
    optax.adam(1e-2),
  )
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  baseline = TwoHeads(nnx.Rngs(0))
  baseline_optimizer = nnx.Optimizer(baseline, optax.adam(1e-2), wrt=nnx.Param)
  conflicts = 0
  for step in range(steps + 1):
    losses = train_step(model, optimizer, x, y)
    baseline_losses = summed_loss_step(baseline, baseline_optimizer, x, y)
    conflicts += int(jnp.any(optax.tree.get(optimizer.opt_state, "projected")[...]))
    if step % 50 == 0:
      print(f"step {step:4d}  task losses {losses[0]:.4f} {losses[1]:.4f}")
  print(f"summed-loss Adam, same steps: task losses {baseline_losses[0]:.4f} {baseline_losses[1]:.4f}")
  print(f"steps whose trunk gradients conflicted (and were projected): {conflicts}/{steps + 1}")
  print("last α-weights:", optax.tree.get(optimizer.opt_state, "alpha_weights")[...])
  return losses


if __name__ == "__main__":
  main()
