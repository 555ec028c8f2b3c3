"""Recon: conflict scores per layer (pure optax) and branching of those layers (Flax NNX)."""
