r"""Recon: where in the shared network tasks conflict, and task-specific copies of those layers.

Recon (Shi et al., ICLR 2023) looks at the task gradients with respect to
each shared layer separately, counts how often two tasks conflict there, and
turns the layers with the highest counts into task-specific ones. The
*S-conflict score* of a layer :math:`\ell` over the training steps
:math:`t = 1, \dots, N` it has seen is

.. math::

  s_\ell = \sum_{t=1}^{N} \sum_{i < j}
  \mathbb{1}\big[\cos\big(g_i^{(\ell, t)}, g_j^{(\ell, t)}\big) < S\big],

where :math:`g_i^{(\ell, t)}` is task :math:`i`'s gradient with respect to all
the parameters of layer :math:`\ell` (kernel and bias together, as the
official code concatenates them) at step :math:`t`, and :math:`S \in [-1, 1]`
is the conflict threshold (the paper uses :math:`S = 0` and slightly
negative values such as -0.02 and -0.1). A task whose gradient on a layer is
zero counts as orthogonal to every other task there (cosine 0).

:func:`layer_conflict_scores` keeps the :math:`s_\ell` in its state and
passes the stacked gradients through unchanged, so it chains in front of any
aggregator. It computes the per-leaf Gram matrices with
:func:`gradops_jax.leaf_gram`, the function with which every aggregator
computes its Gram matrix: jitted together, XLA merges the two, and the
gradients are read once (``tests/test_recon.py`` checks this on the compiled
program). :func:`select_layers` ranks the layers by score, and
:func:`branch_layers` gives each task its own copy of the selected layers of
a Flax NNX model (:func:`shared_mask` then tells
:func:`gradops_jax.aggregate_shared` which parameters are still shared).
"""

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gradops_jax._src import linalg
from gradops_jax._src import passes
from gradops_jax._src import precision as precision_lib
from gradops_jax._src import validation


class LayerConflictState(NamedTuple):
  """State of :func:`layer_conflict_scores`.

  Attributes:
    counts: dict from layer name to the int32 S-conflict score :math:`s_\\ell`.
    num_steps: int32 number of steps scored.
  """

  counts: dict
  num_steps: jax.Array


def _key_name(key: Any) -> str:
  for attribute in ("key", "name", "idx"):
    if hasattr(key, attribute):
      return str(getattr(key, attribute))
  return str(key)


def default_layer_name(path: tuple) -> str:
  """The layer of a parameter leaf: its path without the last key, joined by ``/``.

  ``("trunk", "layers", 0, "kernel")`` and ``("trunk", "layers", 0, "bias")``
  both belong to layer ``"trunk/layers/0"``. A leaf at the top level of the
  pytree is a layer of its own. The ``.value`` attribute through which a
  :class:`flax.nnx.Variable` holds its array is not part of the name.

  Args:
    path: a key path from :func:`jax.tree_util.tree_flatten_with_path`.

  Returns:
    The layer name.
  """
  names = [_key_name(key) for key in validation.plain_path(path)]
  return "/".join(names[:-1] if len(names) > 1 else names)


def _layers(tree: Any, layer_name: Callable[[tuple], str]) -> dict:
  """Layer name -> indices of its leaves, in leaf order."""
  layers: dict[str, list[int]] = {}
  for index, (path, _) in enumerate(jax.tree_util.tree_flatten_with_path(tree)[0]):
    layers.setdefault(layer_name(path), []).append(index)
  return layers


def layer_conflict_scores(
  num_tasks: int,
  threshold: float = 0.0,
  layer_name: Callable[[tuple], str] = default_layer_name,
  precision: str = "auto",
) -> optax.GradientTransformation:
  r"""Counts, per layer, the task pairs whose gradients conflict (Recon's score).

  At every step, for every layer :math:`\ell` (the leaves that ``layer_name``
  maps to the same name),

  .. math::

    s_\ell \leftarrow s_\ell + \#\{(i, j) : i < j,\
    \cos(g_i^{(\ell)}, g_j^{(\ell)}) < S\},

  with the cosines read from the layer's :math:`T \times T` Gram matrix. The
  stacked per-task gradients pass through unchanged.

  Args:
    num_tasks: T, the size of the leading task axis of every leaf.
    threshold: :math:`S \in [-1, 1]`; a pair conflicts when its cosine is
      strictly below it.
    layer_name: maps a leaf's key path to its layer's name (default:
      :func:`default_layer_name`); ``jax.tree_util.keystr`` scores every leaf
      on its own.
    precision: ``"auto"``, ``"float64"`` or ``"float32"``: the arithmetic of
      the layers' Gram matrices (see ``docs/precision.md``).

  Returns:
    An :class:`optax.GradientTransformation` whose state is a
    :class:`LayerConflictState`.

  Example:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import gradops_jax
    >>> from gradops_jax import recon
    >>> params = {"trunk": {"kernel": jnp.zeros(2), "bias": jnp.zeros(())}}
    >>> tx = optax.chain(recon.layer_conflict_scores(2), gradops_jax.scale_by_gradops(2))
    >>> grads = {"trunk": {"kernel": jnp.array([[1.0, 0.0], [-1.0, 1.0]]),
    ...                    "bias": jnp.array([0.0, 0.0])}}
    >>> _, state = tx.update(grads, tx.init(params), params)
    >>> int(state[0].counts["trunk"])
    1

  References:
    Shi et al., Recon: Reducing Conflicting Gradients from the Root for
    Multi-Task Learning, ICLR 2023; official code
    `moukamisama/Recon <https://github.com/moukamisama/Recon>`_.
  """
  num_tasks = validation.check_num_tasks(num_tasks)
  validation.check_hyperparameter_range("threshold", threshold, -1.0, 1.0)
  precision = precision_lib.check_precision(precision)

  def init_fn(params):
    validation.check_params(params)
    counts = {name: jnp.zeros((), jnp.int32) for name in _layers(params, layer_name)}
    return LayerConflictState(counts=counts, num_steps=jnp.zeros((), jnp.int32))

  def update_fn(task_grads, state, params=None):
    validation.check_task_grads(task_grads, num_tasks, params)
    layers = _layers(task_grads, layer_name)
    if set(layers) != set(state.counts):
      raise ValueError(
        "The layers of the task gradients differ from those of the state: "
        f"gradients have {sorted(layers)}, the state has {sorted(state.counts)}."
      )

    def count_conflicts(float64, task_grads, counts):
      pairs = jnp.triu(jnp.ones((num_tasks, num_tasks), bool), k=1)
      leaves = jax.tree.leaves(task_grads)
      grams = [passes.leaf_gram(leaf) for leaf in leaves] if float64 else []
      new_counts = {}
      for name, indices in layers.items():
        if float64:
          gram = sum(grams[index] for index in indices)
        else:
          gram = passes.task_gram_float32([leaves[index] for index in indices], num_tasks)
        _, _, cosine = linalg.cosine_from_gram(gram)
        new_counts[name] = counts[name] + jnp.sum(pairs & (cosine < threshold)).astype(jnp.int32)
      return new_counts

    counts = precision_lib.run(precision, count_conflicts, (task_grads, state.counts), threshold)
    return task_grads, LayerConflictState(counts=counts, num_steps=state.num_steps + 1)

  return optax.GradientTransformation(init_fn, update_fn)


def find_conflict_state(opt_state: Any) -> LayerConflictState:
  """The one :class:`LayerConflictState` inside an optimiser state.

  Args:
    opt_state: a :class:`LayerConflictState`, or any optimiser state (a chain,
      an ``optax.partition``, an ``nnx.Optimizer``'s ``opt_state``) holding
      exactly one.

  Returns:
    That state.

  Example:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> from gradops_jax import recon
    >>> tx = optax.chain(recon.layer_conflict_scores(2), optax.sgd(0.1))
    >>> state = tx.init({"w": jnp.zeros(3)})
    >>> recon.find_conflict_state(state).counts
    {'w': Array(0, dtype=int32)}
  """
  found = jax.tree.leaves(opt_state, is_leaf=lambda node: isinstance(node, LayerConflictState))
  found = [node for node in found if isinstance(node, LayerConflictState)]
  if len(found) != 1:
    raise TypeError(
      f"Expected an optimiser state holding exactly one LayerConflictState, found {len(found)} "
      f"in a {type(opt_state).__name__}."
    )
  return found[0]


def select_layers(state: LayerConflictState, k: Optional[int] = None, quantile: Optional[float] = None) -> list:
  r"""The layers with the highest conflict scores, highest first.

  Either the top ``k`` layers, or every layer whose score is at least the
  ``quantile`` of the scores (and positive). Ties are broken by name, so the
  selection is deterministic.

  Args:
    state: a :class:`LayerConflictState`, or an optimiser state holding
      exactly one (see :func:`find_conflict_state`).
    k: number of layers to select, ``1 <= k <=`` the number of layers.
    quantile: in ``[0, 1]``; exactly one of ``k`` and ``quantile`` is given.

  Returns:
    A list of ``(layer name, score)`` pairs.

  Example:
    >>> import jax.numpy as jnp
    >>> from gradops_jax import recon
    >>> state = recon.LayerConflictState(
    ...     counts={"a": jnp.int32(3), "b": jnp.int32(7), "c": jnp.int32(5)},
    ...     num_steps=jnp.int32(10))
    >>> recon.select_layers(state, k=2)
    [('b', 7), ('c', 5)]

  References:
    Shi et al., Recon: Reducing Conflicting Gradients from the Root for
    Multi-Task Learning, ICLR 2023; official code
    `moukamisama/Recon <https://github.com/moukamisama/Recon>`_.
  """
  state = find_conflict_state(state)
  if (k is None) == (quantile is None):
    raise ValueError("Give exactly one of k and quantile.")
  ranked = sorted(
    ((name, int(count)) for name, count in state.counts.items()),
    key=lambda item: (-item[1], item[0]),
  )
  if k is not None:
    if isinstance(k, bool) or not isinstance(k, int):
      raise TypeError(f"k must be an int, got {k!r}.")
    if not 1 <= k <= len(ranked):
      raise ValueError(
        f"k must be in [1, {len(ranked)}] (the number of scored layers), got {k}; "
        f"the layers are {[name for name, _ in ranked]}."
      )
    return ranked[:k]
  validation.check_hyperparameter_range("quantile", quantile, 0.0, 1.0)
  cutoff = np.quantile([score for _, score in ranked], float(quantile))  # type: ignore[arg-type]
  return [(name, score) for name, score in ranked if score >= cutoff and score > 0]
