"""BatchNorm and Dropout layers (re-exported by fastopt.nn and fastopt).

Shaped like torch.nn.BatchNorm1d/2d/3d and torch.nn.Dropout, with an explicit
backward: ``y = layer.forward(x)``, ``dx = layer.backward(dy)``. backward uses
the last forward's saved context (x itself, not a copy, as torch saves it: do
not modify x in between) and accumulates parameter gradients (+=).
"""
import os

import numpy as np

from . import _fastopt
from ._layer import Layer
from ._functional_norm import _real, _u64

__all__ = ["BatchNorm", "Dropout"]


def _check_dtype(dtype):
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float64):
        raise TypeError(f"dtype must be float32 or float64, got {dtype}")
    return dtype


class _Layer(Layer):
    def __call__(self, x, out=None):
        return self.forward(x, out=out)

    def _check_input(self, x, name):
        if not isinstance(x, np.ndarray):
            raise TypeError(f"{name} must be a numpy.ndarray, got {type(x).__name__}")
        if x.dtype != self.dtype:
            raise TypeError(f"{name} must have the layer's dtype {self.dtype}, got {x.dtype} "
                            "(no implicit casts)")


class BatchNorm(_Layer):
    """Batch normalization over the channel axis of (N, C) or (N, C, *spatial)
    input (or (N, *spatial, C) with channels_last=True):
    y = (x - mean)/sqrt(var + eps)*weight + bias.

    Training uses the batch's mean and biased variance and updates
    running_mean/running_var (unbiased variance) with `momentum` (None: the
    cumulative average, as torch); eval uses the running statistics. With
    track_running_stats=False the batch statistics are used in both modes.
    Names, defaults and state are torch's (weight, bias, running_mean,
    running_var, num_batches_tracked).
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, dtype=np.float32, *, channels_last=False):
        if isinstance(num_features, bool) or not isinstance(num_features, (int, np.integer)) \
                or num_features < 1:
            raise ValueError(f"num_features must be a positive integer, got {num_features!r}")
        self.num_features = C = int(num_features)
        self.eps = _real(eps, "eps")
        if not self.eps > 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        if momentum is not None:
            m = _real(momentum, "momentum")
            if not 0 <= m <= 1:
                raise ValueError(f"momentum must be in [0, 1] or None, got {momentum}")
        self.momentum = momentum
        self.affine = bool(affine)
        self.track_running_stats = bool(track_running_stats)
        self.channels_last = bool(channels_last)
        self.dtype = _check_dtype(dtype)
        self.weight = np.ones(C, self.dtype) if self.affine else None
        self.bias = np.zeros(C, self.dtype) if self.affine else None
        self.grad_weight = np.zeros(C, self.dtype) if self.affine else None
        self.grad_bias = np.zeros(C, self.dtype) if self.affine else None
        if self.track_running_stats:
            self.running_mean = np.zeros(C, self.dtype)
            self.running_var = np.ones(C, self.dtype)
            self.num_batches_tracked = 0
        else:
            self.running_mean = self.running_var = None
            self.num_batches_tracked = None
        self._save_mean = np.empty(C, self.dtype)
        self._save_invstd = np.empty(C, self.dtype)
        self._ctx = None      # (x, used batch statistics)

    def parameters(self):
        return [self.weight, self.bias] if self.affine else []

    def gradients(self):
        return [self.grad_weight, self.grad_bias] if self.affine else []

    def reset_running_stats(self):
        if self.track_running_stats:
            self.running_mean.fill(0)
            self.running_var.fill(1)
            self.num_batches_tracked = 0

    def forward(self, x, out=None):
        """y = BN(x); x of shape (N, C, *spatial) (or (N, *spatial, C))."""
        self._check_input(x, "x")
        axis = -1 if self.channels_last else 1
        if x.ndim < 2 or x.shape[axis] != self.num_features:
            raise ValueError(f"x must have {self.num_features} channels on axis {axis} "
                             f"(num_features), got shape {x.shape}")
        batch_stats = self.training or not self.track_running_stats
        update = self.training and self.track_running_stats
        momentum = 0.0
        if update:
            momentum = self.momentum
            if momentum is None:          # cumulative moving average
                momentum = 1.0 / (self.num_batches_tracked + 1)
        if out is not None and isinstance(out, np.ndarray) and np.may_share_memory(out, x):
            raise ValueError("out shares memory with x, which backward needs; "
                             "use fastopt.functional.batch_norm_forward for in-place inference")
        y = np.empty_like(x) if out is None else out
        _fastopt.batchnorm_forward(
            x, y, self._save_mean, self._save_invstd,
            self.running_mean if (update or not batch_stats) else None,
            self.running_var if (update or not batch_stats) else None,
            self.weight, self.bias, training=batch_stats, momentum=float(momentum),
            eps=self.eps, channels_last=self.channels_last)
        if update:
            self.num_batches_tracked += 1
        self._ctx = (x, batch_stats)
        return y

    def backward(self, dy, out=None):
        """dx for the last forward; grad_weight += sum(dy*xhat), grad_bias += sum(dy)."""
        if self._ctx is None:
            raise ValueError("backward called without a matching forward")
        x, batch_stats = self._ctx
        self._check_input(dy, "dy")
        if dy.shape != x.shape:
            raise ValueError(f"dy must have the forward input's shape {x.shape}, got {dy.shape}")
        dx = np.empty_like(dy) if out is None else out
        _fastopt.batchnorm_backward(
            dy, x, self._save_mean, self._save_invstd, self.weight, dx,
            self.grad_weight, self.grad_bias, training=batch_stats, accumulate=True,
            channels_last=self.channels_last)
        return dx

    def __repr__(self):
        return (f"BatchNorm({self.num_features}, eps={self.eps}, momentum={self.momentum}, "
                f"affine={self.affine}, track_running_stats={self.track_running_stats}"
                f"{', channels_last=True' if self.channels_last else ''}, "
                f"dtype={self.dtype.name})")


class Dropout(_Layer):
    """Inverted dropout: in training y = x * (kept ? 1/(1-p) : 0) with
    P(kept) = 1 - p; in eval the identity (x itself is returned).

    Draws from Philox4x32-10 keyed by (seed, offset, element index); `offset`
    advances by one per training forward, so every step has a fresh mask and a
    seeded layer is reproducible. store_mask=False keeps no mask at all:
    backward regenerates it from (seed, offset).
    """

    def __init__(self, p=0.5, seed=None, *, store_mask=True):
        p = _real(p, "p")
        if not 0 <= p <= 1:
            raise ValueError(f"p must be in [0, 1], got {p}")
        self.p = p
        if seed is None:
            seed = int.from_bytes(os.urandom(8), "little")
        self.seed = _u64(seed, "seed")
        self.offset = 0
        self.store_mask = bool(store_mask)
        self._mask = None
        self._ctx = None      # (shape, dtype, offset, training)

    def forward(self, x, out=None):
        """y = dropout(x) in training (float32 or float64 x), x itself in eval."""
        if not isinstance(x, np.ndarray):
            raise TypeError(f"x must be a numpy.ndarray, got {type(x).__name__}")
        if not self.training:
            self._ctx = (x.shape, x.dtype, None, False)
            if out is None:
                return x
            _fastopt.dropout_forward(x, out, None, 0.0, 0, 0)   # checked copy
            return out
        y = np.empty_like(x) if out is None else out
        mask = None
        if self.store_mask:
            nbytes = (x.size + 7) // 8
            if self._mask is None or self._mask.size != nbytes:
                self._mask = np.empty(nbytes, np.uint8)
            mask = self._mask
        _fastopt.dropout_forward(x, y, mask, self.p, self.seed, self.offset)
        self._ctx = (x.shape, x.dtype, self.offset, True)
        self.offset += 1
        return y

    def backward(self, dy, out=None):
        if self._ctx is None:
            raise ValueError("backward called without a matching forward")
        shape, dtype, offset, training = self._ctx
        if not isinstance(dy, np.ndarray):
            raise TypeError(f"dy must be a numpy.ndarray, got {type(dy).__name__}")
        if dy.dtype != dtype:
            raise TypeError(f"dy must have the forward input's dtype {dtype}, got {dy.dtype}")
        if dy.shape != shape:
            raise ValueError(f"dy must have the forward input's shape {shape}, got {dy.shape}")
        if not training:
            if out is None:
                return dy
            _fastopt.dropout_forward(dy, out, None, 0.0, 0, 0)
            return out
        dx = np.empty_like(dy) if out is None else out
        _fastopt.dropout_backward(dy, dx, self._mask if self.store_mask else None,
                                  self.p, self.seed, offset)
        return dx

    def __repr__(self):
        return f"Dropout(p={self.p}, seed={self.seed})"
