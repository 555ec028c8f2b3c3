"""Cross-check with torchjd 0.18 on golden pairs (no torch needed in CI).

``tests/data/torchjd_golden.npz`` was produced once by
``tests/data/make_torchjd_golden.py``. Each method states how closely it must
agree and, where it differs on purpose, why.
"""

import pathlib

import jax.numpy as jnp
import numpy as np
import pytest

import gradops_jax

GOLDEN = np.load(pathlib.Path(__file__).parent / "data" / "torchjd_golden.npz")
INPUTS = sorted(key.split("/")[1] for key in GOLDEN.files if key.startswith("input/"))


def _ours(tx, matrix):
  params = {"w": jnp.zeros(matrix.shape[1])}
  updates, _ = tx.update({"w": jnp.asarray(matrix)}, tx.init(params), params)
  return np.asarray(updates["w"], np.float64)


def _relative(a, b):
  return np.linalg.norm(a - b) / np.linalg.norm(b)


# method -> (our transform for T tasks, relative tolerance, why not tighter)
EXACT = {
  "mean": (gradops_jax.scale_by_linear_scalarization, 1e-5, "same formula"),
  "imtl_g": (gradops_jax.scale_by_imtl_g, 1e-5, "same closed form"),
  "aligned_mtl": (gradops_jax.scale_by_aligned_mtl, 1e-5, "same balance transformation"),
  "pcgrad": (gradops_jax.scale_by_pcgrad, 1e-5, "T = 2: the order does not matter"),
  "gradvac": (gradops_jax.scale_by_gradvac, 1e-5, "T = 2, first step from zero targets"),
  # torchjd regularises the normalised Gramian with 1e-4 I before its QP.
  "upgrad": (gradops_jax.scale_by_upgrad, 1e-3, "torchjd's 1e-4 Gramian ridge"),
  # torchjd solves CAGrad's dual with cvxpy/clarabel and normalises with
  # norm_eps = 1e-4; it also skips the official 1 / (1 + c^2) rescaling.
  "cagrad": (
    lambda t: gradops_jax.scale_by_cagrad(t, c=0.5, rescale=False),
    1e-4,
    "cvxpy tolerance and norm_eps",
  ),
}


RECORDED = sorted(tuple(key.split("/")) for key in GOLDEN.files if key.split("/")[0] in EXACT)


@pytest.mark.parametrize("method,name", RECORDED)
def test_agrees_with_torchjd(method, name):
  key = f"{method}/{name}"
  factory, tolerance, _ = EXACT[method]
  matrix = GOLDEN[f"input/{name}"]
  assert _relative(_ours(factory(matrix.shape[0]), matrix), GOLDEN[key]) <= tolerance


@pytest.mark.parametrize("name", INPUTS)
def test_mgda_is_at_least_as_close_to_the_min_norm_point_as_torchjd(name):
  """torchjd's MGDA stops Frank-Wolfe at epsilon 1e-3 or 100 steps (differences
  up to 2.4e-2 relative observed); ours solves the QP to 1e-12, so its point
  is never longer, and close."""
  matrix = GOLDEN[f"input/{name}"]
  ours = _ours(gradops_jax.scale_by_mgda(matrix.shape[0]), matrix)
  theirs = GOLDEN[f"mgda/{name}"]
  assert np.linalg.norm(ours) <= np.linalg.norm(theirs) * (1 + 1e-6)
  assert _relative(ours, theirs) <= 5e-2


@pytest.mark.parametrize("name", INPUTS)
def test_nash_mtl_has_torchjds_direction(name):
  """torchjd clips the Nash-MTL update to norm 1 (the official max_norm) and
  approximates the weights with 20 convex-concave steps; ours solves the
  bargaining equation exactly and does not clip (clip with optax if wanted)."""
  matrix = GOLDEN[f"input/{name}"]
  ours = _ours(gradops_jax.scale_by_nash_mtl(matrix.shape[0]), matrix)
  theirs = GOLDEN[f"nash_mtl/{name}"]
  cosine = ours @ theirs / (np.linalg.norm(ours) * np.linalg.norm(theirs))
  assert cosine >= 1 - 1e-6
  np.testing.assert_allclose(np.linalg.norm(theirs), 1.0, rtol=1e-6)
