"""gradops_jax: multi-task gradient deconfliction as optax transforms."""

from gradops_jax.gradops import GradOPSSolution
from gradops_jax.gradops import GradOPSState
from gradops_jax.gradops import gradops
from gradops_jax.gradops import gradops_solve
from gradops_jax.gradops import scale_by_gradops
from gradops_jax.solvers import min_norm_simplex_weights
from gradops_jax.solvers import project_onto_simplex
from gradops_jax.task_gradients import value_and_task_grads

__version__ = "0.1.0"

__all__ = (
    "GradOPSSolution",
    "GradOPSState",
    "gradops",
    "gradops_solve",
    "min_norm_simplex_weights",
    "project_onto_simplex",
    "scale_by_gradops",
    "value_and_task_grads",
)
