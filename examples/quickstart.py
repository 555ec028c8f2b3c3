"""Quickstart: a two-head Flax NNX model trained with GradOPS + Adam.

Two regression tasks share a trunk; their targets pull the trunk in partly
opposite directions. Each step computes the two task gradients with
``nnx_value_and_task_grads`` and lets ``gradops`` deconflict them. Run with
``python examples/quickstart.py``; it prints both task losses falling.
"""

import jax
import jax.numpy as jnp
from flax import nnx

import gradops_jax


class TwoHeads(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.trunk = nnx.Linear(8, 32, rngs=rngs)
    self.heads = nnx.List([nnx.Linear(32, 1, rngs=rngs) for _ in range(2)])

  def __call__(self, x):
    hidden = nnx.relu(self.trunk(x))
    return jnp.concatenate([head(hidden) for head in self.heads], axis=-1)


def make_data(key, n=512):
  x = jax.random.normal(key, (n, 8))
  targets = jnp.stack([jnp.sin(x[:, 0]) + x[:, 1], x[:, 1] * x[:, 2] - x[:, 0]], axis=-1)
  return x, targets


@nnx.jit
def train_step(model, optimizer, x, y):
  def task_losses(model):
    return jnp.mean((model(x) - y) ** 2, axis=0)  # shape (2,): one loss per task

  losses, task_grads = gradops_jax.nnx_value_and_task_grads(task_losses)(model)
  optimizer.update(model, task_grads)
  return losses


def main(steps: int = 300):
  model = TwoHeads(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, gradops_jax.gradops(1e-2, num_tasks=2), wrt=nnx.Param)
  x, y = make_data(jax.random.key(1))
  for step in range(steps + 1):
    losses = train_step(model, optimizer, x, y)
    if step % 50 == 0:
      print(f"step {step:4d}  task losses {losses[0]:.4f} {losses[1]:.4f}")
  print("last GradOPS task weights:", optimizer.opt_state[0].alpha_weights[...])
  return losses


if __name__ == "__main__":
  main()
