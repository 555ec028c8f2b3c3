"""One compiled update per (factory, T, hyperparameter names), shared by the tests of a worker.

Hyperparameters passed here are traced, so tests that sweep them (GradOPS's
``alpha``, CAGrad's and ConicGrad's ``c``) reuse one program per input shape
instead of compiling one per value; the update is the same computation.
"""

import functools

import jax
import jax.numpy as jnp


@functools.lru_cache(maxsize=None)
def _compiled(factory, num_tasks, names):
  def run(task_grads, values):
    tx = factory(num_tasks, **dict(zip(names, values)))
    params = jax.tree.map(lambda leaf: jnp.zeros(leaf.shape[1:], leaf.dtype), task_grads)
    return tx.update(task_grads, tx.init(params), params)

  return jax.jit(run)


def update(factory, task_grads, **hyperparameters):
  """``(updates, state)`` of ``factory(T, **hyperparameters)`` on the stacked gradients."""
  num_tasks = jax.tree.leaves(task_grads)[0].shape[0]
  names = tuple(sorted(hyperparameters))
  values = tuple(jnp.asarray(hyperparameters[name]) for name in names)
  return _compiled(factory, num_tasks, names)(task_grads, values)


def clear():
  """Drops the compiled programs (``tests/conftest.py`` frees a worker's memory maps with it)."""
  _compiled.cache_clear()
