"""The step shared by the active-set finishes of the QP solvers."""

import jax
import jax.numpy as jnp


def step_to_first_zero(point: jax.Array, solution: jax.Array, active: jax.Array):
  """The inner step of Lawson and Hanson's active-set method.

  Moves from ``point`` towards ``solution`` until the first ``active`` entry
  whose solution value is not positive reaches 0, and drops it (ties
  together).

  Returns:
    ``(new_point, new_active)``.
  """
  blocking = active & (solution <= 0)
  ratios = jnp.where(blocking, point / jnp.where(blocking, point - solution, 1.0), jnp.inf)
  step_size = jnp.min(ratios)
  moved = jnp.where(ratios == step_size, 0.0, point + step_size * (solution - point))
  return moved, active & (ratios != step_size) & (moved > 0)
