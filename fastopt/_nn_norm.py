"""BatchNorm and Dropout layers (re-exported by fastopt.nn and fastopt).

Shaped like torch.nn.BatchNorm1d/2d/3d and torch.nn.Dropout, with an explicit
backward: ``y = layer.forward(x)``, ``dx = layer.backward(dy)``. backward uses
the last forward's saved context (x itself, not a copy, as torch saves it: do
not modify x in between) and accumulates parameter gradients (+=). Each
forward is backpropagated once (torch without retain_graph): a second
backward is refused. A failed call (bad input, bad edited attribute) leaves
the layer's state and every array as they were.
"""

import numpy as np

from . import _fastopt
from ._layer import Layer, one_call_at_a_time
from ._functional_norm import _bool, _fresh_seed, _real, _u64, _unit, _written

__all__ = ["BatchNorm", "Dropout"]


def _check_dtype(dtype):
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float64):
        raise TypeError(f"dtype must be float32 or float64, got {dtype}")
    return dtype


_NO_FORWARD = ("backward called without a matching forward: call forward first "
               "(each forward is backpropagated once, as torch without retain_graph)")


class _Layer(Layer):
    def __call__(self, x, out=None):
        """forward(x, out)."""
        return self.forward(x, out=out)

    def _check_input(self, x, name):
        """x as an ndarray of the layer's dtype."""
        x = _fastopt.as_array(x, name)
        if x.dtype != self.dtype:
            raise TypeError(f"{name} must have the layer's dtype {self.dtype}, got {x.dtype} "
                            "(no implicit casts)")
        return x


def _eps(v):
    v = _real(v, "eps")
    if not v > 0:
        raise ValueError(f"eps must be > 0, got {v}")
    return v


def _momentum(v):
    """BatchNorm.momentum: None (the cumulative average) or a real in [0, 1]."""
    return None if v is None else _unit(v, "momentum")


# num_batches_tracked is torch's int64 buffer: it counts up to 2**63 - 1
_MAX_BATCHES = 2 ** 63 - 1


def _batches(n, name):
    """A num_batches_tracked value (set, or loaded by load_state_dict): an
    integer in [0, 2**63)."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 0 <= n <= _MAX_BATCHES:
        raise ValueError(f"{name} must be an integer in [0, 2**63), got {n!r}")
    return int(n)


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
        self.dtype = _check_dtype(dtype)
        if isinstance(num_features, bool) or not isinstance(num_features, (int, np.integer)) \
                or num_features < 1:
            raise ValueError(f"num_features must be a positive integer, got {num_features!r}")
        # past this NumPy cannot even describe the (C,) arrays ("array is too big")
        if num_features > np.iinfo(np.intp).max // self.dtype.itemsize:
            raise ValueError(f"num_features is too large for a {self.dtype} array, "
                             f"got {num_features}")
        self.num_features = C = int(num_features)
        self.eps = _eps(eps)
        _momentum(momentum)
        self.momentum = momentum
        self.affine = _bool(affine, "affine")
        self.track_running_stats = _bool(track_running_stats, "track_running_stats")
        self.channels_last = _bool(channels_last, "channels_last")
        self.weight = np.ones(C, self.dtype) if self.affine else None
        self.bias = np.zeros(C, self.dtype) if self.affine else None
        self.grad_weight = np.zeros(C, self.dtype) if self.affine else None
        self.grad_bias = np.zeros(C, self.dtype) if self.affine else None
        # num_batches_tracked lives in a 0-d int64 array, as torch's buffer, so
        # that state_dict() and load_state_dict() treat it as any other array
        self._batches = np.zeros((), np.int64) if self.track_running_stats else None
        if self.track_running_stats:
            self.running_mean = np.zeros(C, self.dtype)
            self.running_var = np.ones(C, self.dtype)
        else:
            self.running_mean = self.running_var = None
        self._save_mean = np.empty(C, self.dtype)
        self._save_invstd = np.empty(C, self.dtype)
        self._ctx = None      # (x, used batch statistics)

    def parameters(self):
        """[weight, bias] (affine), else []."""
        return [self.weight, self.bias] if self.affine else []

    def gradients(self):
        """[grad_weight, grad_bias] (affine), else []: accumulated by backward."""
        return [self.grad_weight, self.grad_bias] if self.affine else []

    @property
    def num_batches_tracked(self):
        """Training forwards seen (None without running statistics)."""
        return None if self._batches is None else int(self._batches)

    @num_batches_tracked.setter
    def num_batches_tracked(self, n):
        if self._batches is None:
            raise ValueError("num_batches_tracked needs track_running_stats=True")
        self._batches[()] = _batches(n, "num_batches_tracked")

    def _named_arrays(self):
        """torch's names: weight, bias (affine), running_mean, running_var,
        num_batches_tracked (track_running_stats)."""
        named = {"weight": self.weight, "bias": self.bias} if self.affine else {}
        if self.track_running_stats:
            named.update(running_mean=self.running_mean, running_var=self.running_var,
                         num_batches_tracked=self._batches)
        return named

    def _check_loaded(self, arrays):
        """The loaded num_batches_tracked under the setter's rule (a negative
        count divided by zero at the next forward with momentum=None)."""
        if "num_batches_tracked" in arrays:
            _batches(arrays["num_batches_tracked"][()], "state_dict['num_batches_tracked']")

    @one_call_at_a_time
    def reset_running_stats(self):
        """running_mean = 0, running_var = 1, num_batches_tracked = 0 (as torch)."""
        if self.track_running_stats:
            self.running_mean.fill(0)
            self.running_var.fill(1)
            self._batches[()] = 0

    @one_call_at_a_time
    def forward(self, x, out=None):
        """y = BN(x); x of shape (N, C, *spatial) (or (N, *spatial, C))."""
        x = self._check_input(x, "x")
        out = _written(out, "out")
        # the attributes may have been edited since __init__: check them again
        training = _bool(self.training, "training")
        channels_last = _bool(self.channels_last, "channels_last")
        track = _bool(self.track_running_stats, "track_running_stats")
        if track and self._batches is None:
            raise ValueError("track_running_stats cannot be turned on after construction "
                             "(the layer has no running statistics)")
        eps, momentum = _eps(self.eps), _momentum(self.momentum)
        axis = -1 if channels_last else 1
        if x.ndim < 2 or x.shape[axis] != self.num_features:
            raise ValueError(f"x must have {self.num_features} channels on axis {axis} "
                             f"(num_features), got shape {x.shape}")
        batch_stats = training or not track
        update = training and track
        if not update:
            momentum = 0.0
        else:
            batches = int(self._batches)
            if batches >= _MAX_BATCHES:   # the int64 count would wrap to -2**63
                raise ValueError(f"num_batches_tracked is {batches}, the largest it can "
                                 "count: reset it (num_batches_tracked = 0) to train on")
            if momentum is None:          # cumulative moving average
                momentum = 1.0 / (batches + 1)
        if out is not None and np.may_share_memory(out, x):
            raise ValueError("out shares memory with x, which backward needs; "
                             "use fastopt.functional.batch_norm_forward for in-place inference")
        y = np.empty_like(x) if out is None else out
        _fastopt.batchnorm_forward(
            x, y, self._save_mean, self._save_invstd,
            self.running_mean if (update or not batch_stats) else None,
            self.running_var if (update or not batch_stats) else None,
            self.weight, self.bias, training=batch_stats, momentum=momentum,
            eps=eps, channels_last=channels_last)
        if update:   # (not +=: a ufunc call on a 0-d array costs 1 us)
            self._batches[()] = batches + 1
        self._ctx = (x, batch_stats, channels_last)
        return y

    @one_call_at_a_time
    def backward(self, dy, out=None):
        """dx for the last forward; grad_weight += sum(dy*xhat), grad_bias += sum(dy)."""
        if self._ctx is None:
            raise ValueError(_NO_FORWARD)
        x, batch_stats, channels_last = self._ctx   # the forward's layout, even if edited since
        dy, out = self._check_input(dy, "dy"), _written(out, "out")
        if dy.shape != x.shape:
            raise ValueError(f"dy must have the forward input's shape {x.shape}, got {dy.shape}")
        dx = np.empty_like(dy) if out is None else out
        _fastopt.batchnorm_backward(
            dy, x, self._save_mean, self._save_invstd, self.weight, dx,
            self.grad_weight, self.grad_bias, training=batch_stats, accumulate=True,
            channels_last=channels_last)
        self._ctx = None      # consumed: a second backward would add the grads again
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
    seeded layer is reproducible. seed=None draws a seed from os.urandom.
    store_mask=False keeps no mask at all: backward regenerates it from
    (seed, offset).
    """

    def __init__(self, p=0.5, seed=None, *, store_mask=True):
        self.p = _unit(p, "p")
        self.seed = _fresh_seed(seed, "seed")
        self.offset = 0
        self.store_mask = _bool(store_mask, "store_mask")
        self._mask = None     # the mask buffer, reused while the size fits
        self._ctx = None      # (shape, dtype, training, p, seed, offset, mask)

    @one_call_at_a_time
    def forward(self, x, out=None):
        """y = dropout(x) in training (float32 or float64 x), x itself in eval."""
        x, out = _fastopt.as_array(x, "x"), _written(out, "out")
        # the attributes may have been edited since __init__: check them again
        training = _bool(self.training, "training")
        p, seed = _unit(self.p, "p"), _u64(self.seed, "seed")
        offset = _u64(self.offset, "offset")
        # state (mask buffer, context, offset) changes only after the checked
        # call succeeded: a failed forward leaves the last one's backward intact
        if not training:
            if out is not None:
                _fastopt.dropout_forward(x, out, None, 0.0, 0, 0)   # checked copy
            self._ctx = (x.shape, x.dtype, False, p, seed, offset, None)
            return x if out is None else out
        y = np.empty_like(x) if out is None else out
        mask = None
        if self.store_mask:
            mask = self._mask
            if mask is None or mask.size != (x.size + 7) // 8:
                mask = np.empty((x.size + 7) // 8, np.uint8)
        _fastopt.dropout_forward(x, y, mask, p, seed, offset)
        if mask is not None:
            self._mask = mask
        self._ctx = (x.shape, x.dtype, True, p, seed, offset, mask)
        self.offset = offset + 1
        return y

    @one_call_at_a_time
    def backward(self, dy, out=None):
        """dx for the last forward (its p, seed and mask)."""
        if self._ctx is None:
            raise ValueError(_NO_FORWARD)
        shape, dtype, training, p, seed, offset, mask = self._ctx
        dy, out = _fastopt.as_array(dy, "dy"), _written(out, "out")
        if dy.dtype != dtype:
            raise TypeError(f"dy must have the forward input's dtype {dtype}, got {dy.dtype}")
        if dy.shape != shape:
            raise ValueError(f"dy must have the forward input's shape {shape}, got {dy.shape}")
        if not training:
            dx = dy
            if out is not None:
                dx = out
                # a checked copy (p = 0 keeps all) whose errors name dy, not x
                _fastopt.dropout_backward(dy, out, None, 0.0, 0, 0)
        else:
            dx = np.empty_like(dy) if out is None else out
            _fastopt.dropout_backward(dy, dx, mask, p, seed, offset)
        self._ctx = None      # consumed: one backward per forward, as torch (no retain_graph)
        return dx

    def __repr__(self):
        return f"Dropout(p={self.p}, seed={self.seed})"
