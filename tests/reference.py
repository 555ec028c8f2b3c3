"""Slow, literal float64 NumPy readings of the papers' algorithms.

These are the oracles of the tests: loops over tasks, Gram-Schmidt exactly as
written in the papers, no cleverness. Tolerance conventions (how a direction
counts as numerically absent) are the ones documented in the package.
"""

import itertools

import numpy as np


def min_norm_point_weights(grads: np.ndarray) -> np.ndarray:
  """MGDA weights of the task gradients (T, D) by enumerating supports (exact; small T only).

  For every support S, solve the KKT system of min w^T K w on the simplex
  restricted to S and keep the feasible solution with the smallest objective
  (the problem is convex: its minimiser is the stationary point of its own
  support). The systems are solved in task-normalised coordinates
  w_i = a_i n_min / n_i (unit-diagonal cosine matrix), so that tasks 1e10
  apart in scale stay resolvable in float64; each candidate's objective is
  then measured on the vectors, ||sum_i a_i g_i / n_i||^2, since through the
  Gram matrix nearly opposite tasks read as exactly opposite and the large
  weights of their support cancel to rounding noise.
  A zero task makes the min-norm point 0: uniform weights over the zero tasks.
  """
  grads = np.asarray(grads, np.float64)
  num_tasks = grads.shape[0]
  if num_tasks > 10:
    raise ValueError("exhaustive min-norm reference is for T <= 10")
  norms = np.linalg.norm(grads, axis=1)
  if np.any(norms == 0):
    return (norms == 0) / np.sum(norms == 0)
  units = grads / norms[:, None]
  cosine = units @ units.T
  scales = norms.min() / norms
  best, best_value = None, np.inf
  for size in range(1, num_tasks + 1):
    for support in itertools.combinations(range(num_tasks), size):
      s = list(support)
      system = np.zeros((size + 1, size + 1))
      system[:size, :size] = cosine[np.ix_(s, s)]
      system[:size, size] = scales[s]
      system[size, :size] = scales[s]
      rhs = np.zeros(size + 1)
      rhs[size] = 1.0
      solution = np.linalg.lstsq(system, rhs, rcond=None)[0]
      a = np.zeros(num_tasks)
      a[s] = solution[:size]
      if np.any(a < -1e-12) or abs(scales @ a - 1) > 1e-9:
        continue
      a = np.clip(a, 0, None)
      a /= scales @ a
      value = np.sum((a @ units) ** 2)
      if value < best_value:
        best, best_value = a, value
  w = scales * best
  return w / w.sum()


def gram_schmidt_basis(vectors: list, rank_rtol: float) -> list:
  """Eq. 1 of GradOPS: u_j = g_j - sum_{k<j} proj_{u_k}(g_j).

  A u_j shorter than rank_rtol * ||g_j|| (g_j already in the span, up to
  rounding) is dropped, since proj_{u_j} would divide by ~0.
  """
  basis = []
  for g in vectors:
    norm = np.linalg.norm(g)
    if norm == 0:
      continue
    u = g.copy()
    for b in basis:
      u = u - (b @ g) / (b @ b) * b
    # Literal Eq. 1 is classical Gram-Schmidt; one re-orthogonalisation pass
    # keeps the float64 oracle exact on the near-collinear inputs of the tests.
    for b in basis:
      u = u - (b @ u) / (b @ b) * b
    if np.linalg.norm(u) <= rank_rtol * norm:
      continue
    basis.append(u)
  return basis


def residual_size(others: np.ndarray, vector: np.ndarray, rank_rtol: float) -> float:
  """Size sum_j |c_j| ||g_j|| of the residual vector - sum_j x_j g_j as a
  combination (c = 1 on ``vector``, -x on ``others``), x the least-squares
  coefficients on the others' unit directions of singular value above
  ``rank_rtol``. GradOPS counts a residual not longer than rank_rtol times
  this size as zero (the package's convention, ``docs/methods/gradops.md``)."""
  norms = np.linalg.norm(others, axis=1)
  units = others[norms > 0] / norms[norms > 0, None]
  if units.shape[0] == 0:
    return float(np.linalg.norm(vector))
  left, singular_values, right = np.linalg.svd(units, full_matrices=False)
  kept = singular_values > rank_rtol
  unit_coefficients = left[:, kept] @ ((right[kept] @ vector) / singular_values[kept])
  return float(np.linalg.norm(vector) + np.sum(np.abs(unit_coefficients)))


def gradops_reference(grads: np.ndarray, alpha: float, rank_rtol: float) -> tuple[np.ndarray, dict]:
  """Algorithm 1 of GradOPS (Zhu et al., WSDM 2025), literally, in float64.

  Args:
    grads: (T, D) task gradients.
    alpha: exponent of Eq. 5.
    rank_rtol: relative length below which a vector counts as zero.

  Returns:
    The update direction (D,) and a dict with the projected gradients g',
    the weights w, which tasks were projected and whether MGDA was used.
  """
  g = np.asarray(grads, np.float64)
  num_tasks = g.shape[0]
  norms = np.linalg.norm(g, axis=1)
  projected_grads, projected = [], []
  for i in range(num_tasks):
    conflict = any(g[i] @ g[k] < 0 for k in range(num_tasks) if k != i)
    if norms[i] == 0 or not conflict:  # lines 7-8
      projected_grads.append(g[i].copy())
      projected.append(False)
      continue
    basis = gram_schmidt_basis([g[j] for j in range(num_tasks) if j != i], rank_rtol)
    g_prime = g[i] - sum(((u @ g[i]) / (u @ u) * u for u in basis), np.zeros_like(g[i]))
    if np.linalg.norm(g_prime) <= rank_rtol * residual_size(np.delete(g, i, axis=0), g[i], rank_rtol):
      g_prime = np.zeros_like(g_prime)
    projected_grads.append(g_prime)
    projected.append(True)
  projected_grads = np.stack(projected_grads)
  info = {"projected_grads": projected_grads, "projected": np.array(projected)}
  if not np.any(projected_grads != 0):  # line 16: MGDA
    w = min_norm_point_weights(g)
    info.update(weights=w, used_fallback=True)
    return w @ g, info
  total = projected_grads.sum(axis=0)  # G' (line 12)
  scores = np.array([total @ g[i] / norms[i] if norms[i] > 0 else 0.0 for i in range(num_tasks)])  # Eq. 3
  scores[scores <= rank_rtol * scores.max()] = 0.0
  r = scores / scores.mean()  # Eq. 4
  if alpha == 0:
    powered = np.ones(num_tasks)
  else:
    with np.errstate(divide="ignore"):
      powered = np.where(r > 0, np.abs(r) ** alpha, 0.0)
  w = powered / powered.mean()  # Eq. 5
  info.update(weights=w, used_fallback=False)
  return w @ projected_grads, info


def pcgrad_reference(grads: np.ndarray, order: list) -> np.ndarray:
  """PCGrad (Yu et al., 2020), Algorithm 1, with a given order of the others."""
  g = np.asarray(grads, np.float64)
  out = []
  for i in range(g.shape[0]):
    gi = g[i].copy()
    for j in order:
      if j == i:
        continue
      dot = gi @ g[j]
      if dot < 0:
        gi = gi - dot / (g[j] @ g[j]) * g[j]
    out.append(gi)
  return np.sum(out, axis=0)


def _span_projection(rows: np.ndarray, vector: np.ndarray) -> np.ndarray:
  """Orthogonal projection of ``vector`` onto the span of ``rows`` (singular
  values below 1e-12 of the largest count as zero)."""
  if rows.shape[0] == 0:
    return np.zeros_like(vector)
  _, singular_values, right = np.linalg.svd(rows, full_matrices=False)
  basis = right[singular_values > 1e-12 * singular_values.max()]
  return basis.T @ (basis @ vector)


def upgrad_reference(grads: np.ndarray) -> np.ndarray:
  """UPGrad (Quinton and Rey, 2024): mean of the projections of each g_i onto
  the dual cone {x : G x >= 0}, each projection found in the primal by
  enumerating the sets of active constraints (small T only)."""
  g = np.asarray(grads, np.float64)
  num_tasks = g.shape[0]
  norms = np.linalg.norm(g, axis=1, keepdims=True)
  # The cone is unchanged by positive scaling of its constraints: use unit rows.
  unit = np.where(norms > 0, g / np.where(norms > 0, norms, 1.0), 0.0)
  scale = max(norms.max(), 1e-300)
  projections = []
  for i in range(num_tasks):
    best, best_distance = None, np.inf
    for size in range(0, num_tasks + 1):
      for active in itertools.combinations(range(num_tasks), size):
        # Projection onto {x : a x = 0} for the active rows a, through an
        # orthonormal basis of their span (normal equations would square the
        # condition number of nearly opposite rows); the true projection onto
        # the cone is the closest feasible one among these candidates.
        x = g[i] - _span_projection(unit[list(active)], g[i])
        # Feasibility of the projected point, then keep the closest feasible.
        if np.all(unit @ x >= -1e-9 * np.linalg.norm(g[i])):
          distance = np.linalg.norm(x - g[i])
          if distance < best_distance - 1e-14 * scale:
            best, best_distance = x, distance
    projections.append(best)
  return np.mean(projections, axis=0)


def imtl_g_reference(grads: np.ndarray) -> tuple[np.ndarray, float]:
  """IMTL-G (Liu et al., ICLR 2021), Sec. 3.2 closed form, non-zero gradients:
  alpha_{2:T} = g_1 U^T (D U^T)^{-1}, alpha_1 = 1 - sum alpha_{2:T}.

  Returns the update and the condition number of D U^T (the closed form is
  only defined, and only a trustworthy oracle, when it is moderate).
  """
  g = np.asarray(grads, np.float64)
  if g.shape[0] == 1:
    return g[0], 1.0
  u = g / np.linalg.norm(g, axis=1, keepdims=True)
  d = g[0] - g[1:]
  uu = u[0] - u[1:]
  system = d @ uu.T
  alpha_rest = np.linalg.lstsq(system.T, uu @ g[0], rcond=None)[0]
  alpha = np.concatenate([[1 - alpha_rest.sum()], alpha_rest])
  return alpha @ g, np.linalg.cond(system)


def gradvac_reference(grads, order, targets, beta, zero_rtol):
  """GradVac (Wang et al., ICLR 2021), Algorithm 2, one step, given order."""
  g = np.asarray(grads, np.float64)
  targets = np.array(targets, np.float64)
  out = []
  for i in range(g.shape[0]):
    gi = g[i].copy()
    for j in order:
      if j == i or np.linalg.norm(gi) <= zero_rtol * np.linalg.norm(g[i]) or np.linalg.norm(g[j]) == 0:
        continue
      phi = np.clip(gi @ g[j] / (np.linalg.norm(gi) * np.linalg.norm(g[j])), -1, 1)
      target = targets[i, j]
      if phi < target and abs(target) < 1:
        gi = (
          gi
          + np.linalg.norm(gi)
          * (target * np.sqrt(1 - phi**2) - phi * np.sqrt(1 - target**2))
          / (np.linalg.norm(g[j]) * np.sqrt(1 - target**2))
          * g[j]
        )
      targets[i, j] = (1 - beta) * target + beta * phi
    out.append(gi)
  return np.sum(out, axis=0), targets


def cagrad_reference(grads: np.ndarray, c: float) -> tuple[np.ndarray, np.ndarray]:
  """CAGrad (Liu et al., NeurIPS 2021) as the official code: SLSQP on the
  dual over the simplex, then d = (g0 + c||g0||/||g_w|| g_w) / (1 + c^2)."""
  from scipy.optimize import minimize

  g = np.asarray(grads, np.float64)
  num_tasks = g.shape[0]
  gram = g @ g.T
  gram = gram / max(np.max(np.diag(gram)), 1e-300)
  b = np.ones(num_tasks) / num_tasks
  radius = c * np.sqrt(max(b @ gram @ b, 0.0))  # rounds below 0 when the tasks cancel

  def objective(x):
    return x @ gram @ b + radius * np.sqrt(max(x @ gram @ x, 0.0))

  result = minimize(
    objective,
    b,
    bounds=[(0, 1)] * num_tasks,
    constraints=({"type": "eq", "fun": lambda x: 1 - np.sum(x)},),
    method="SLSQP",
    options={"ftol": 1e-14, "maxiter": 1000},
  )
  w = result.x
  gw = w @ g
  g0 = b @ g
  norm_g0 = np.linalg.norm(g0)
  d = g0 + (c * norm_g0 / np.linalg.norm(gw)) * gw if np.linalg.norm(gw) > 0 else g0
  return d / (1 + c**2), w


def aligned_mtl_reference(grads: np.ndarray, rank_rtol: float) -> np.ndarray:
  """Aligned-MTL (Senushkin et al., CVPR 2023), Algorithm 1, mean preference."""
  g = np.asarray(grads, np.float64)
  num_tasks = g.shape[0]
  m = g @ g.T
  eigenvalues, eigenvectors = np.linalg.eigh(m)
  rank = int(np.sum(eigenvalues > rank_rtol * eigenvalues.max()))
  if rank == 0:
    return np.ones(num_tasks) / num_tasks @ g
  order = np.argsort(eigenvalues)[::-1]
  eigenvalues, eigenvectors = eigenvalues[order][:rank], eigenvectors[:, order][:, :rank]
  balance = np.sqrt(eigenvalues[-1]) * eigenvectors @ np.diag(1 / np.sqrt(eigenvalues)) @ eigenvectors.T
  return (balance @ (np.ones(num_tasks) / num_tasks)) @ g
