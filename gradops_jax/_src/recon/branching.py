r"""Recon's branching: task-specific copies of the selected layers of a Flax NNX model."""

from typing import Any, Callable, Optional, Sequence

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from gradops_jax._src import validation
from gradops_jax._src.recon.scores import default_layer_name


def _check_task_outputs(outputs: Any, num_tasks: int, output_axis: Optional[int]) -> None:
  """Raises a clear error unless ``outputs`` holds the T task outputs."""
  if isinstance(outputs, (tuple, list)) and len(outputs) == num_tasks:
    return
  if isinstance(outputs, jax.Array) and output_axis is None:
    # Guessing would read a batch axis of size T as the task axis.
    raise ValueError(
      f"The model returns one array of shape {outputs.shape}: pass output_axis to "
      f"branch_layers, the axis of its {num_tasks} task outputs (e.g. output_axis=-1 for "
      "outputs of shape (batch, T))."
    )
  if isinstance(outputs, jax.Array) and output_axis is not None and outputs.ndim:
    if outputs.shape[output_axis] == num_tasks:
      return
  raise ValueError(
    f"A branched model must return its {num_tasks} task outputs, as a tuple or list "
    f"of length {num_tasks} or an array with an axis {output_axis} of size {num_tasks}; "
    f"got {jax.tree.map(jnp.shape, outputs)}."
  )


def _own_task_outputs(lane_outputs: Any, num_tasks: int, output_axis: Optional[int]) -> Any:
  """Output t of lane t, for every task t, in the structure of one lane's output."""
  if isinstance(lane_outputs, (tuple, list)):
    return type(lane_outputs)(jax.tree.map(lambda leaf: leaf[task], lane_outputs[task]) for task in range(num_tasks))
  assert output_axis is not None  # _check_task_outputs ran on every lane
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
  ``output_axis`` of size T, which must then be given), and its non-parameter state changed by the
  forward pass (RNG counts, batch statistics) is written back from task 0's
  lane. The branched model returns outputs of the same structure.
  """

  def __init__(self, model: nnx.Module, paths: tuple, num_tasks: int, output_axis: Optional[int] = None):
    params = nnx.state(model, nnx.Param)
    values = dict(jax.tree_util.tree_flatten_with_path(params)[0])
    self.model = model
    self.num_tasks = num_tasks
    self.output_axis = output_axis
    self.branched_paths = nnx.static(tuple(paths))
    self.branch_copies = nnx.List([nnx.Param(jnp.repeat(values[path][None], num_tasks - 1, axis=0)) for path in paths])

  def __call__(self, *args, **kwargs):
    graphdef, params, rest = nnx.split(self.model, nnx.Param, ...)
    paths = tuple(self.branched_paths)
    originals = dict(jax.tree_util.tree_flatten_with_path(params)[0])
    stacked = [
      jnp.concatenate([originals[path][None], copies[...]], axis=0) for path, copies in zip(paths, self.branch_copies)
    ]

    def task_lane(task_values):
      replacements = dict(zip(paths, task_values))
      task_params = jax.tree_util.tree_map_with_path(lambda path, value: replacements.get(path, value), params)
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
  output_axis: Optional[int] = None,
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
      for logits of shape ``(batch, T)``); required then, since a batch axis
      of size T would otherwise pass for the task axis. Not used when the
      model returns a tuple or list of T outputs.

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
  num_tasks = validation.check_num_tasks(num_tasks)
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


def shared_mask(model: BranchedModel, task_specific: Optional[Callable[[tuple], bool]] = None) -> Callable[[Any], Any]:
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
  branched = {(jax.tree_util.DictKey("model"),) + validation.plain_path(path) for path in model.branched_paths}

  def is_shared(path):
    path = validation.plain_path(path)
    if path[0] == jax.tree_util.DictKey("branch_copies") or path in branched:
      return False
    return not (task_specific is not None and task_specific(path))

  return lambda tree: jax.tree_util.tree_map_with_path(lambda path, _: is_shared(path), tree)
