"""Layers with an explicit backward, shaped like torch.nn."""
# ---- batch norm and dropout (issue 3) ----
from ._nn_norm import BatchNorm, Dropout

__all__ = ["BatchNorm", "Dropout"]
