"""gradops_jax: multi-task gradient deconfliction as optax transforms."""

from gradops_jax import recon
from gradops_jax import weightings
from gradops_jax._src.accumulation import task_multi_steps
from gradops_jax._src.base import WeightsState
from gradops_jax._src.kernels import available as kernels_available
from gradops_jax._src.kernels import kernels_disabled
from gradops_jax._src.kernels import register_cached as _register_cached_kernels
from gradops_jax._src.gramian_engine import nnx_value_and_aggregated_grad
from gradops_jax._src.gramian_engine import value_and_aggregated_grad
from gradops_jax._src.linalg import cosine_from_gram
from gradops_jax._src.methods.aligned_mtl import scale_by_aligned_mtl
from gradops_jax._src.methods.cagrad import scale_by_cagrad
from gradops_jax._src.methods.conicgrad import scale_by_conicgrad
from gradops_jax._src.methods.gradops import GradOPSSolution
from gradops_jax._src.methods.gradops import GradOPSState
from gradops_jax._src.methods.gradops import gradops
from gradops_jax._src.methods.gradops import gradops_solve
from gradops_jax._src.methods.gradops import scale_by_gradops
from gradops_jax._src.methods.gradvac import GradVacState
from gradops_jax._src.methods.gradvac import scale_by_gradvac
from gradops_jax._src.methods.imtl_g import scale_by_imtl_g
from gradops_jax._src.methods.linear_scalarization import scale_by_linear_scalarization
from gradops_jax._src.methods.mgda import scale_by_mgda
from gradops_jax._src.methods.nash_mtl import scale_by_nash_mtl
from gradops_jax._src.methods.pcgrad import PCGradState
from gradops_jax._src.methods.pcgrad import scale_by_pcgrad
from gradops_jax._src.methods.upgrad import scale_by_upgrad
from gradops_jax._src.partition import aggregate_shared
from gradops_jax._src.passes import combine
from gradops_jax._src.passes import leaf_gram
from gradops_jax._src.passes import task_gram
from gradops_jax._src.passes import task_gram_float32
from gradops_jax._src.solvers.accelerated import SolverInfo
from gradops_jax._src.solvers.simplex import project_onto_simplex
from gradops_jax._src.task_gradients import nnx_value_and_task_grads
from gradops_jax._src.task_gradients import value_and_task_grads
from gradops_jax._src.tolerances import default_rank_rtol

__version__ = "0.1.0"

_register_cached_kernels()

__all__ = (
  "GradOPSSolution",
  "GradOPSState",
  "GradVacState",
  "PCGradState",
  "SolverInfo",
  "WeightsState",
  "aggregate_shared",
  "combine",
  "cosine_from_gram",
  "default_rank_rtol",
  "gradops",
  "gradops_solve",
  "kernels_available",
  "kernels_disabled",
  "leaf_gram",
  "nnx_value_and_aggregated_grad",
  "nnx_value_and_task_grads",
  "project_onto_simplex",
  "recon",
  "scale_by_aligned_mtl",
  "scale_by_cagrad",
  "scale_by_conicgrad",
  "scale_by_gradops",
  "scale_by_gradvac",
  "scale_by_imtl_g",
  "scale_by_linear_scalarization",
  "scale_by_mgda",
  "scale_by_nash_mtl",
  "scale_by_pcgrad",
  "scale_by_upgrad",
  "task_gram",
  "task_gram_float32",
  "task_multi_steps",
  "value_and_aggregated_grad",
  "value_and_task_grads",
  "weightings",
)
