r"""The Gramian engine: aggregate the task gradients without holding all T of them.

Every aggregator of this package reads the stacked task gradients twice: once
to reduce them to the :math:`T \times T` Gram matrix, once to combine them
into :math:`\sum_k \beta_k g_k`. The combination is the vector-Jacobian
product of the losses with cotangent :math:`\beta`, so the stacked Jacobian
is needed for its Gram matrix alone. The engine computes it with one batched
backward pass (:func:`jax.vmap` of the VJP over the rows of the identity),
hands the aggregator each stacked leaf wrapped as a
:class:`~gradops_jax._src.passes.JacobianRows` (which only a Gram reduction
reads), and turns the aggregator's combination into one more backward pass.
Each stacked leaf is then consumed by its Gram reduction alone, and XLA's
buffer assignment frees it before the next leaf is produced. Memory and the
compiled schedule are discussed in ``docs/design.md``.
"""

from typing import Any, Callable, Sequence, Union

from flax import nnx
import jax
import jax.numpy as jnp
import optax

from gradops_jax._src import passes
from gradops_jax._src.task_gradients import losses_and_vjp
from gradops_jax._src.task_gradients import nnx_pure_losses


def _times_power_of_two(leaf: jax.Array, exponent: jax.Array) -> jax.Array:
  """``leaf * 2**exponent``, exactly, in float32 or the leaf's dtype if wider (two factors, each in range)."""
  accumulation_dtype = leaf.dtype if jnp.finfo(leaf.dtype).bits > 32 else jnp.dtype(jnp.float32)
  one = jnp.ones((), accumulation_dtype)
  half = exponent // 2
  return ((leaf.astype(accumulation_dtype) * jnp.ldexp(one, half)) * jnp.ldexp(one, exponent - half)).astype(leaf.dtype)


# The cotangent's largest weight stays within 2**±64 (see _weighted_vjp).
_COTANGENT_EXPONENT = 64


def _weighted_vjp(vjp_fn: Callable[..., Any], factors: tuple, cotangent_dtype: Any, single: bool) -> list:
  r"""Leaves of :math:`\sum_k \beta_k g_k` as one VJP with cotangent :math:`\beta / s`.

  The weights come as the combine's factors, :math:`\beta_k = a_k b_k` with
  :math:`a_k` a power of two (:func:`gradops_jax._src.passes.weight_factors`),
  in the dtype the aggregator solved in. Each term :math:`\beta_k \nabla L_k`
  of the backward pass has the scale of its contribution to the update, so
  the weights go in as they are (:math:`s = 1`) unless their largest leaves
  :math:`2^{\pm 64}`; then :math:`s` is the power of two that brings it back
  to that bound, and the result is multiplied by :math:`s`, exactly. Scaling
  by the largest weight instead would push the weights of tasks 1e20 apart in
  scale into float32's subnormal range, where they lose their digits.
  """
  power_of_two, rest = factors
  half = jnp.frexp(power_of_two)[1] - 1
  exponents = half + jnp.frexp(rest)[1]
  nonzero = rest != 0
  exponent = jnp.max(jnp.where(nonzero, exponents, jnp.iinfo(jnp.int32).min))
  exponent = jnp.where(jnp.any(nonzero), exponent, 0)
  shift = exponent - jnp.clip(exponent, -_COTANGENT_EXPONENT, _COTANGENT_EXPONENT)
  cotangent = jnp.ldexp(rest, half - shift).astype(cotangent_dtype)
  grads = vjp_fn(cotangent)
  grads = grads[0] if single else grads
  return [_times_power_of_two(leaf, shift) for leaf in jax.tree.leaves(grads)]


def _resolve(pending_tree: Any, vjp_fn: Callable[..., Any], cotangent_dtype: Any, single: bool) -> Any:
  """The update: one weighted VJP per distinct weight vector the aggregator combined with."""
  pending, treedef = jax.tree.flatten(pending_tree)
  grads_by_weights: dict = {}
  for leaf in pending:
    if not isinstance(leaf, passes.PendingCombination):
      raise TypeError(
        "value_and_aggregated_grad: the aggregator returned "
        f"{leaf!r} where an update leaf was expected. The Gramian engine runs transforms of "
        "gradops_jax (aggregators, aggregate_shared, chains with recon's conflict scores) "
        "that reduce the task gradients to their Gram matrix and combine them once; chain "
        "the optimiser after the engine, not inside the aggregator."
      )
    if id(leaf.factors[0]) not in grads_by_weights:
      grads_by_weights[id(leaf.factors[0])] = _weighted_vjp(vjp_fn, leaf.factors, cotangent_dtype, single)
  return jax.tree.unflatten(treedef, [grads_by_weights[id(leaf.factors[0])][leaf.index] for leaf in pending])


def value_and_aggregated_grad(
  fun: Callable[..., Any],
  aggregator: optax.GradientTransformation,
  argnums: Union[int, Sequence[int]] = 0,
  has_aux: bool = False,
) -> Callable[..., Any]:
  r"""Losses and the aggregated update, without materialising the T task gradients.

  For ``fun`` returning the task losses :math:`L(\theta) \in \mathbb{R}^T`,
  computes the update that ``aggregator`` gives on the stacked gradients
  :math:`J = [\nabla L_1; \dots; \nabla L_T]`,

  .. math::

    K = J J^\top = \sum_{\text{leaves } \ell} J^{(\ell)} J^{(\ell)\top}, \qquad
    \beta = \operatorname{solve}(K), \qquad
    d = J^\top \beta = \nabla_\theta \big(\beta^\top L(\theta)\big),

  with one forward pass, one backward pass batched over the T tasks whose
  stacked leaves :math:`J^{(\ell)}` are each reduced to :math:`T \times T`
  as they are produced, and one backward pass with cotangent :math:`\beta`.
  Temporary memory is the update, T times the largest leaf, and the batched
  backward pass's activation gradients (T times those of one task), instead
  of T parameter-sized gradients. The result equals
  ``aggregator.update(task_grads, agg_state, params)`` on the output of
  :func:`value_and_task_grads` up to float32 rounding of the combination.

  Args:
    fun: ``fun(*args, **kwargs)`` returning a 1-D array of T task losses, or
      ``(losses, aux)`` with ``has_aux``. The VJP's cotangent has the losses'
      dtype, so return float32 losses from a bfloat16 model.
    aggregator: a transform of this package built for T tasks
      (``scale_by_gradops(T)``, ``aggregate_shared(...)``, a chain of
      :func:`gradops_jax.recon.layer_conflict_scores` with an aggregator,
      ...). Chain the optimiser after the engine, not inside it.
    argnums: which positional argument(s) of ``fun`` are the parameters.
    has_aux: whether ``fun`` returns ``(losses, aux)``.

  Returns:
    A function ``(agg_state, *args, **kwargs) -> (losses, update,
    new_agg_state)`` (``losses`` as ``(losses, aux)`` with ``has_aux``),
    where ``agg_state = aggregator.init(params)`` and ``update`` has the
    parameters' structure, shapes and dtypes (a tuple when ``argnums`` is a
    sequence).

  Raises:
    TypeError: the aggregator's output is not a combination of the task
      gradients (for instance an optimiser chained inside it).

  Example:
    >>> import jax.numpy as jnp, optax
    >>> import gradops_jax
    >>> def losses(w):
    ...   return jnp.stack([jnp.sum((w - 1.0) ** 2), jnp.sum((w + 1.0) ** 2)])
    >>> aggregator, optimizer = gradops_jax.scale_by_upgrad(2), optax.sgd(0.1)
    >>> w = jnp.array([0.5, 0.0])
    >>> agg_state, opt_state = aggregator.init(w), optimizer.init(w)
    >>> step = gradops_jax.value_and_aggregated_grad(losses, aggregator)
    >>> values, update, agg_state = step(agg_state, w)
    >>> update, opt_state = optimizer.update(update, opt_state, w)
    >>> w = optax.apply_updates(w, update)

  References:
    The Gramian-based Jacobian descent of torchjd's ``autogram`` engine
    (Quinton and Rey, `Jacobian Descent for Multi-Objective Optimization
    <https://arxiv.org/abs/2406.16232>`_).
  """
  single = isinstance(argnums, int)
  argnums_tuple = (argnums,) if isinstance(argnums, int) else tuple(argnums)

  def wrapped(agg_state, *args, **kwargs):
    losses, vjp_fn, aux = losses_and_vjp(fun, argnums, has_aux, args, kwargs, "value_and_aggregated_grad")
    params = args[argnums_tuple[0]] if single else tuple(args[index] for index in argnums_tuple)
    jacobian = jax.vmap(vjp_fn)(jnp.eye(losses.shape[0], dtype=losses.dtype))
    jacobian = jacobian[0] if single else jacobian
    leaves, treedef = jax.tree.flatten(jacobian)
    rows = jax.tree.unflatten(treedef, [passes.JacobianRows(leaf, index) for index, leaf in enumerate(leaves)])
    pending, new_agg_state = aggregator.update(rows, agg_state, params)
    update = _resolve(pending, vjp_fn, losses.dtype, single)
    value = (losses, aux) if has_aux else losses
    return value, update, new_agg_state

  return wrapped


def nnx_value_and_aggregated_grad(
  fun: Callable[..., Any],
  aggregator: optax.GradientTransformation,
  wrt: Any = nnx.Param,
  has_aux: bool = False,
) -> Callable[..., Any]:
  r""":func:`value_and_aggregated_grad` for a Flax NNX model.

  The contract of :func:`gradops_jax.nnx_value_and_task_grads`: only the
  ``wrt`` variables are differentiated, and the other state the forward pass
  changes (dropout RNG counts, batch statistics) is written back into the
  model. The update is an :class:`nnx.State` of the ``wrt`` variables, for
  ``nnx.Optimizer(model, optimizer, wrt=wrt).update(model, update)`` with a
  plain optax optimiser.

  Args:
    fun: ``fun(model, *args, **kwargs)`` returning a 1-D array of T task
      losses, or ``(losses, aux)`` with ``has_aux``.
    aggregator: as for :func:`value_and_aggregated_grad`; its state comes
      from ``aggregator.init(nnx.state(model, wrt))``.
    wrt: an :mod:`flax.nnx` filter of the variables to differentiate.
    has_aux: whether ``fun`` returns ``(losses, aux)``.

  Returns:
    A function ``(agg_state, model, *args, **kwargs) -> (losses, update,
    new_agg_state)``.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> from flax import nnx
    >>> import gradops_jax
    >>> model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    >>> def task_losses(model, x):
    ...   return jnp.mean(model(x) ** 2, axis=0)  # one loss per output
    >>> aggregator = gradops_jax.scale_by_gradops(2)
    >>> agg_state = aggregator.init(nnx.state(model, nnx.Param))
    >>> optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
    >>> step = gradops_jax.nnx_value_and_aggregated_grad(task_losses, aggregator)
    >>> losses, update, agg_state = step(agg_state, model, jnp.ones((4, 3)))
    >>> optimizer.update(model, update)
  """

  def wrapped(agg_state, model, *args, **kwargs):
    pure, diff_state = nnx_pure_losses(fun, model, wrt, has_aux, args, kwargs)
    engine = value_and_aggregated_grad(pure, aggregator, has_aux=True)
    (losses, (aux, new_other_state)), update, new_agg_state = engine(agg_state, diff_state)
    nnx.update(model, new_other_state)
    value = (losses, aux) if has_aux else losses
    return value, update, new_agg_state

  return wrapped
