"""Per-task gradients of a function that returns a vector of task losses."""

from typing import Any, Callable, Sequence, Union, cast

from flax import nnx
import jax
import jax.numpy as jnp


def losses_and_vjp(
  fun: Callable[..., Any],
  argnums: Union[int, Sequence[int]],
  has_aux: bool,
  args: tuple,
  kwargs: dict,
  caller: str,
) -> tuple[jax.Array, Callable[..., Any], Any]:
  """``(losses, vjp_fn, aux)`` of ``fun(*args, **kwargs)`` in the arguments ``argnums``.

  Checks that the output is a 1-D vector of losses and that every
  differentiated leaf is floating point, naming ``caller`` in the errors.
  """
  argnums_tuple = (argnums,) if isinstance(argnums, int) else tuple(argnums)

  def partial_fun(*diff_args):
    full_args = list(args)
    for index, value in zip(argnums_tuple, diff_args):
      full_args[index] = value
    out = fun(*full_args, **kwargs)
    losses, aux = out if has_aux else (out, None)
    losses = jnp.asarray(losses)
    if losses.ndim != 1:
      raise ValueError(
        f"{caller} needs fun to return a 1-D vector of task losses, got an array of shape {losses.shape}."
      )
    return losses, aux

  diff_args = tuple(args[index] for index in argnums_tuple)
  for index, arg in zip(argnums_tuple, diff_args):
    for path, leaf in jax.tree_util.tree_leaves_with_path(arg):
      if not jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
        # jax.grad raises here too; a float0 "gradient" would only fail later, far from the cause.
        raise TypeError(
          f"{caller} differentiates argument {index}, whose leaf "
          f"{jax.tree_util.keystr(path) or '<root>'} has dtype {jnp.result_type(leaf)}; "
          "gradients need floating-point inputs (pass integer arguments outside argnums)."
        )
  return jax.vjp(partial_fun, *diff_args, has_aux=True)


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
  one forward pass and T vector-Jacobian products, one task after another in
  a :func:`jax.lax.map` over the rows of the identity (a scan, so it compiles
  once whatever T is).

  Why not :func:`jax.vmap` over the cotangents, as :func:`jax.jacrev` does:
  the batched VJP of a dense layer yields its kernel gradients in a transposed
  layout that XLA then makes every consumer read with strides, which made the
  whole training step several times slower (``benchmarks/README.md``,
  section 8). A scan also keeps one task's intermediates alive at a time, not T.

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

  def wrapped(*args, **kwargs):
    losses, vjp_fn, aux = losses_and_vjp(fun, argnums, has_aux, args, kwargs, "value_and_task_grads")
    basis = jnp.eye(losses.shape[0], dtype=losses.dtype)
    grads = jax.lax.map(vjp_fn, basis)
    grads = grads[0] if isinstance(argnums, int) else grads
    value = (losses, aux) if has_aux else losses
    return value, grads

  return wrapped


def nnx_value_and_task_grads(
  fun: Callable[..., Any],
  wrt: Any = nnx.Param,
  has_aux: bool = False,
) -> Callable[..., Any]:
  r"""Per-task losses and stacked gradients of a Flax NNX model.

  For ``fun(model, *args)`` returning the T task losses, computes
  :math:`L(\theta)` and :math:`[\nabla_\theta L_1; \dots; \nabla_\theta L_T]`
  for the variables :math:`\theta` of ``model`` selected by ``wrt``, as an
  :class:`nnx.State` whose every leaf carries a leading task axis: pass it
  straight to ``nnx.Optimizer(model, tx, wrt=wrt).update(model, task_grads)``.

  Unlike :func:`value_and_task_grads` applied to the model itself, only the
  ``wrt`` variables are differentiated (no integer or key-typed gradients for
  RNG streams or counters), and the other state that the forward pass
  changes (dropout RNG counts, batch statistics) is written back into
  ``model``, as :func:`nnx.grad` does. It is one forward pass and T
  vector-Jacobian products (see :func:`value_and_task_grads`); the ``model`` is split with
  :func:`nnx.split` and merged inside the differentiated function with
  :func:`nnx.merge` (``copy=True``, so that the forward pass may mutate it).

  Args:
    fun: ``fun(model, *args, **kwargs)`` returning a 1-D array of T task
      losses, or ``(losses, aux)`` with ``has_aux``.
    wrt: an :mod:`flax.nnx` filter of the variables to differentiate.
    has_aux: whether ``fun`` returns ``(losses, aux)``.

  Returns:
    A function ``(model, *args, **kwargs) -> (losses, task_grads)`` (or
    ``((losses, aux), task_grads)``) where ``task_grads`` is an
    :class:`nnx.State` of the ``wrt`` variables with leaves ``(T, *shape)``.

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from gradops_jax import nnx_value_and_task_grads
    >>> model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    >>> def task_losses(model, x):
    ...   return jnp.mean(model(x) ** 2, axis=0)  # one loss per output
    >>> losses, grads = nnx_value_and_task_grads(task_losses)(model, jnp.ones((4, 3)))
    >>> grads['kernel'].shape
    (2, 3, 2)

  References:
    The per-task gradients that every method of Zhu et al., WSDM 2025 (GradOPS,
    Algorithm 1, line 2) starts from.
  """

  def wrapped(model, *args, **kwargs):
    pure, diff_state = nnx_pure_losses(fun, model, wrt, has_aux, args, kwargs)
    (losses, (aux, new_other_state)), task_grads = value_and_task_grads(pure, has_aux=True)(diff_state)
    nnx.update(model, new_other_state)
    value = (losses, aux) if has_aux else losses
    return value, task_grads

  return wrapped


def nnx_pure_losses(
  fun: Callable[..., Any], model: Any, wrt: Any, has_aux: bool, args: tuple, kwargs: dict
) -> tuple[Callable[[Any], Any], Any]:
  """``(pure, diff_state)``: ``fun(model, ...)`` as a pure function of the ``wrt`` state.

  ``pure(diff_state)`` returns ``(losses, (aux, other_state))``, where
  ``other_state`` is the non-differentiated state after the forward pass (to
  be written back with :func:`nnx.update`). The model is merged with
  ``copy=True`` so that the forward pass may mutate it.
  """
  # nnx.split's return type is a variadic tuple; with two filters it has three parts.
  graphdef, diff_state, other_state = cast(Any, nnx.split(model, wrt, ...))

  def pure(diff_state):
    inner = nnx.merge(graphdef, diff_state, other_state, copy=True)
    out = fun(inner, *args, **kwargs)
    losses, aux = out if has_aux else (out, None)
    return losses, (aux, nnx.state(inner, nnx.Not(wrt)))

  return pure, diff_state
