"""Batch norm and dropout cases: fastopt's layers against NumPy (naive: the
formula with temporaries; careful: ufuncs with out= into preallocated
scratch) and torch (autograd on NCHW-contiguous tensors as 'torch', on
channels_last memory format as 'torch_cl')."""
import numpy as np

import fastopt as fo
from fastopt import functional as F

from . import Case, register, torch_or_none

# NCHW shapes, and channels-last input (N, H, W, C) marked by the "cl" suffix;
# (256, 512, 7, 7) is a late stage of a ResNet: many channels, small planes
BN_SIZES = [(32, 64, 56, 56), "32x56x56x64cl", (256, 1024), (256, 512, 7, 7)]
DROPOUT_SIZES = [1_000_000, 16_000_000]
P = 0.5


def _bn_shape(size):
    if isinstance(size, str):
        return tuple(int(v) for v in size[:-2].split("x")), True
    return size, False


def _numpy_bn(x, dy, w, b, axes, bs, eps=1e-5):
    """Training forward + backward as one would write it in NumPy."""
    def run():
        mean = x.mean(axes, keepdims=True)
        var = x.var(axes, keepdims=True)
        invstd = 1 / np.sqrt(var + eps)
        xhat = (x - mean) * invstd
        y = xhat * w.reshape(bs) + b.reshape(bs)
        dw = (dy * xhat).sum(axes)
        db = dy.sum(axes)
        dx = (w.reshape(bs) * invstd) * (dy - db.reshape(bs) / (x.size / w.size)
                                         - xhat * dw.reshape(bs) / (x.size / w.size))
        return y, dx
    return run


def _numpy_bn_careful(x, dy, w, b, axes, bs, eps=1e-5):
    """The same with out= into preallocated scratch (a few temporaries remain
    for the per-channel reductions)."""
    t1, t2, y, dx = (np.empty_like(x) for _ in range(4))
    m = x.size / w.size

    def run():
        mean = x.mean(axes, keepdims=True)
        np.subtract(x, mean, out=t1)                 # x - mean
        np.multiply(t1, t1, out=t2)
        invstd = 1 / np.sqrt(t2.mean(axes, keepdims=True) + eps)
        np.multiply(t1, invstd, out=t1)              # xhat
        np.multiply(t1, w.reshape(bs), out=y)
        np.add(y, b.reshape(bs), out=y)
        np.multiply(dy, t1, out=t2)
        dw = t2.sum(axes, keepdims=True)
        db = dy.sum(axes, keepdims=True)
        np.multiply(t1, dw / m, out=t2)
        np.subtract(dy, db / m, out=dx)
        np.subtract(dx, t2, out=dx)
        np.multiply(dx, w.reshape(bs) * invstd, out=dx)
        return y, dx
    return run


@register("norm", "batchnorm-train-fwd+bwd", BN_SIZES, [(256, 1024)])
def batchnorm_train(size, dtype):
    shape, cl = _bn_shape(size)
    C = shape[-1] if cl else shape[1]
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape, dtype=np.float32).astype(dtype)
    dy = rng.standard_normal(shape, dtype=np.float32).astype(dtype)
    y, dx = np.empty_like(x), np.empty_like(x)
    bn = fo.BatchNorm(C, dtype=dtype, channels_last=cl)

    def fastopt():
        bn.forward(x, out=y)
        bn.backward(dy, out=dx)

    cax = x.ndim - 1 if cl else 1
    axes = tuple(i for i in range(x.ndim) if i != cax)
    bs = [1] * x.ndim
    bs[cax] = C
    w, b = np.ones(C, dtype), np.zeros(C, dtype)
    fns = {"fastopt": fastopt, "numpy": _numpy_bn(x, dy, w, b, axes, bs),
           "numpy_careful": _numpy_bn_careful(x, dy, w, b, axes, bs)}
    torch = torch_or_none()
    if torch is not None:
        tw = torch.ones(C, dtype=getattr(torch, np.dtype(dtype).name), requires_grad=True)
        tb = torch.zeros_like(tw, requires_grad=True)
        rm, rv = torch.zeros_like(tw).detach(), torch.ones_like(tw).detach()
        # NCHW view of the data; channels-last input is an NHWC buffer = torch's
        # channels_last memory format
        tx = torch.from_numpy(x).movedim(-1, 1) if cl else torch.from_numpy(x)
        tdy = torch.from_numpy(dy).movedim(-1, 1) if cl else torch.from_numpy(dy)

        def torch_fn(xt, dyt):
            xt = xt.detach().requires_grad_()

            def run():
                yt = torch.nn.functional.batch_norm(xt, rm, rv, tw, tb, training=True)
                yt.backward(dyt)
                xt.grad = None
            return run

        if not cl:
            fns["torch"] = torch_fn(tx.contiguous(), tdy.contiguous())
        if x.ndim == 4:
            fns["torch_cl"] = torch_fn(tx.contiguous(memory_format=torch.channels_last),
                                       tdy.contiguous(memory_format=torch.channels_last))
    # two-pass training forward (stats, apply) + backward (sums, apply): x is
    # read 4 times, dy twice, y and dx written once
    return Case(fns, 8 * x.nbytes)


def _dropout_arrays(n, dtype):
    rng = np.random.default_rng(0)
    return rng.standard_normal(n, dtype=np.float32).astype(dtype)


@register("norm", "dropout-fwd", DROPOUT_SIZES, [1_000_000])
def dropout_forward(n, dtype):
    x = _dropout_arrays(n, dtype)
    y, mask = np.empty_like(x), np.empty((n + 7) // 8, np.uint8)
    layer = fo.Dropout(P, seed=1)

    def fastopt():
        layer.forward(x, out=y)

    rng = np.random.default_rng(1)
    u, keep = np.empty(n, np.float32), np.empty(n, bool)
    y2 = np.empty_like(x)

    def numpy_naive():
        m = rng.random(n) >= P
        return x * m / (1 - P), np.packbits(m, bitorder="little")

    def numpy_careful():
        rng.random(out=u, dtype=np.float32)
        np.greater_equal(u, P, out=keep)
        np.multiply(x, keep, out=y2)
        np.multiply(y2, 1 / (1 - P), out=y2)
        return y2, np.packbits(keep, bitorder="little")

    fns = {"fastopt": fastopt, "numpy": numpy_naive, "numpy_careful": numpy_careful}
    torch = torch_or_none()
    if torch is not None:
        tx = torch.from_numpy(x)
        fns["torch"] = lambda: torch.ops.aten.native_dropout(tx, P, True)
    del mask
    return Case(fns, 2 * x.nbytes + (n + 7) // 8)


@register("norm", "dropout-bwd", DROPOUT_SIZES, [1_000_000])
def dropout_backward(n, dtype):
    dy = _dropout_arrays(n, dtype)
    _, mask = F.dropout(dy, P, 1)
    dx = np.empty_like(dy)

    def fastopt():
        F.dropout_backward(dy, mask, P, out=dx)

    keep = np.unpackbits(mask, count=n, bitorder="little").astype(bool)
    dx2 = np.empty_like(dy)

    def numpy_naive():
        return dy * keep / (1 - P)

    def numpy_careful():
        np.multiply(dy, keep, out=dx2)
        np.multiply(dx2, 1 / (1 - P), out=dx2)
        return dx2

    fns = {"fastopt": fastopt, "numpy": numpy_naive, "numpy_careful": numpy_careful}
    torch = torch_or_none()
    if torch is not None:
        tdy, tkeep = torch.from_numpy(dy), torch.from_numpy(keep)
        fns["torch"] = lambda: torch.ops.aten.native_dropout_backward(tdy, tkeep, 1 / (1 - P))
    return Case(fns, 2 * dy.nbytes + (n + 7) // 8)


@register("norm", "dropout-bwd-noseed", DROPOUT_SIZES, [1_000_000])
def dropout_backward_from_seed(n, dtype):
    """Backward with no stored mask: regenerated from (seed, offset)."""
    dy = _dropout_arrays(n, dtype)
    dx = np.empty_like(dy)
    return Case({"fastopt": lambda: F.dropout_backward(dy, None, P, out=dx, seed=1)},
                2 * dy.nbytes)
