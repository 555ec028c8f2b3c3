r"""GradVac: gradient vaccine, aligning task pairs to EMA targets of their cosines."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float
import optax

from gradops_jax._src import base
from gradops_jax._src import tolerances
from gradops_jax._src import validation
from gradops_jax._src.methods import _surgery


class GradVacState(NamedTuple):
  """State of :func:`scale_by_gradvac`.

  Attributes:
    key: raw PRNG key data (uint32, see :func:`jax.random.key_data`) for
      the next step's task order; raw data so that checkpointing libraries
      can serialise the state.
    targets: ``(T, T)`` float32 EMA targets :math:`\\hat\\phi_{ij}` of the
      cosine between (modified) task ``i`` and task ``j``.
    weights: ``(T,)`` float32 weights :math:`\beta` of the last update.
  """

  key: jax.Array
  targets: jax.Array
  weights: jax.Array


def gradvac_weights(
  gram: Float[Array, "T T"], order: jax.Array, targets: jax.Array, beta: float, zero_rtol: float
) -> tuple[jax.Array, jax.Array]:
  r"""GradVac coefficients and updated targets for a given task order.

  For every task :math:`i` (vmapped), starting from :math:`g'_i = g_i`, for
  every :math:`j \ne i` in ``order``, with
  :math:`\phi_{ij} = \cos(g'_i, g_j)` and target :math:`\hat\phi_{ij}`:

  .. math::

    \text{if } \phi_{ij} < \hat\phi_{ij}: \quad
    g'_i \leftarrow g'_i + \frac{\|g'_i\| \big(\hat\phi_{ij}\sqrt{1-\phi_{ij}^2}
      - \phi_{ij}\sqrt{1-\hat\phi_{ij}^2}\big)}{\|g_j\|\sqrt{1-\hat\phi_{ij}^2}}\, g_j,
    \qquad
    \hat\phi_{ij} \leftarrow (1-\beta)\hat\phi_{ij} + \beta \phi_{ij}.

  The update is :math:`\sum_i g'_i`. Pairs with a zero gradient (a modified
  :math:`g'_i` shorter than ``zero_rtol`` times :math:`\|g_i\|` counts as
  zero: it has been cancelled down to the rounding of the inputs, and its
  direction is noise),
  or a target of exactly :math:`\pm 1` (where the formula divides by zero),
  are left unchanged, targets included.

  Args:
    gram: ``(T, T)`` Gram matrix.
    order: ``(T,)`` visiting order.
    targets: ``(T, T)`` current targets :math:`\hat\phi`.
    beta: EMA rate :math:`\beta`.
    zero_rtol: relative length below which a modified gradient counts as zero
      (:func:`~gradops_jax.default_rank_rtol` of the gradients' dtype).

  Returns:
    ``(weights, new_targets)``.
  """
  num_tasks = gram.shape[0]
  norms = jnp.sqrt(jnp.maximum(jnp.diag(gram), 0.0))

  def step(carry, task, other):
    coefficients, row = carry
    norm = jnp.sqrt(jnp.maximum(coefficients @ gram @ coefficients, 0.0))
    # A modified gradient cancelled down to rounding counts as zero.
    valid = (norm > zero_rtol * norms[task]) & (norms[other] > 0)
    cosine = jnp.where(valid, coefficients @ gram[:, other] / jnp.where(valid, norm * norms[other], 1.0), 0.0)
    cosine = jnp.clip(cosine, -1.0, 1.0)
    target = row[other]
    target_sine = jnp.sqrt(jnp.maximum(1.0 - target**2, 0.0))
    adjust = valid & (cosine < target) & (target_sine > 0)
    weight = (
      norm
      * (target * jnp.sqrt(1.0 - cosine**2) - cosine * target_sine)
      / jnp.where(adjust, norms[other] * target_sine, 1.0)
    )
    coefficients = coefficients.at[other].add(jnp.where(adjust, weight, 0.0))
    row = row.at[other].set(jnp.where(valid, (1 - beta) * target + beta * cosine, target))
    return coefficients, row

  def init_carry(task):
    return jax.nn.one_hot(task, num_tasks, dtype=gram.dtype), targets[task].astype(gram.dtype)

  coefficients, new_targets = _surgery.sequential_surgery(gram, order, step, init_carry)
  return jnp.sum(coefficients, axis=0), new_targets


def scale_by_gradvac(
  num_tasks: int, beta: float = 1e-2, seed: int = 0, precision: str = "auto"
) -> optax.GradientTransformation:
  r"""Aggregates stacked per-task gradients with GradVac.

  Each task gradient is moved towards every other task until their cosine
  reaches an adaptive target, the EMA of the cosines seen so far (see
  :func:`gradvac_weights`); the targets live in the state and start at 0,
  where GradVac reduces to PCGrad on its first step. Applied to the whole
  parameter vector (the paper also studies per-layer variants).

  Args:
    num_tasks: T.
    beta: EMA rate of the targets, in [0, 1] (the paper uses 1e-2).
    seed: seed of the PRNG key for the random task order.

    precision: ``"auto"`` (float64 where the platform runs it natively,
      else float32), ``"float64"`` or ``"float32"`` (no float64 in the
      compiled program); see ``docs/precision.md``.
  Returns:
    An :class:`optax.GradientTransformation` with a :class:`GradVacState`.

  Example:
    >>> import jax.numpy as jnp
    >>> from gradops_jax import scale_by_gradvac
    >>> tx = scale_by_gradvac(2)
    >>> g = {'w': jnp.array([[1.0, 0.0], [-1.0, 1.0]])}
    >>> d, state = tx.update(g, tx.init({'w': jnp.zeros(2)}))

  References:
    Wang et al., `Gradient Vaccine: Investigating and Improving Multi-task
    Optimization in Massively Multilingual Models
    <https://arxiv.org/abs/2010.05874>`_, ICLR 2021, Algorithm 2.
  """

  def init_state():
    return GradVacState(
      key=_surgery.initial_key_data(seed),
      targets=jnp.zeros((num_tasks, num_tasks), jnp.float32),
      weights=jnp.zeros((num_tasks,), jnp.float32),
    )

  def solve(gram, state, input_dtype):
    key, order = _surgery.next_task_order(state.key, num_tasks)
    coefficients, targets = gradvac_weights(
      gram, order, state.targets, beta, tolerances.input_rank_rtol(num_tasks, input_dtype, gram.dtype)
    )
    return coefficients, GradVacState(key=key, targets=targets, weights=coefficients)

  return base.gram_aggregator(
    num_tasks, init_state, solve, {"beta": (beta, validation.UNIT_INTERVAL)}, precision=precision
  )
