"""Functional batch norm, dropout and noise (re-exported by fastopt.functional).

Every function takes optional ``out=`` (and state) buffers, so that a training
loop that passes them allocates nothing per step; what it does not pass is
allocated. Checks (dtype, shape, contiguity, writability, overlap, ranges)
happen before anything is written.
"""
import os
from numbers import Integral, Real

import numpy as np

from . import _fastopt

__all__ = ["batch_norm_forward", "batch_norm_backward", "dropout", "dropout_backward",
           "gaussian_noise"]

_U64 = 1 << 64


def _read(a, name):
    """An optional array argument that is read (None stays None)."""
    return None if a is None else _fastopt.as_array(a, name)


def _written(a, name):
    """An optional buffer that is written in place (None stays None)."""
    return None if a is None else _fastopt.as_inplace_array(a, name)


def _channels(x, channels_last):
    if x.ndim < 2:
        raise ValueError(f"x must have shape (N, C, *spatial)"
                         f"{' or (N, *spatial, C)' if channels_last else ''}, got {x.shape}")
    return x.shape[-1] if channels_last else x.shape[1]


def _real(v, name):
    if type(v) is float:   # the common case, without the slow ABC check
        return v
    if isinstance(v, bool) or not isinstance(v, (Real, np.floating, np.integer)):
        raise TypeError(f"{name} must be a real number, got {type(v).__name__}")
    try:
        return float(v)
    except OverflowError:   # an int beyond float64's range
        raise ValueError(f"{name} is beyond float64's range") from None


def _bool(v, name):
    # a real bool, not bool(v): the string "no" is truthy and would train
    if not isinstance(v, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(v).__name__}")
    return bool(v)


def _unit(v, name):
    """A real number in [0, 1] (dropout's p, batch norm's momentum)."""
    v = _real(v, name)
    if not 0 <= v <= 1:
        raise ValueError(f"{name} must be in [0, 1], got {v}")
    return v


def _u64(v, name):
    if isinstance(v, bool) or not isinstance(v, (Integral, np.integer)):
        raise TypeError(f"{name} must be an integer, got {type(v).__name__}")
    v = int(v)
    if not 0 <= v < _U64:
        raise ValueError(f"{name} must be in [0, 2**64), got {v}")
    return v


def batch_norm_forward(x, running_mean=None, running_var=None, weight=None, bias=None,
                       training=False, momentum=0.1, eps=1e-5, *, channels_last=False,
                       out=None, save_mean=None, save_invstd=None):
    """y = (x - mean)/sqrt(var + eps)*weight + bias per channel, as
    ``torch.nn.functional.batch_norm`` (same argument order and defaults).

    x: (N, C) or (N, C, *spatial), or (N, *spatial, C) with channels_last.
    training: batch mean and biased variance; running_mean/var (if given) are
    updated in place with momentum and the unbiased variance. Otherwise the
    running statistics are used. Returns (y, save_mean, save_invstd): the mean
    and 1/sqrt(var + eps) that were used, for batch_norm_backward.
    """
    x = _fastopt.as_array(x, "x")
    training, channels_last = _bool(training, "training"), _bool(channels_last, "channels_last")
    stats = _written if training else _read   # eval only reads them: a list will do
    running_mean, running_var = (stats(running_mean, "running_mean"),
                                 stats(running_var, "running_var"))
    weight, bias = _read(weight, "weight"), _read(bias, "bias")
    out, save_mean = _written(out, "out"), _written(save_mean, "save_mean")
    save_invstd = _written(save_invstd, "save_invstd")
    C = _channels(x, channels_last)
    momentum = _real(momentum, "momentum")
    eps = _real(eps, "eps")
    dt = x.dtype if x.dtype in (np.float32, np.float64) else np.float32
    y = np.empty_like(x, dtype=dt) if out is None else out
    sm = np.empty(C, dt) if save_mean is None else save_mean
    si = np.empty(C, dt) if save_invstd is None else save_invstd
    _fastopt.batchnorm_forward(x, y, sm, si, running_mean, running_var, weight, bias,
                               training=training, momentum=momentum, eps=eps,
                               channels_last=channels_last)
    return y, sm, si


def batch_norm_backward(dy, x, save_mean, save_invstd, weight=None, training=True, *,
                        channels_last=False, out=None, dweight=None, dbias=None,
                        accumulate=False, input_grad=True):
    """Gradients of batch_norm_forward: returns (dx, dweight, dbias).

    With xhat = (x - save_mean)*save_invstd: dweight = sum(dy*xhat) and
    dbias = sum(dy) per channel (computed when weight is given or a buffer is
    passed, else None; ``accumulate=True`` adds into the passed buffers);
    training: dx = weight*invstd*(dy - mean(dy) - xhat*mean(dy*xhat)),
    eval (running statistics): dx = weight*invstd*dy. input_grad=False skips dx.
    ``training`` must say how the forward ran: its default is True, the usual
    case for a backward, while batch_norm_forward's is False, as torch's.
    """
    x, dy = _fastopt.as_array(x, "x"), _fastopt.as_array(dy, "dy")
    save_mean, save_invstd = _read(save_mean, "save_mean"), _read(save_invstd, "save_invstd")
    weight, out = _read(weight, "weight"), _written(out, "out")
    dweight, dbias = _written(dweight, "dweight"), _written(dbias, "dbias")
    training, channels_last = _bool(training, "training"), _bool(channels_last, "channels_last")
    accumulate, input_grad = _bool(accumulate, "accumulate"), _bool(input_grad, "input_grad")
    if not input_grad and out is not None:
        # the caller expects the buffer written; it would be left as it was
        raise ValueError("out must be None with input_grad=False (no dx is computed)")
    C = _channels(x, channels_last)
    dt = x.dtype
    if dweight is None and weight is not None:
        dweight = np.empty(C, dt) if not accumulate else np.zeros(C, dt)
    if dbias is None and weight is not None:
        dbias = np.empty(C, dt) if not accumulate else np.zeros(C, dt)
    dx = None
    if input_grad:
        dx = np.empty_like(x) if out is None else out
    _fastopt.batchnorm_backward(dy, x, save_mean, save_invstd, weight, dx, dweight, dbias,
                                training=training, accumulate=accumulate,
                                channels_last=channels_last)
    return dx, dweight, dbias


def _fresh_seed(seed, what):
    """seed=None: a new seed from os.urandom, so that a loop of calls draws
    fresh masks (a fixed default made every call the same)."""
    return int.from_bytes(os.urandom(8), "little") if seed is None else _u64(seed, what)


def dropout(x, p=0.5, seed=None, out=None, mask=None, *, offset=0, store_mask=True):
    """Inverted dropout: y = x * (kept ? 1/(1-p) : 0), P(kept) = 1 - p, drawn
    from Philox4x32-10 keyed by (seed, offset, element index); seed=None draws
    a fresh seed for this call (store_mask=False then needs a seed).

    Returns (y, mask): mask is bit-packed, ceil(x.size/8) uint8 (1 = kept,
    ``np.unpackbits(mask, count=x.size, bitorder='little')``), or None with
    store_mask=False (backward can regenerate it from (seed, offset); a mask
    buffer is then refused, as it would not be written).
    out may be x itself (in place).
    """
    x = _fastopt.as_array(x, "x")
    out, mask = _written(out, "out"), _written(mask, "mask")
    p = _real(p, "p")
    offset = _u64(offset, "offset")
    if not _bool(store_mask, "store_mask") and mask is not None:
        # the caller expects the buffer written; it would be left as it was
        raise ValueError("mask must be None with store_mask=False (no mask is stored)")
    if not store_mask and seed is None:
        raise ValueError("store_mask=False needs a seed: backward regenerates the mask from it")
    seed = _fresh_seed(seed, "seed")
    y = np.empty_like(x) if out is None else out
    if store_mask and mask is None:
        mask = np.empty((x.size + 7) // 8, np.uint8)
    _fastopt.dropout_forward(x, y, mask, p, seed, offset)
    return y, mask


def dropout_backward(dy, mask, p, out=None, *, seed=None, offset=0):
    """dx = dy * (kept ? 1/(1-p) : 0), kept from the packed mask, or, with
    mask=None, regenerated from the (seed, offset) the forward used."""
    dy = _fastopt.as_array(dy, "dy")
    mask, out = _read(mask, "mask"), _written(out, "out")
    p = _real(p, "p")
    if mask is None and seed is None:
        raise ValueError("dropout_backward needs the mask or the forward's seed (and offset)")
    seed = 0 if seed is None else _u64(seed, "seed")
    offset = _u64(offset, "offset")
    dx = np.empty_like(dy) if out is None else out
    _fastopt.dropout_backward(dy, dx, mask, p, seed, offset)
    return dx


def gaussian_noise(x, std, seed=None, *, offset=0, out=None):
    """y = x + std * N(0, 1), the normals drawn (Box-Muller) from Philox4x32-10
    keyed by (seed, offset, element index); seed=None draws a fresh seed for
    this call. out may be x itself (in place)."""
    x = _fastopt.as_array(x, "x")
    out = _written(out, "out")
    std = _real(std, "std")
    seed, offset = _fresh_seed(seed, "seed"), _u64(offset, "offset")
    y = np.empty_like(x) if out is None else out
    _fastopt.gaussian_noise(x, y, std, seed, offset)
    return y
