"""Sequential per-task gradient surgery in task space (PCGrad, GradVac).

Both methods modify each task gradient by visiting the other tasks one by one
in a random order. Each modified gradient is tracked as coefficients on the
original gradients, so the visits only need the Gram matrix; tasks are
vmapped and the visits run in a ``jax.lax.fori_loop`` (no Python loop over
tasks, static shapes).
"""

from typing import Any, Callable

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from gradops_jax._src import manual_axes

# step(carry, task, other) -> carry, where carry[0] holds the coefficients.
StepFn = Callable[[Any, jax.Array, jax.Array], Any]


def sequential_surgery(
  gram: Float[Array, "T T"], order: jax.Array, step: StepFn, init_carry: Callable[[jax.Array], Any]
) -> Any:
  """Runs ``step`` for every task over the other tasks in ``order``.

  Args:
    gram: ``(T, T)`` Gram matrix (closed over by ``step``).
    order: ``(T,)`` permutation giving the visiting order.
    step: ``step(carry, task, other)`` returning the new carry.
    init_carry: ``init_carry(task)`` returning the initial carry of a task.

  Returns:
    The final carries, stacked over tasks.
  """
  num_tasks = gram.shape[0]

  def one_task(task):
    def body(position, carry):
      other = order[position]
      updated = step(carry, task, other)
      return jax.tree.map(lambda new, old: jnp.where(other == task, old, new), updated, carry)

    return jax.lax.fori_loop(0, num_tasks, body, manual_axes.varying_like(init_carry(task), gram, order))

  return jax.vmap(one_task)(jnp.arange(num_tasks))


def initial_key_data(seed: int) -> jax.Array:
  """Raw PRNG key data for the state (plain uint32, so states serialise)."""
  return jax.random.key_data(jax.random.key(seed))


def next_task_order(key_data: jax.Array, num_tasks: int) -> tuple[jax.Array, jax.Array]:
  """Draws this step's visiting order; returns ``(next_key_data, order)``."""
  key, order_key = jax.random.split(jax.random.wrap_key_data(key_data))
  return jax.random.key_data(key), jax.random.permutation(order_key, num_tasks)
