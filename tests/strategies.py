"""Hypothesis strategies for stacked per-task gradient pytrees that make trouble.

A drawn example is built the way real training goes wrong: a base set of task
gradients (independent, sharing a component of random sign, or of low rank),
then a short list of edits that hypothesis chooses and shrinks (exact and near
duplicates, exactly opposite tasks, a task that is a combination of two others,
zero tasks, one task 1e10 times larger or smaller, a subnormal task), an
overall scale from 1e-30 to 1e30, and a dtype (float32, bfloat16 or float64).
The values themselves come from a NumPy generator seeded by hypothesis, so an
example is small to store and replay while the structure is searched.

Shapes come from a small pool (T in 1..64, two pytree structures) so that the
jitted transforms compile a bounded number of times however many examples run;
the thorough profile also draws T = 128 and 256 (more tasks than dimensions in
both structures, as in instance-wise risk minimisation).
"""

import dataclasses

from hypothesis import settings
import hypothesis.strategies as st
import jax.numpy as jnp
import numpy as np

NUM_TASKS = (1, 2, 3, 4, 5, 8, 16, 64)
LARGE_NUM_TASKS = (128, 256)  # the thorough profile only: seconds per compile and per hard solve
# Mixed leaf shapes (D = 40), and one small leaf (D = 6) where most T exceed D.
STRUCTURES = {
  "mixed": {"dense": {"kernel": (3, 4), "bias": (4,)}, "scalar": (), "conv": (2, 2, 1, 3), "rest": (11,)},
  "narrow": {"w": (3, 2)},
}
DTYPES = ("float32", "bfloat16", "float64")
# Relative sizes of near-duplicate perturbations: 1e-8 is below every rank
# tolerance of the package, 1e-3 above the float32 and float64 ones, so the
# float32 rank decisions of the package and of the oracles are well posed.
NEAR_DUPLICATE_SIZES = (1e-8, 1e-3)
# Largest entry allowed for a dtype: any method's update is a combination of
# at most 64 tasks with weights below 64, so its size stays below this times
# 64 * 64 * sqrt(D) < 1e6, and it fits the dtype.
HEADROOM = 1e6


@dataclasses.dataclass(frozen=True)
class TaskGradients:
  """One drawn example.

  Attributes:
    tree: pytree of NumPy arrays ``(T, *shape)`` in ``dtype``.
    matrix: ``(T, D)`` float64 copy of exactly those values, leaves flattened
      in ``jax.tree.leaves`` order (for the float64 oracles).
    dtype: the name of the leaves' dtype.
    edits: the edits applied, for the failure report.
  """

  tree: dict
  matrix: np.ndarray
  dtype: str
  edits: tuple

  @property
  def num_tasks(self) -> int:
    return self.matrix.shape[0]

  def within_float32_normal_range(self) -> bool:
    """Whether every non-zero entry is a normal float32 number (no subnormal
    that a flush-to-zero backend would read as zero, nothing that overflows)."""
    magnitudes = np.abs(self.matrix[self.matrix != 0])
    info = np.finfo(np.float32)
    return bool(np.all((magnitudes >= info.tiny) & (magnitudes <= info.max)))


def _edit(num_tasks):
  task = st.integers(0, num_tasks - 1)
  return st.one_of(
    st.tuples(st.just("duplicate"), task, task),
    st.tuples(st.just("near_duplicate"), task, task, st.sampled_from(NEAR_DUPLICATE_SIZES)),
    st.tuples(st.just("opposite"), task, task, st.sampled_from((1.0, 0.5, 3.0))),
    st.tuples(st.just("combination"), task, task, task, st.sampled_from((1.0, -0.5, 2.0))),
    st.tuples(st.just("zero"), task),
    st.tuples(st.just("rescale"), task, st.sampled_from((1e10, 1e-10))),
    st.tuples(st.just("subnormal"), task),
  )


def _base(rng, kind, num_tasks, dim):
  if kind == "independent":
    return rng.standard_normal((num_tasks, dim))
  if kind == "shared_component":
    signs = rng.choice([-1.0, 1.0], size=(num_tasks, 1))
    return 0.8 * signs * rng.standard_normal(dim) + rng.standard_normal((num_tasks, dim))
  rank = int(rng.integers(1, max(1, min(num_tasks, dim) - 1) + 1))
  return rng.standard_normal((num_tasks, rank)) @ rng.standard_normal((rank, dim))


def _apply_edit(rng, matrix, edit, dtype):
  name, *args = edit
  if name == "duplicate":
    i, j = args
    matrix[j] = matrix[i]
  elif name == "near_duplicate":
    i, j, size = args
    noise = rng.standard_normal(matrix.shape[1])
    matrix[j] = matrix[i] + size * np.linalg.norm(matrix[i]) * noise / np.linalg.norm(noise)
  elif name == "opposite":
    i, j, factor = args
    matrix[j] = -factor * matrix[i]
  elif name == "combination":
    i, j, k, coefficient = args
    matrix[k] = matrix[i] + coefficient * matrix[j]
  elif name == "zero":
    matrix[args[0]] = 0.0
  elif name == "rescale":
    i, factor = args
    matrix[i] *= factor
  elif name == "subnormal":
    i = args[0]
    largest = np.abs(matrix[i]).max()
    if largest > 0:
      matrix[i] *= 0.01 * float(jnp.finfo(dtype).tiny) / largest
  return matrix


@st.composite
def task_gradients(draw, dtypes=DTYPES, max_num_tasks=LARGE_NUM_TASKS[-1]) -> TaskGradients:
  """Draws a :class:`TaskGradients` example."""
  pool = NUM_TASKS + (LARGE_NUM_TASKS if settings.get_current_profile_name() == "thorough" else ())
  num_tasks = draw(st.sampled_from([t for t in pool if t <= max_num_tasks]))
  structure_name = draw(st.sampled_from(sorted(STRUCTURES)))
  structure = STRUCTURES[structure_name]
  dtype = draw(st.sampled_from(dtypes))
  rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
  shapes = [shape for _, shape in sorted(_flatten_shapes(structure))]
  dim = sum(int(np.prod(shape, dtype=int)) for shape in shapes)
  matrix = _base(rng, draw(st.sampled_from(("independent", "shared_component", "low_rank"))), num_tasks, dim)
  scale_exponent = draw(st.integers(-30, 30))
  edits = tuple(draw(st.lists(_edit(num_tasks), max_size=4)))
  matrix = matrix * 10.0**scale_exponent
  for edit in edits:
    if edit[0] != "subnormal":
      matrix = _apply_edit(rng, matrix, edit, dtype)
  largest = np.abs(matrix).max()
  limit = float(jnp.finfo(dtype).max) / HEADROOM
  if largest > limit:
    matrix *= limit / largest
  for edit in edits:  # last, so that no later edit scales a subnormal task up
    if edit[0] == "subnormal":
      matrix = _apply_edit(rng, matrix, edit, dtype)
  cast = np.asarray(jnp.asarray(matrix.astype(np.float64), dtype) if dtype != "float64" else matrix)
  return from_matrix(cast, structure_name, dtype, edits)


def from_matrix(matrix, structure_name, dtype, edits) -> TaskGradients:
  """The example whose ``(T, D)`` matrix, of values representable in ``dtype``,
  is laid out in the leaves of ``STRUCTURES[structure_name]``."""
  tree, start = {}, 0
  leaves = []
  for path, shape in sorted(_flatten_shapes(STRUCTURES[structure_name])):
    size = int(np.prod(shape, dtype=int))
    leaves.append((path, matrix[:, start : start + size].astype(jnp.dtype(dtype)).reshape((-1, *shape))))
    start += size
  tree = _unflatten(leaves)
  return TaskGradients(tree=tree, matrix=np.asarray(matrix, np.float64), dtype=dtype, edits=edits)


def _flatten_shapes(structure, prefix=()):
  for key, value in structure.items():
    if isinstance(value, dict):
      yield from _flatten_shapes(value, (*prefix, key))
    else:
      yield (*prefix, key), value


def _unflatten(leaves):
  tree = {}
  for path, value in leaves:
    node = tree
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return tree
