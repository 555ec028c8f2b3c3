r"""The one pipeline under every aggregator: reduce, solve in T x T, combine.

Every method of this package is a *weighting*: a function from the
:math:`T \times T` Gram matrix of the task gradients (plus its state and
hyperparameters) to :math:`T` weights :math:`\beta`. :func:`gram_aggregator`
wraps it into an :class:`optax.GradientTransformation` that validates the
stacked per-task gradients at trace time, reduces them to the Gram matrix
(exact float64 accumulation, or compensated float32 sums in the float32
mode: :mod:`gradops_jax._src.passes`, :mod:`gradops_jax._src.precision`),
calls the solve, and returns the parameter-shaped update
:math:`\sum_k \beta_k g_k`, exactly zero where it would be rounding noise
(:func:`gradops_jax._src.tolerances.without_rounding_noise`).
"""

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from gradops_jax._src import passes
from gradops_jax._src import precision as precision_lib
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
    if (
      leaves
      and all(precision_lib.is_array(leaf) for leaf in leaves)
      and not precision_lib.holds_tracer((leaves, closes_over))
    ):
      return compiled(task_grads, state, params)
    return update(task_grads, state, params)

  return update_fn


def gram_aggregator(
  num_tasks: int,
  init_state: Callable[[], NamedTuple],
  solve: SolveFn,
  hyperparameters: Optional[dict] = None,
  precision: str = "auto",
) -> optax.GradientTransformation:
  """Builds an aggregation transform from a Gram-matrix solve.

  Args:
    num_tasks: T (validated, static).
    init_state: returns the method's initial state (a NamedTuple of arrays).
    solve: ``solve(gram, state, input_dtype) -> (weights, new_state)``,
      called with the float64 Gram matrix inside ``jax.enable_x64(True)``, or
      in the float32 mode with the float32 Gram matrix of the tasks scaled by
      one power of two (every method is positively homogeneous of degree
      one, so its weights do not change); ``input_dtype`` is the least
      precise gradient dtype (for tolerances). The new state is cast back to
      the dtypes of the initial state.
    hyperparameters: ``{name: (value, validation.Range)}``, checked here.
    precision: ``"auto"``, ``"float64"`` or ``"float32"``
      (:mod:`gradops_jax._src.precision`).

  Returns:
    An :class:`optax.GradientTransformation` taking stacked per-task gradients.
  """
  num_tasks = validation.check_num_tasks(num_tasks)
  validation.check_hyperparameters(hyperparameters or {})
  precision = precision_lib.check_precision(precision)

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

    dtypes = passes.accumulation_dtypes(task_grads)

    def reduce_and_solve(float64, task_grads, state):
      if float64:
        gram = passes.task_gram(task_grads, num_tasks)
      else:
        gram = passes.task_gram_float32(task_grads, num_tasks)
      weights, new_state = solve(gram, state, input_dtype)
      weights = tolerances.without_rounding_noise(gram, weights, input_dtype)
      return passes.weight_factors(weights, dtypes), jax.tree.map(_cast_like, new_state, state)

    factors, new_state = precision_lib.run(
      precision, reduce_and_solve, (task_grads, state), hyperparameters, reverse_mode=False
    )
    return passes.combine_factors(task_grads, factors), new_state

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
  num_tasks: int, weighting: WeightingFn, hyperparameters: Optional[dict] = None, precision: str = "auto"
) -> optax.GradientTransformation:
  """Builds a transform with a :class:`WeightsState` from ``weighting(gram, input_dtype)``.

  Args:
    num_tasks: T.
    weighting: maps the Gram matrix (float64, or float32 in the float32
      mode) and the least precise gradient dtype to the ``(T,)`` weights of
      the update and a solver info.
    hyperparameters: ``{name: (value, validation.Range)}``, checked at once.
    precision: as for :func:`gram_aggregator`.

  Returns:
    An :class:`optax.GradientTransformation` with a :class:`WeightsState`.
  """

  def solve(gram, state, input_dtype):
    del state
    weights, info = weighting(gram, input_dtype)
    return weights, WeightsState(weights, info.converged, info.num_steps)

  return gram_aggregator(num_tasks, lambda: init_weights_state(num_tasks), solve, hyperparameters, precision)
