"""Inputs on which the thorough hypothesis profile found bugs, replayed on every run.

CI keeps no hypothesis example database, so each input found by a thorough
run is stored here (``tests/data/property_regressions.npz``: the exact
``(T, D)`` values, in their dtype's range) and replayed through
``hypothesis.example`` by the properties of ``tests/test_properties.py``.
Each entry names the strategy's edits that made the input, and what went
wrong before the fix.
"""

import functools
import pathlib

import numpy as np

from tests import strategies

_DATA = pathlib.Path(__file__).parent / "data" / "property_regressions.npz"

CASES = {
  # (dtype, strategy edits, what failed and where it was fixed)
  "upgrad_duplicate_t64": (
    "float64",
    (("duplicate", 0, 1),),
    "UPGrad, T=64 in D=40: the non-negative QP polish stopped at its first"
    " positive free-set solution; projections 0.6% off (fixed in 428e8d3)",
  ),
  "upgrad_near_duplicates_t64": (
    "float64",
    (("near_duplicate", 0, 51, 1e-08), ("near_duplicate", 30, 51, 0.001), ("combination", 21, 15, 45, 2.0)),
    "UPGrad: pseudo-inverse not backward stable along a tiny eigenvalue, and"
    " Lawson-Hanson cycling between two free sets (fixed in 3b036fd)",
  ),
  "upgrad_rounded_opposite_t8": (
    "float32",
    (("opposite", 0, 1, 3.0),),
    "UPGrad oracle check: float32-rounded opposite tasks among 8 in 6"
    " dimensions form a thin wedge the Gram matrix cannot see (test fixed in 8df4739)",
  ),
  "upgrad_scaled_opposite": (
    "float32",
    (("opposite", 0, 1, 3.0),),
    "UPGrad oracle: feasibility tolerance below float32 rounding (oracle fixed in session 5)",
  ),
  "mgda_near_duplicates": (
    "float64",
    (("near_duplicate", 2, 1, 1e-08),),
    "MGDA: two tasks whose cosine rounds to 1; the singular KKT solve split"
    " the weight between them, 1e-8 off the optimality conditions (fixed: flat"
    " directions of the support's affine set in solvers._solve_on_support)",
  ),
  "mgda_near_duplicate_and_flip": (
    "float64",
    (("near_duplicate", 0, 0, 0.001), ("opposite", 2, 2, 1.0)),
    "MGDA: the polish was rejected on an ill-conditioned hull (fixed in session 5)",
  ),
  "gradops_fallback_tiny_task": (
    "float64",
    (("rescale", 0, 1e-10), ("opposite", 1, 2, 3.0)),
    "GradOPS MGDA fallback: a 5e-9 task beside an exactly opposite pair; the"
    " active-set method returned 0.78 x the tiny task instead of 0 (fixed with"
    " mgda_near_duplicates)",
  ),
  "gradops_near_duplicate_tiny_task": (
    "float64",
    (("near_duplicate", 0, 0, 1e-08), ("rescale", 2, 1e-10)),
    "GradOPS alpha=0: MGDA fallback disagreement of 6e-10 (fixed in session 5)",
  ),
  "cagrad_near_duplicates": (
    "float32",
    (("near_duplicate", 2, 0, 1e-08), ("near_duplicate", 2, 2, 1e-08)),
    "CAGrad: the dual's backtracking rejected every step below the rounding of"
    " its values and stalled with a Frank-Wolfe gap of 9e-7; worst-task"
    " improvement 2.7e-6 below SLSQP's (fixed: rounding slack in the"
    " sufficient-decrease test of solvers.minimize_on_simplex)",
  ),
  "gradops_gram_schmidt_order": (
    "float32",
    (("zero", 3),),
    "GradOPS oracle check: 8 tasks of rank 3; the literal Gram-Schmidt kept a"
    " vector of relative length 0.005 and amplified float32 rounding into a"
    " residual above rank_rtol, so only the package's reading used the MGDA"
    " fallback (test: compare only where both readings of Eq. 1 agree on rank)",
  ),
  "gradops_flushed_near_duplicate_t8": (
    "float32",
    (("near_duplicate", 0, 2, 0.001), ("subnormal", 3)),
    "GradOPS, 8 tasks in 6 dimensions, a pair at 1e-3 and a subnormal task"
    " (flushed to zero): every residual is rounding, but the Gram solve kept"
    " residuals formed with coefficients of 6630, whose float32 combination"
    " conflicted with the tasks by 6.6e-4 (fixed: a residual not longer than"
    " rank_rtol times the size of its combination counts as zero)",
  ),
  "gradops_flushed_task_changes_solve_t8": (
    "float32",
    (("near_duplicate", 0, 1, 0.001), ("zero", 2), ("subnormal", 5)),
    "GradOPS property: with the subnormal task flushed, the backend's solve"
    " projects off a pair at 1e-3 with coefficients of 5800 (combination size"
    " 4e4, float32 conflicts of 2e-3), where the unflushed solve falls back to"
    " MGDA; the test took the rounding size from the unflushed solve (test fixed)",
  ),
  "cagrad_cancelling_pair": (
    "float32",
    (("opposite", 0, 1, 1.0), ("near_duplicate", 0, 0, 1e-08)),
    "CAGrad oracle: ||g0||^2 of two cancelling tasks rounded below 0 and its square root warned (oracle: clamped at 0)",
  ),
  "cagrad_zero_task_t8": (
    "float32",
    (("zero", 6),),
    "CAGrad, 8 tasks in 6 dimensions and a zero task: the dual optimum has"
    " g_w = 0, where the Frank-Wolfe gap is undefined; returning the"
    " smallest-gap iterate (2de16c4, reverted) missed the degenerate branch"
    " and a task lost 2e-4",
  ),
}

_STRUCTURE_BY_DIM = {40: "mixed", 6: "narrow"}


@functools.lru_cache(maxsize=None)
def _matrices():
  with np.load(_DATA) as data:
    return {name: data[name] for name in data.files}


def load(name: str) -> strategies.TaskGradients:
  """The stored example ``name`` of :data:`CASES`."""
  dtype, edits, _ = CASES[name]
  matrix = _matrices()[name]
  return strategies.from_matrix(matrix, _STRUCTURE_BY_DIM[matrix.shape[1]], dtype, edits)
