r"""The one pipeline under every aggregator: reduce, solve in T x T, combine.

Every method of this package is a *weighting*: a function from the
:math:`T \times T` Gram matrix of the task gradients (plus its state and
hyperparameters) to :math:`T` weights :math:`\beta`. :func:`gram_aggregator`
wraps it into an :class:`optax.GradientTransformation` that validates the
stacked per-task gradients at trace time, reduces them to the Gram matrix
(exact float64 accumulation, :mod:`gradops_jax._src.passes`), calls the
solve, and returns the parameter-shaped update :math:`\sum_k \beta_k g_k`,
exactly zero where it would be rounding noise
(:func:`gradops_jax._src.tolerances.without_rounding_noise`).
"""

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gradops_jax._src import forward_only
from gradops_jax._src import passes
from gradops_jax._src import tolerances
from gradops_jax._src import validation
from gradops_jax._src.solvers.accelerated import SolverInfo

# solve(gram, state, input_dtype) -> (weights, new_state)
SolveFn = Callable[[jax.Array, Any, Any], tuple[jax.Array, Any]]
# weighting(gram, input_dtype) -> (weights, info)
WeightingFn = Callable[[jax.Array, Any], tuple[jax.Array, SolverInfo]]


def _cast_like(new: jax.Array, old: jax.Array) -> jax.Array:
  """Casts a new state leaf to the dtype of the old one.

  Floating values saturate at the target dtype's largest finite value: the
  weights of tasks 1e40 apart in scale exceed float32's range although the
  update they give does not, and a diagnostic must not turn into Inf.
  """
  new = jnp.asarray(new)
  if jnp.issubdtype(old.dtype, jnp.floating) and jnp.issubdtype(new.dtype, jnp.floating):
    largest = float(jnp.finfo(old.dtype).max)
    new = jnp.clip(new, -largest, largest)
  return new.astype(old.dtype)


def _is_array(leaf: Any) -> bool:
  return isinstance(leaf, (jax.Array, np.ndarray, np.generic))


def _holds_tracer(tree: Any) -> bool:
  return any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(tree))


def compiled_when_eager(update: Callable[..., Any], closes_over: Any = ()) -> Callable[..., Any]:
  """``update``, run through one cached :func:`jax.jit` when called outside any trace.

  Called eagerly, the solvers' loops would be compiled afresh on every call
  (their bodies are new closures each time): seconds per step. Inside
  ``jit``, ``vmap`` or ``grad`` (any tracer among the arguments, or among
  ``closes_over``: the hyperparameters ``update`` reads, such as a traced
  ``alpha`` under ``jax.jvp``), and for the Gramian engine's leaves,
  ``update`` runs as it is.
  """
  compiled = jax.jit(update)

  def update_fn(task_grads, state, params=None):
    leaves = jax.tree.leaves((task_grads, state, params))
    if leaves and all(_is_array(leaf) for leaf in leaves) and not _holds_tracer((leaves, closes_over)):
      return compiled(task_grads, state, params)
    return update(task_grads, state, params)

  return update_fn


def in_float64(fn: Callable[..., Any], closes_over: Any = (), reverse_mode: bool = True) -> Callable[..., Any]:
  """``fn`` run inside ``jax.enable_x64(True)``, also when a ``vmap`` or a JVP reaches it later.

  ``jax.vmap`` around a ``lax.scan`` (or ``while_loop``, ``fori_loop``,
  ``lax.map``) does not call the loop body again: it batches the body's
  already traced program, outside the local x64 scope, where the float64
  constants of the solvers no longer type-check. So ``fn`` is a
  :func:`jax.custom_batching.custom_vmap` whose batching rule traces it afresh
  inside the scope, and a :func:`jax.custom_jvp` whose rule differentiates it
  inside the scope (JAX would otherwise trace the JVP rules of the passes
  lazily, after the scope has closed).

  A ``custom_vmap`` function may not close over traced values, so ``fn`` runs
  as it is (inside the scope, but re-batched like any traced program) when
  ``closes_over`` (the values ``fn`` reads besides its arguments, such as
  hyperparameters) holds a tracer, or when the arguments are not all arrays
  (the Gramian engine's leaves).

  With ``reverse_mode=False``, reverse-mode differentiation raises a
  :class:`TypeError` that names forward mode
  (:func:`gradops_jax._src.forward_only.guard_tangents`) instead of failing
  inside JAX; forward mode is unchanged.
  """

  def scoped(*args):
    with jax.enable_x64(True):
      return fn(*args)

  batchable = jax.custom_batching.custom_vmap(scoped)

  @batchable.def_vmap
  def batched(axis_size, in_batched, *args):
    del axis_size
    in_axes = jax.tree.map(lambda is_batched: 0 if is_batched else None, tuple(in_batched))
    out = jax.vmap(scoped, in_axes=in_axes)(*args)
    return out, jax.tree.map(lambda _: True, out)

  differentiable = jax.custom_jvp(batchable)

  @differentiable.defjvp
  def jvp(primals, tangents):
    with jax.enable_x64(True):
      out, out_tangents = jax.jvp(scoped, primals, tangents)
    if not reverse_mode:
      out_tangents = forward_only.guard_tangents(out_tangents, "a gradops_jax aggregator")
    return out, out_tangents

  def run(*args):
    arrays = all(_is_array(leaf) for leaf in jax.tree.leaves(args))
    return differentiable(*args) if arrays and not _holds_tracer(closes_over) else scoped(*args)

  return run


def gram_aggregator(
  num_tasks: int,
  init_state: Callable[[], NamedTuple],
  solve: SolveFn,
  hyperparameters: Optional[dict] = None,
) -> optax.GradientTransformation:
  """Builds an aggregation transform from a Gram-matrix solve.

  Args:
    num_tasks: T (validated, static).
    init_state: returns the method's initial state (a NamedTuple of arrays).
    solve: ``solve(gram, state, input_dtype) -> (weights, new_state)``,
      called inside ``jax.enable_x64(True)`` with the float64 Gram matrix;
      ``input_dtype`` is the least precise gradient dtype (for tolerances).
      The new state is cast back to the dtypes of the initial state.
    hyperparameters: ``{name: (value, validation.Range)}``, checked here.

  Returns:
    An :class:`optax.GradientTransformation` taking stacked per-task gradients.
  """
  num_tasks = validation.check_num_tasks(num_tasks)
  validation.check_hyperparameters(hyperparameters or {})

  def init_fn(params):
    validation.check_params(params)
    return init_state()

  def update_fn(task_grads, state, params=None):
    validation.check_task_grads(task_grads, num_tasks, params)
    if not jax.tree.leaves(task_grads):
      # Nothing to aggregate (an empty tree, or aggregate_shared with no shared leaf): no step was
      # solved, so the state, fallback counts included, stays as it was.
      return task_grads, state
    input_dtype = tolerances.least_precise_dtype(task_grads)

    def reduce_solve_combine(task_grads, state):
      gram = passes.task_gram(task_grads, num_tasks)
      weights, new_state = solve(gram, state, input_dtype)
      updates = passes.combine(task_grads, tolerances.without_rounding_noise(gram, weights, input_dtype))
      return updates, jax.tree.map(_cast_like, new_state, state)

    return in_float64(reduce_solve_combine, hyperparameters, reverse_mode=False)(task_grads, state)

  return optax.GradientTransformation(init_fn, compiled_when_eager(update_fn, hyperparameters))


class WeightsState(NamedTuple):
  """State of every aggregator that keeps nothing between steps: diagnostics of the last one.

  Attributes:
    weights: ``(T,)`` float32 weights :math:`\\beta` of the last update
      :math:`\\sum_k \\beta_k g_k` (saturated at the float32 range).
    converged: ``()`` bool, whether the last step's iterative solve met its
      tolerance (always ``True`` for closed-form methods).
    num_steps: ``()`` int32, the iterations the last step's solve took.
  """

  weights: jax.Array
  converged: jax.Array
  num_steps: jax.Array


def init_weights_state(num_tasks: int) -> WeightsState:
  return WeightsState(
    weights=jnp.zeros((num_tasks,), jnp.float32),
    converged=jnp.ones((), bool),
    num_steps=jnp.zeros((), jnp.int32),
  )


def stateless_aggregator(
  num_tasks: int, weighting: WeightingFn, hyperparameters: Optional[dict] = None
) -> optax.GradientTransformation:
  """Builds a transform with a :class:`WeightsState` from ``weighting(gram, input_dtype)``.

  Args:
    num_tasks: T.
    weighting: maps the float64 Gram matrix (and the least precise gradient
      dtype) to the ``(T,)`` weights of the update and a solver info.
    hyperparameters: ``{name: (value, validation.Range)}``, checked at once.

  Returns:
    An :class:`optax.GradientTransformation` with a :class:`WeightsState`.
  """

  def solve(gram, state, input_dtype):
    del state
    weights, info = weighting(gram, input_dtype)
    return weights, WeightsState(weights, info.converged, info.num_steps)

  return gram_aggregator(num_tasks, lambda: init_weights_state(num_tasks), solve, hyperparameters)
