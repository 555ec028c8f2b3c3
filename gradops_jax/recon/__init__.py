"""Recon (Shi et al., ICLR 2023): where tasks conflict, layer by layer, and task-specific copies.

:func:`layer_conflict_scores` is a pure optax transform (any JAX model);
:func:`branch_layers` and :func:`shared_mask` work on Flax NNX models. See
``docs/recon.md``.
"""

from gradops_jax._src.recon.branching import BranchedModel
from gradops_jax._src.recon.branching import branch_layers
from gradops_jax._src.recon.branching import shared_mask
from gradops_jax._src.recon.scores import LayerConflictState
from gradops_jax._src.recon.scores import default_layer_name
from gradops_jax._src.recon.scores import find_conflict_state
from gradops_jax._src.recon.scores import layer_conflict_scores
from gradops_jax._src.recon.scores import select_layers

__all__ = (
  "BranchedModel",
  "LayerConflictState",
  "branch_layers",
  "default_layer_name",
  "find_conflict_state",
  "layer_conflict_scores",
  "select_layers",
  "shared_mask",
)
