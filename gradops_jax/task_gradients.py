"""Per-task gradients of a function that returns a vector of task losses."""

from typing import Any, Callable, Sequence, Union

import jax
import jax.numpy as jnp


def value_and_task_grads(
    fun: Callable[..., Any],
    argnums: Union[int, Sequence[int]] = 0,
    has_aux: bool = False,
) -> Callable[..., Any]:
  r"""Like :func:`jax.value_and_grad`, for a function returning T task losses.

  For ``fun`` returning the vector :math:`(L_1(\theta), \dots, L_T(\theta))`,
  the returned function computes the losses and the stacked gradients

  .. math::

    \Big(L(\theta),\ \big[\nabla_\theta L_1(\theta); \dots; \nabla_\theta L_T(\theta)\big]\Big)

  with the task axis first on every leaf: exactly the input that
  :func:`gradops_jax.scale_by_gradops` and the other aggregators expect. It is
  one forward pass and T vector-Jacobian products, vmapped over the tasks
  (reverse mode; :func:`jax.jacrev` with the value kept).

  Args:
    fun: function whose output (or first output, with ``has_aux``) is a
      1-D array of T task losses.
    argnums: which positional argument(s) to differentiate, as in JAX.
    has_aux: whether ``fun`` returns ``(losses, aux)``.

  Returns:
    A function with ``fun``'s signature returning ``(losses, task_grads)``, or
    ``((losses, aux), task_grads)`` with ``has_aux``. ``task_grads`` has the
    structure of the differentiated argument(s) (a tuple of them when
    ``argnums`` is a sequence), each leaf with a leading axis of size T.

  Example:
    >>> import jax.numpy as jnp
    >>> from gradops_jax import value_and_task_grads
    >>> def losses(w):
    ...   return jnp.stack([jnp.sum((w - 1.0) ** 2), jnp.sum((w + 1.0) ** 2)])
    >>> values, grads = value_and_task_grads(losses)(jnp.zeros(3))
    >>> grads.shape
    (2, 3)

  Raises:
    ValueError: if ``fun`` does not return a 1-D array of losses.
  """
  argnums_tuple = (argnums,) if isinstance(argnums, int) else tuple(argnums)

  def wrapped(*args, **kwargs):
    def partial_fun(*diff_args):
      full_args = list(args)
      for index, value in zip(argnums_tuple, diff_args):
        full_args[index] = value
      out = fun(*full_args, **kwargs)
      losses, aux = out if has_aux else (out, None)
      losses = jnp.asarray(losses)
      if losses.ndim != 1:
        raise ValueError(
            "value_and_task_grads needs fun to return a 1-D vector of task "
            f"losses, got an array of shape {losses.shape}."
        )
      return losses, aux

    diff_args = tuple(args[index] for index in argnums_tuple)
    losses, vjp_fn, aux = jax.vjp(partial_fun, *diff_args, has_aux=True)
    basis = jnp.eye(losses.shape[0], dtype=losses.dtype)
    grads = jax.vmap(vjp_fn)(basis)
    grads = grads[0] if isinstance(argnums, int) else grads
    value = (losses, aux) if has_aux else losses
    return value, grads

  return wrapped
