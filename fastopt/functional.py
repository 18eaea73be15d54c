"""Functional forms of fastopt's layers, with out= buffers for allocation-free use."""
# ---- batch norm, dropout, noise (issue 3) ----
from ._functional_norm import (batch_norm_backward, batch_norm_forward, dropout,
                               dropout_backward, gaussian_noise)

__all__ = ["batch_norm_forward", "batch_norm_backward", "dropout", "dropout_backward",
           "gaussian_noise"]
