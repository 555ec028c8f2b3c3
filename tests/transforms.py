"""Every aggregation transform of the package, by name, for parametrised tests."""

import gradops_jax

# name -> (factory(num_tasks), deterministic in the task order?)
METHODS = {
    "gradops": (lambda t: gradops_jax.scale_by_gradops(t), True),
    "gradops_alpha-2": (lambda t: gradops_jax.scale_by_gradops(t, alpha=-2.0), True),
    "mgda": (gradops_jax.scale_by_mgda, True),
    "upgrad": (gradops_jax.scale_by_upgrad, True),
    "pcgrad": (gradops_jax.scale_by_pcgrad, False),
    "gradvac": (gradops_jax.scale_by_gradvac, False),
    "imtl_g": (gradops_jax.scale_by_imtl_g, True),
    "cagrad": (gradops_jax.scale_by_cagrad, True),
    "conicgrad": (gradops_jax.scale_by_conicgrad, True),
    "aligned_mtl": (gradops_jax.scale_by_aligned_mtl, True),
    "nash_mtl": (gradops_jax.scale_by_nash_mtl, True),
    "linear_scalarization": (gradops_jax.scale_by_linear_scalarization, True),
}
