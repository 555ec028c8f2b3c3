r"""Every method as a weighting: the T x T function from the Gram matrix to the weights β.

Each function takes the ``(T, T)`` Gram matrix :math:`K_{ij} = g_i \cdot g_j`
(float64 recommended: call it inside ``jax.enable_x64(True)``) and returns the
``(T,)`` weights :math:`\beta` of the update :math:`\sum_k \beta_k g_k` that
the matching ``scale_by_<name>`` transform computes. Use them to study a
method on its own, or to build a transform of your own around the passes
(:func:`gradops_jax.task_gram`, :func:`gradops_jax.combine`).

Example:
  >>> import jax, jax.numpy as jnp
  >>> from gradops_jax import weightings
  >>> g = jnp.array([[1.0, 0.0], [0.0, 1.0]])
  >>> with jax.enable_x64(True):
  ...   print(weightings.mgda(g @ g.T).tolist())
  [0.5, 0.5]
"""

from typing import Any, Optional

import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from gradops_jax._src import tolerances
from gradops_jax._src.methods import aligned_mtl as _aligned_mtl
from gradops_jax._src.methods import cagrad as _cagrad
from gradops_jax._src.methods import conicgrad as _conicgrad
from gradops_jax._src.methods import gradops as _gradops
from gradops_jax._src.methods import gradvac as _gradvac
from gradops_jax._src.methods import imtl_g as _imtl_g
from gradops_jax._src.methods import nash_mtl as _nash_mtl
from gradops_jax._src.methods import pcgrad as _pcgrad
from gradops_jax._src.methods import upgrad as _upgrad
from gradops_jax._src.solvers import min_norm as _min_norm


def gradops(gram: Float[Array, "T T"], alpha: Any = 0.0, rank_rtol: Optional[float] = None) -> Float[Array, " T"]:
  """GradOPS's β (:func:`gradops_jax.gradops_solve` has the diagnostics too)."""
  return _gradops.gradops_solve(gram, alpha, rank_rtol).weights


def mgda(gram: Float[Array, "T T"], tol: float = 1e-12, max_iters: int = 2000) -> Float[Array, " T"]:
  """MGDA's β: the min-norm point of the convex hull (:func:`gradops_jax.scale_by_mgda`)."""
  return _min_norm.min_norm_simplex_weights(gram, tol, max_iters)[0]


def upgrad(gram: Float[Array, "T T"], tol: float = 1e-12, max_iters: int = 2000) -> Float[Array, " T"]:
  """UPGrad's β: the mean of the projections onto the dual cone (:func:`gradops_jax.scale_by_upgrad`)."""
  return _upgrad.upgrad_weights(gram, tol, max_iters)[0]


def pcgrad(gram: Float[Array, "T T"], order: Int[Array, " T"]) -> Float[Array, " T"]:
  """PCGrad's β for a given visiting order of the tasks (:func:`gradops_jax.scale_by_pcgrad`)."""
  return _pcgrad.pcgrad_weights(gram, order)


def gradvac(
  gram: Float[Array, "T T"],
  order: Int[Array, " T"],
  targets: Float[Array, "T T"],
  beta: float = 1e-2,
  zero_rtol: Optional[float] = None,
) -> tuple[Float[Array, " T"], Float[Array, "T T"]]:
  """GradVac's β and new cosine targets for a given order (:func:`gradops_jax.scale_by_gradvac`)."""
  if zero_rtol is None:
    zero_rtol = tolerances.default_rank_rtol(gram.shape[0], gram_dtype=gram.dtype)
  return _gradvac.gradvac_weights(gram, order, targets, beta, zero_rtol)


def imtl_g(gram: Float[Array, "T T"]) -> Float[Array, " T"]:
  """IMTL-G's β: equal projections on every unit task gradient (:func:`gradops_jax.scale_by_imtl_g`)."""
  return _imtl_g.imtl_g_weights(gram)


def cagrad(
  gram: Float[Array, "T T"],
  c: float = 0.5,
  rescale: bool = True,
  tol: float = 1e-10,
  max_iters: int = 5000,
) -> Float[Array, " T"]:
  """CAGrad's β (:func:`gradops_jax.scale_by_cagrad`)."""
  zero_rtol = tolerances.gram_rank_rtol(gram.shape[0], gram.dtype)
  return _cagrad.cagrad_weights(gram, c, rescale, tol, max_iters, zero_rtol)[0]


def conicgrad(
  gram: Float[Array, "T T"],
  c: float = 0.5,
  tol: float = 1e-10,
  max_iters: int = 5000,
  zero_rtol: Optional[float] = None,
) -> Float[Array, " T"]:
  """ConicGrad's β (:func:`gradops_jax.scale_by_conicgrad`)."""
  if zero_rtol is None:
    zero_rtol = tolerances.default_rank_rtol(gram.shape[0], gram_dtype=gram.dtype)
  return _conicgrad.conicgrad_weights(gram, c, tol, max_iters, zero_rtol)[0]


def nash_mtl(gram: Float[Array, "T T"], tol: float = 1e-12, max_iters: int = 500) -> Float[Array, " T"]:
  """Nash-MTL's β: the bargaining solution (:func:`gradops_jax.scale_by_nash_mtl`)."""
  return _nash_mtl.nash_mtl_weights(gram, tol, max_iters)[0]


def aligned_mtl(gram: Float[Array, "T T"], rank_rtol: Optional[float] = None) -> Float[Array, " T"]:
  """Aligned-MTL's β (:func:`gradops_jax.scale_by_aligned_mtl`); default rank threshold T eps32."""
  if rank_rtol is None:
    rank_rtol = gram.shape[0] * float(jnp.finfo(jnp.float32).eps)
  return _aligned_mtl.aligned_mtl_weights(gram, rank_rtol)


def mean(gram: Float[Array, "T T"]) -> Float[Array, " T"]:
  """Linear scalarisation's default β, the mean (:func:`gradops_jax.scale_by_linear_scalarization`)."""
  return jnp.full((gram.shape[0],), 1.0 / gram.shape[0], gram.dtype)


__all__ = (
  "aligned_mtl",
  "cagrad",
  "conicgrad",
  "gradops",
  "gradvac",
  "imtl_g",
  "mean",
  "mgda",
  "nash_mtl",
  "pcgrad",
  "upgrad",
)
