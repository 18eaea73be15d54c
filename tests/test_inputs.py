"""Kinds of input that every family refuses alike, by name and before
writing anything: masked arrays (the kernels would use the masked entries),
and ints beyond float64's range as real-valued settings."""
import numpy as np
import pytest

import fastopt as fo
from fastopt import functional as F


def _masked(shape, dtype=np.float32):
    data = np.random.default_rng(0).standard_normal(shape).astype(dtype)
    return np.ma.masked_array(data, mask=data > 1)


@pytest.mark.parametrize("call", [
    lambda: fo.BatchNorm(3).forward(_masked((4, 3))),
    lambda: F.batch_norm_forward(_masked((4, 3)), None, None, training=True),
    lambda: F.dropout(_masked(100), 0.5, 1),
    lambda: fo.Dropout(0.5, seed=1).forward(_masked(100)),
    lambda: F.gaussian_noise(_masked(100), 0.5, seed=1),
    lambda: fo.LSTM(3, 4, seed=0).forward(_masked((5, 2, 3))),
    lambda: fo.GRUCell(3, 4, seed=0).forward(_masked((2, 3))),
])
def test_masked_arrays_are_refused(call):
    with pytest.raises(TypeError, match="masked array"):
        call()


def test_masked_output_is_refused_and_unchanged():
    x = np.ones(100, np.float32)
    out = _masked(100)
    before = out.data.copy()
    with pytest.raises(TypeError, match="out is a masked array"):
        F.dropout(x, 0.5, 1, out=out)
    np.testing.assert_array_equal(out.data, before)


@pytest.mark.parametrize("call,name", [
    (lambda: fo.BatchNorm(3, eps=10**400), "eps"),
    (lambda: fo.Dropout(10**400), "p"),
    (lambda: F.gaussian_noise(np.zeros(3), 10**400), "std"),
    (lambda: fo.LSTM(3, 4, dropout=10**400), "dropout"),
])
def test_huge_ints_as_reals_are_named(call, name):
    with pytest.raises(ValueError, match=f"{name} is beyond float64's range"):
        call()


class DLPackOnly:
    """An array that NumPy can reach only through DLPack (no buffer protocol,
    no __array__): what other frameworks hand over."""

    def __init__(self, a):
        self._a = a

    def __dlpack__(self, **kw):
        return self._a.__dlpack__(**kw)

    def __dlpack_device__(self):
        return self._a.__dlpack_device__()


# NumPy before 2.1 imports every DLPack array read-only (DLPack 0.x has no
# read-only flag): there a DLPack-only buffer can be read but not updated.
DLPACK_WRITABLE = np.from_dlpack(np.zeros(1)).flags.writeable


def _views(torch=None):
    """Ways to hand fastopt an array without handing it an ndarray: each wraps
    a new ndarray and returns (object to pass, the ndarray behind it)."""
    kinds = {"dlpack": DLPackOnly, "memoryview": memoryview}
    if torch is not None:
        kinds["torch"] = torch.from_numpy
    return kinds


def _every_family(wrap, dtype=np.float32):
    """The same calls on ndarrays and on `wrap`ped ones, whose outputs are
    written through `out=` into wrapped buffers: (name, on ndarrays, on wrapped)."""
    rng = np.random.default_rng(3)
    x4 = rng.standard_normal((4, 3, 5)).astype(dtype)
    dy4 = rng.standard_normal((4, 3, 5)).astype(dtype)
    v = rng.standard_normal(100).astype(dtype)

    def bn(x, dy, out, dx):
        layer = fo.BatchNorm(3, dtype=dtype)
        layer.forward(x, out=out)
        layer.backward(dy, out=dx)
        return layer.running_mean, layer.running_var, *layer.gradients()

    def bn_functional(x, dy, out, dx):
        rm, rv = np.zeros(3, dtype), np.ones(3, dtype)
        _, sm, si = F.batch_norm_forward(x, rm, rv, training=True, out=out)
        F.batch_norm_backward(dy, x, sm, si, training=True, out=dx)
        return rm, rv

    def dropout(x, dy, out, dx):
        _, mask = F.dropout(x, 0.3, 7, out=out)
        F.dropout_backward(dy, mask, 0.3, out=dx)
        return ()

    def dropout_layer(x, dy, out, dx):
        layer = fo.Dropout(0.3, seed=7)
        layer.forward(x, out=out)
        layer.backward(dy, out=dx)
        return ()

    def noise(x, dy, out, dx):
        F.gaussian_noise(x, 0.5, 9, out=out)
        F.gaussian_noise(dy, 0.5, 9, out=dx)
        return ()

    for name, fn, x, dy in [("BatchNorm", bn, x4, dy4), ("batch_norm", bn_functional, x4, dy4),
                            ("dropout", dropout, v, v[::-1].copy()),
                            ("Dropout", dropout_layer, v, v[::-1].copy()),
                            ("gaussian_noise", noise, v, v[::-1].copy())]:
        want = (np.empty_like(x), np.empty_like(dy))
        extra = fn(x, dy, *want)
        got = (np.full_like(x, 7.0), np.full_like(dy, 7.0))
        extra_w = fn(wrap(x.copy()), wrap(dy.copy()), wrap(got[0]), wrap(got[1]))
        yield name, want + tuple(extra), got + tuple(extra_w)


@pytest.mark.parametrize("kind", ["dlpack", "memoryview", "torch"])
def test_layers_read_and_write_through_views(kind, request):
    """BatchNorm, Dropout and noise took only ndarrays ('x must be a
    numpy.ndarray, got Tensor') while the optimizers and the recurrent layers
    took any view: now all read inputs and write out= buffers through a torch
    tensor, a memoryview or a DLPack-only object, with the ndarray results."""
    torch = request.getfixturevalue("torch") if kind == "torch" else None
    wrap = _views(torch)[kind]
    if kind == "dlpack" and not DLPACK_WRITABLE:
        with pytest.raises(ValueError, match="out is read-only but is written in place"):
            next(_every_family(wrap))
        return
    for name, want, got in _every_family(wrap):
        for w, g in zip(want, got):
            np.testing.assert_array_equal(g, w, err_msg=name)


@pytest.mark.parametrize("kind", ["dlpack", "memoryview", "torch"])
def test_optimizer_and_lstm_through_views(kind, request):
    """An optimizer updates DLPack-only params in place (they were taken as
    0-d object arrays), and the recurrent layers read such inputs. Where NumPy
    imports DLPack read-only, the params are refused and left unchanged."""
    torch = request.getfixturevalue("torch") if kind == "torch" else None
    wrap = _views(torch)[kind]
    rng = np.random.default_rng(5)
    p = [rng.standard_normal(n).astype(np.float32) for n in (7, 1023)]
    g = [rng.standard_normal(n).astype(np.float32) for n in (7, 1023)]
    want = [a.copy() for a in p]
    if kind == "dlpack" and not DLPACK_WRITABLE:
        with pytest.raises(ValueError, match=r"params\[0\] is read-only"):
            fo.Adam([wrap(a) for a in p], lr=0.1)
    else:
        fo.Adam(want, lr=0.1).step(g)
        opt = fo.Adam([wrap(a) for a in p], lr=0.1)
        opt.step([wrap(a.copy()) for a in g])
    for a, b in zip(p, want):
        np.testing.assert_array_equal(a, b)
    x = rng.standard_normal((5, 2, 3)).astype(np.float32)
    lstm = fo.LSTM(3, 4, seed=0)
    np.testing.assert_array_equal(lstm.forward(wrap(x.copy()))[0], lstm.forward(x)[0])


def test_a_buffer_that_would_be_copied_is_refused_before_writing():
    x = np.ones(100, np.float32)
    mask = np.full(13, 0xAA, np.uint8)
    for call in [lambda: F.dropout(x, 0.5, 1, out=[0.0] * 100, mask=mask),
                 lambda: F.dropout(x, 0.5, 1, mask=[0] * 13),
                 lambda: F.batch_norm_forward(x.reshape(25, 4), [0.0] * 4, [1.0] * 4,
                                              training=True)]:
        with pytest.raises(TypeError, match=r"\(list\) would be copied"):
            call()
    assert (mask == 0xAA).all() and (x == 1).all()
