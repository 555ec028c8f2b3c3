"""Task-gradient matrices that real training produces trouble with.

Every case is a float32 (T, D) matrix; the tests compare the package, run on
the float32 values, with the float64 oracles of ``reference.py`` run on the
very same values.
"""

import numpy as np


def _conflicting(rng, num_tasks, dim):
  """Random gradients with a shared component of random sign: many conflicts."""
  shared = rng.standard_normal(dim)
  signs = rng.choice([-1.0, 1.0], size=(num_tasks, 1))
  return 0.8 * signs * shared + rng.standard_normal((num_tasks, dim))


def _near_collinear(rng, dim, one_minus_cos=1e-6):
  """Two tasks at cosine 1 - one_minus_cos, a third conflicting with both."""
  base = rng.standard_normal(dim)
  base /= np.linalg.norm(base)
  other = rng.standard_normal(dim)
  other -= (other @ base) * base
  other /= np.linalg.norm(other)
  sine = np.sqrt(1 - (1 - one_minus_cos) ** 2)
  g1 = base
  g2 = (1 - one_minus_cos) * base + sine * other
  g3 = -0.3 * base + 0.5 * other + 0.8 * rng.standard_normal(dim) / np.sqrt(dim)
  return np.stack([g1, g2, g3])


def _unit(rng, dim):
  vector = rng.standard_normal(dim)
  return vector / np.linalg.norm(vector)


def _split_scales(rng, grads, low, high):
  return grads * (10.0 ** rng.uniform(low, high, size=(grads.shape[0], 1)))


def hard_cases(seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  dim = 96
  cases = {}
  for num_tasks in (1, 2, 3, 5, 8, 16, 32):
    cases[f"random_T{num_tasks}"] = rng.standard_normal((num_tasks, dim))
    cases[f"conflicting_T{num_tasks}"] = _conflicting(rng, num_tasks, dim)
  cases["near_collinear"] = _near_collinear(rng, dim)
  cases["near_collinear_1e-4"] = _near_collinear(rng, dim, 1e-4)
  g = _conflicting(rng, 4, dim)
  g[3] = g[0] + g[1]
  cases["rank_deficient_sum"] = g
  cases["more_tasks_than_dims"] = _conflicting(rng, 8, 5)
  g = _conflicting(rng, 5, dim)
  g[2] = 0.0
  cases["zero_task"] = g
  cases["all_zero"] = np.zeros((3, dim))
  g = _conflicting(rng, 4, dim)
  g[3] = g[1]
  cases["duplicated"] = g
  g = _conflicting(rng, 4, dim)
  g[1] = -g[0]
  cases["exactly_opposite_plus_others"] = g
  g = rng.standard_normal((1, dim))
  cases["exactly_opposite_T2"] = np.concatenate([g, -g])
  cases["opposite_unequal_T2"] = np.concatenate([g, -3.0 * g])
  star = np.array([[1.0, 0.0], [-0.5, np.sqrt(3) / 2], [-0.5, -np.sqrt(3) / 2]])
  cases["three_way_cancel"] = np.concatenate([star, np.zeros((3, 4))], axis=1)
  # Each projected g'_i is zero but the min-norm point is not (line 16).
  cases["fallback_nonzero_mgda"] = np.array([[1.0, 0.0], [-1.0, 0.1], [0.5, 1.0]])
  cases["mixed_scales_1e-20_1e20"] = _split_scales(rng, _conflicting(rng, 4, dim), -20, 20)
  cases["tiny_1e-20"] = 1e-20 * _conflicting(rng, 3, dim)
  cases["huge_1e20"] = 1e20 * _conflicting(rng, 3, dim)
  cases["one_task_1e10_larger"] = _conflicting(rng, 4, dim) * np.array([[1e10], [1], [1], [1]])
  # More tasks than dimensions with a pair at relative distance 1e-4: every
  # task's residual off the others is rounding, which a solve from the Gram
  # matrix sees as combinations with coefficients up to 3e4.
  g = _conflicting(rng, 7, 6)
  g[2] = g[0] + 1e-4 * np.linalg.norm(g[0]) * _unit(rng, 6)
  cases["near_duplicate_pair_spanning"] = g
  return {name: value.astype(np.float32) for name, value in cases.items()}


def split_into_pytree(matrix: np.ndarray) -> dict:
  """Splits the (T, D) columns into leaves of mixed shapes (D >= 13)."""
  num_tasks, dim = matrix.shape
  shapes = {"dense": {"kernel": (2, 3), "bias": (3,)}, "scalar": (), "cube": (1, 2, 2)}
  leaves, start, tree = [], 0, {}
  flat_shapes = [("dense", "kernel"), ("dense", "bias"), ("scalar",), ("cube",)]
  for key in flat_shapes:
    shape = shapes[key[0]] if len(key) == 1 else shapes[key[0]][key[1]]
    size = int(np.prod(shape, dtype=int))
    leaves.append(matrix[:, start : start + size].reshape((num_tasks, *shape)))
    start += size
  tree = {
    "dense": {"kernel": leaves[0], "bias": leaves[1]},
    "scalar": leaves[2],
    "cube": leaves[3],
    "rest": matrix[:, start:],
  }
  return tree
