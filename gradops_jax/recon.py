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
:func:`gradops_jax.gram.leaf_gram`, the function with which every aggregator
computes its Gram matrix: jitted together, XLA merges the two, and the
gradients are read once (``tests/test_recon.py`` checks this on the compiled
program). :func:`select_layers` ranks the layers by score, and
:func:`branch_layers` gives each task its own copy of the selected layers of
a Flax NNX model (:func:`shared_mask` then tells
:func:`gradops_jax.aggregate_shared` which parameters are still shared).
"""

from typing import Any, Callable, NamedTuple, Optional, Sequence

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from gradops_jax import _validate
from gradops_jax import gram as gram_lib


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


def _strip_value(path: tuple) -> tuple:
  """The key path without the ``.value`` through which an NNX Variable holds its array."""
  path = tuple(path)
  if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == "value":
    return path[:-1]
  return path


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
  names = [_key_name(key) for key in _strip_value(path)]
  return "/".join(names[:-1] if len(names) > 1 else names)


def _layers(tree: Any, layer_name: Callable[[tuple], str]) -> dict:
  """Layer name -> indices of its leaves, in leaf order."""
  layers = {}
  for index, (path, _) in enumerate(jax.tree_util.tree_flatten_with_path(tree)[0]):
    layers.setdefault(layer_name(path), []).append(index)
  return layers


def layer_conflict_scores(
    num_tasks: int,
    threshold: float = 0.0,
    layer_name: Callable[[tuple], str] = default_layer_name,
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
  num_tasks = _validate.check_num_tasks(num_tasks)
  _validate.check_hyperparameter_range("threshold", threshold, -1.0, 1.0)

  def init_fn(params):
    _validate.check_params(params)
    counts = {name: jnp.zeros((), jnp.int32) for name in _layers(params, layer_name)}
    return LayerConflictState(counts=counts, num_steps=jnp.zeros((), jnp.int32))

  def update_fn(task_grads, state, params=None):
    _validate.check_task_grads(task_grads, num_tasks, params)
    layers = _layers(task_grads, layer_name)
    if set(layers) != set(state.counts):
      raise ValueError(
          "The layers of the task gradients differ from those of the state: "
          f"gradients have {sorted(layers)}, the state has {sorted(state.counts)}."
      )
    leaves = jax.tree.leaves(task_grads)
    pairs = jnp.triu(jnp.ones((num_tasks, num_tasks), bool), k=1)
    counts = {}
    with jax.enable_x64(True):
      grams = [gram_lib.leaf_gram(leaf) for leaf in leaves]
      for name, indices in layers.items():
        _, _, cosine = gram_lib.cosine_from_gram(sum(grams[index] for index in indices))
        conflicts = jnp.sum(pairs & (cosine < threshold)).astype(jnp.int32)
        counts[name] = state.counts[name] + conflicts
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


def select_layers(
    state: LayerConflictState, k: Optional[int] = None, quantile: Optional[float] = None
) -> list:
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
  _validate.check_hyperparameter_range("quantile", quantile, 0.0, 1.0)
  cutoff = np.quantile([score for _, score in ranked], quantile)
  return [(name, score) for name, score in ranked if score >= cutoff and score > 0]


def _check_task_outputs(outputs: Any, num_tasks: int, output_axis: int) -> None:
  """Raises a clear error unless ``outputs`` holds the T task outputs."""
  if isinstance(outputs, (tuple, list)) and len(outputs) == num_tasks:
    return
  if isinstance(outputs, jax.Array) and outputs.ndim and outputs.shape[output_axis] == num_tasks:
    return
  raise ValueError(
      f"A branched model must return its {num_tasks} task outputs, as a tuple or list "
      f"of length {num_tasks} or an array with an axis {output_axis} of size {num_tasks}; "
      f"got {jax.tree.map(jnp.shape, outputs)}."
  )


def _own_task_outputs(lane_outputs: Any, num_tasks: int, output_axis: int) -> Any:
  """Output t of lane t, for every task t, in the structure of one lane's output."""
  if isinstance(lane_outputs, (tuple, list)):
    return type(lane_outputs)(
        jax.tree.map(lambda leaf: leaf[task], lane_outputs[task]) for task in range(num_tasks)
    )
  axis = output_axis % (lane_outputs.ndim - 1)
  own = [jnp.take(lane_outputs[task], task, axis=axis) for task in range(num_tasks)]
  return jnp.stack(own, axis=axis)


class BranchedModel(nnx.Module):
  r"""A multi-task model in which some shared layers became task-specific (Recon).

  Built by :func:`branch_layers`. Task 0 keeps the original parameters of
  every branched layer; tasks 1 to T-1 get copies, initialised from them,
  stored as one :class:`flax.nnx.Param` per branched leaf with a leading axis
  of size T-1 in ``branch_copies``. The forward pass evaluates the wrapped
  model once per task under :func:`jax.vmap` over the branched parameters
  (everything that does not depend on them, such as the layers before the
  first branched one, is computed once) and returns, for task t, output t of
  the lane that uses task t's copy.

  Structural requirements on the wrapped model: its ``__call__`` returns its
  T task outputs (a tuple or list of length T, or an array with a task axis
  ``output_axis`` of size T), and its non-parameter state changed by the
  forward pass (RNG counts, batch statistics) is written back from task 0's
  lane. The branched model returns outputs of the same structure.
  """

  def __init__(self, model: nnx.Module, paths: tuple, num_tasks: int, output_axis: int = 0):
    params = nnx.state(model, nnx.Param)
    values = dict(jax.tree_util.tree_flatten_with_path(params)[0])
    self.model = model
    self.num_tasks = num_tasks
    self.output_axis = output_axis
    self.branched_paths = nnx.static(tuple(paths))
    self.branch_copies = nnx.List([
        nnx.Param(jnp.repeat(values[path][None], num_tasks - 1, axis=0)) for path in paths
    ])

  def __call__(self, *args, **kwargs):
    graphdef, params, rest = nnx.split(self.model, nnx.Param, ...)
    paths = tuple(self.branched_paths)
    originals = dict(jax.tree_util.tree_flatten_with_path(params)[0])
    stacked = [
        jnp.concatenate([originals[path][None], copies[...]], axis=0)
        for path, copies in zip(paths, self.branch_copies)
    ]

    def task_lane(task_values):
      replacements = dict(zip(paths, task_values))
      task_params = jax.tree_util.tree_map_with_path(
          lambda path, value: replacements.get(path, value), params
      )
      model = nnx.merge(graphdef, task_params, rest, copy=True)
      outputs = model(*args, **kwargs)
      _check_task_outputs(outputs, self.num_tasks, self.output_axis)
      return outputs, nnx.state(model, nnx.Not(nnx.Param))

    outputs, lane_rest = jax.vmap(task_lane)(stacked)
    nnx.update(self.model, jax.tree.map(lambda leaf: leaf[0], lane_rest))
    return _own_task_outputs(outputs, self.num_tasks, self.output_axis)


def branch_layers(
    model: nnx.Module,
    layers: Sequence[str],
    num_tasks: int,
    layer_name: Callable[[tuple], str] = default_layer_name,
    output_axis: int = 0,
) -> tuple:
  r"""Turns the given shared layers of an NNX model into task-specific ones (Recon).

  Every parameter leaf whose layer (by ``layer_name``, as in
  :func:`layer_conflict_scores`) is in ``layers`` gets T copies, one per
  task, each initialised from the shared one, so the branched model computes
  exactly what the shared one did until training moves the copies apart.
  Task t's forward pass goes through copy t; the gradient of task t's loss
  reaches only copy t. With :math:`P_\ell` the parameters of layer
  :math:`\ell`, the model grows by :math:`(T - 1) \sum_{\ell} P_\ell`.

  The model is used as it is, not rewritten: see :class:`BranchedModel` for
  the two things it needs of the model's ``__call__``. Train the branched
  layers as task-specific parameters, e.g. with
  :func:`gradops_jax.aggregate_shared` and :func:`shared_mask`.

  Args:
    model: the shared multi-task model.
    layers: layer names, e.g. from :func:`select_layers`.
    num_tasks: T.
    layer_name: maps a parameter's key path to its layer name.
    output_axis: when the model returns one array, its task axis (e.g. -1
      for logits of shape ``(batch, T)``).

  Returns:
    ``(branched_model, num_added_parameters)``.

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from gradops_jax import recon
    >>> class TwoTasks(nnx.Module):
    ...   def __init__(self, rngs):
    ...     self.trunk = nnx.Linear(3, 4, rngs=rngs)
    ...     self.heads = nnx.List([nnx.Linear(4, 1, rngs=rngs) for _ in range(2)])
    ...   def __call__(self, x):
    ...     h = nnx.relu(self.trunk(x))
    ...     return tuple(head(h) for head in self.heads)
    >>> model = TwoTasks(nnx.Rngs(0))
    >>> branched, added = recon.branch_layers(model, ["trunk"], num_tasks=2)
    >>> added  # one more copy of a 3 x 4 kernel and its bias
    16
    >>> bool(jnp.allclose(branched(jnp.ones((5, 3)))[1], model(jnp.ones((5, 3)))[1]))
    True

  References:
    Shi et al., Recon: Reducing Conflicting Gradients from the Root for
    Multi-Task Learning, ICLR 2023; official code
    `moukamisama/Recon <https://github.com/moukamisama/Recon>`_.
  """
  num_tasks = _validate.check_num_tasks(num_tasks)
  if isinstance(layers, str):
    raise TypeError(f"layers must be a sequence of layer names, got the string {layers!r}.")
  layers = list(layers)
  flat = jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0]
  known = sorted({layer_name(path) for path, _ in flat})
  unknown = [layer for layer in layers if layer not in known]
  if unknown:
    raise ValueError(f"Unknown layers {unknown}; the model's layers are {known}.")
  if not layers:
    raise ValueError("layers is empty: nothing to branch.")
  paths = tuple(path for path, _ in flat if layer_name(path) in layers)
  added = (num_tasks - 1) * sum(int(np.prod(leaf.shape)) for path, leaf in flat if path in paths)
  return BranchedModel(model, paths, num_tasks, output_axis), added


def shared_mask(
    model: BranchedModel, task_specific: Optional[Callable[[tuple], bool]] = None
) -> Callable[[Any], Any]:
  """The ``shared`` argument of :func:`gradops_jax.aggregate_shared` for a branched model.

  A parameter is shared unless it belongs to a branched layer (task 0's
  original or the copies) or ``task_specific`` says so of its key path (the
  model's heads, typically).

  Args:
    model: a :class:`BranchedModel`.
    task_specific: optional predicate on a leaf's key path (relative to the
      branched model, e.g. starting with ``DictKey("model")``).

  Returns:
    A function from a pytree with the structure of the branched model's
    parameters (the parameters themselves, or their stacked task gradients)
    to the pytree of bools marking the shared leaves.

  Example:
    >>> import jax
    >>> from flax import nnx
    >>> from gradops_jax import recon
    >>> class Net(nnx.Module):
    ...   def __init__(self, rngs):
    ...     self.a, self.b = nnx.Linear(2, 2, rngs=rngs), nnx.Linear(2, 2, rngs=rngs)
    ...   def __call__(self, x):
    ...     return self.b(self.a(x))[None].repeat(2, axis=0)
    >>> branched, _ = recon.branch_layers(Net(nnx.Rngs(0)), ["b"], num_tasks=2)
    >>> mask = recon.shared_mask(branched)(nnx.state(branched, nnx.Param))
    >>> sorted(jax.tree.leaves(mask))
    [False, False, False, False, True, True]
  """
  if not isinstance(model, BranchedModel):
    raise TypeError(f"model must be a BranchedModel, got {type(model).__name__}.")
  branched = {(jax.tree_util.DictKey("model"),) + _strip_value(path) for path in model.branched_paths}

  def is_shared(path):
    path = _strip_value(path)
    if path[0] == jax.tree_util.DictKey("branch_copies") or path in branched:
      return False
    return not (task_specific is not None and task_specific(path))

  return lambda tree: jax.tree_util.tree_map_with_path(lambda path, _: is_shared(path), tree)
