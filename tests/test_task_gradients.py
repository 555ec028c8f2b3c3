"""value_and_task_grads against jax.jacrev and per-task jax.grad."""

import chex
import jax
import jax.numpy as jnp
import numpy as np

from gradops_jax import value_and_task_grads


def _losses(params, x):
  hidden = jnp.tanh(x @ params["w"] + params["b"][None, :])
  return jnp.stack([jnp.mean(hidden**2), jnp.mean(hidden), jnp.mean(jnp.sin(hidden))])


def _params():
  key_w, key_x = jax.random.split(jax.random.key(0))
  return {"w": jax.random.normal(key_w, (4, 5)), "b": jnp.zeros(5)}, jax.random.normal(key_x, (8, 4))


def test_matches_per_task_grad():
  params, x = _params()
  losses, grads = jax.jit(value_and_task_grads(_losses))(params, x)
  chex.assert_trees_all_close(losses, _losses(params, x))
  for task in range(3):
    expected = jax.grad(lambda p: _losses(p, x)[task])(params)
    chex.assert_trees_all_close(jax.tree.map(lambda g: g[task], grads), expected, atol=1e-6)
  chex.assert_shape(grads["w"], (3, 4, 5))


def test_has_aux_and_argnums_tuple():
  params, x = _params()

  def with_aux(p, x):
    return _losses(p, x), {"n": x.shape[0]}

  (losses, aux), (grads_p, grads_x) = value_and_task_grads(with_aux, argnums=(0, 1), has_aux=True)(params, x)
  assert aux == {"n": 8}
  expected_p, expected_x = jax.jacrev(_losses, argnums=(0, 1))(params, x)
  chex.assert_trees_all_close(grads_p, expected_p, atol=1e-6)
  np.testing.assert_allclose(grads_x, expected_x, atol=1e-6)
  chex.assert_trees_all_close(losses, _losses(params, x))
