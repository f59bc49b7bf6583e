"""evomoe: train Mixture-of-Experts models the EvoMoE way (diversify, then a Dense-To-Sparse gate)."""

__version__ = "0.1.0"
