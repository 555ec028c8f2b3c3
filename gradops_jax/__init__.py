"""gradops_jax: multi-task gradient deconfliction as optax transforms."""

from gradops_jax.accumulation import task_multi_steps
from gradops_jax.gradops import GradOPSSolution
from gradops_jax.gradops import GradOPSState
from gradops_jax.gradops import gradops
from gradops_jax.gradops import gradops_solve
from gradops_jax.gradops import scale_by_gradops
from gradops_jax.methods.aligned_mtl import scale_by_aligned_mtl
from gradops_jax.methods.cagrad import scale_by_cagrad
from gradops_jax.methods.conicgrad import scale_by_conicgrad
from gradops_jax.methods.gradvac import GradVacState
from gradops_jax.methods.gradvac import scale_by_gradvac
from gradops_jax.methods.imtl_g import scale_by_imtl_g
from gradops_jax.methods.linear_scalarization import scale_by_linear_scalarization
from gradops_jax.methods.mgda import scale_by_mgda
from gradops_jax.methods.nash_mtl import scale_by_nash_mtl
from gradops_jax.methods.pcgrad import PCGradState
from gradops_jax.methods.pcgrad import scale_by_pcgrad
from gradops_jax.methods.upgrad import scale_by_upgrad
from gradops_jax import recon
from gradops_jax.partition import aggregate_shared
from gradops_jax.solvers import min_norm_simplex_weights
from gradops_jax.solvers import project_onto_simplex
from gradops_jax.task_gradients import nnx_value_and_task_grads
from gradops_jax.task_gradients import value_and_task_grads

__version__ = "0.1.0"

__all__ = (
    "GradOPSSolution",
    "GradOPSState",
    "GradVacState",
    "PCGradState",
    "aggregate_shared",
    "gradops",
    "gradops_solve",
    "min_norm_simplex_weights",
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
    "task_multi_steps",
    "value_and_task_grads",
)
