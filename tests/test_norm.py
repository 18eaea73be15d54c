"""Batch norm: fastopt against a NumPy float64 reference written here from the
formulas, against torch.nn.functional.batch_norm with autograd, and against
finite differences; thread determinism, robustness, bad input."""
import numpy as np
import pytest

import fastopt as fo
from fastopt import functional as F
from conftest import DTYPES, central_differences

TOL = {np.float32: 2e-5, np.float64: 1e-11}

# (shape, channels_last): (N, C) (rows of one and two column blocks, wide rows
# reduced whole (65-512 columns), rows of several blocks past 512, row counts
# with 8-, 4- and 1-row passes; 70 rows of 1024: two units of rows, whose
# partial sums are spaced by a padded stride), NCHW with small and large spatial sizes
# (both loop shapes of the kernel; 130 channels: chunks of 64, 64 and 2),
# 3-D spatial, channels-last.
SHAPES = [((2, 3), False), ((16, 5), False), ((7, 33), False), ((13, 100), False),
          ((9, 130), False), ((13, 1030), False), ((70, 1024), False), ((3, 5, 300), True),
          ((3, 130, 7, 7), False), ((8, 3, 2), False),
          ((4, 3, 5, 7), False), ((3, 2, 4, 5, 6), False), ((2, 3, 5000), False),
          ((4, 5, 7, 3), True), ((2, 3, 4, 5, 6), True), ((1, 9, 4), True)]


def channel_axis(x, channels_last):
    return x.ndim - 1 if channels_last else 1


def bshape(x, channels_last):
    s = [1] * x.ndim
    s[channel_axis(x, channels_last)] = -1
    return s


def reduce_axes(x, channels_last):
    ax = channel_axis(x, channels_last)
    return tuple(i for i in range(x.ndim) if i != ax)


def ref_forward(x, w, b, rm, rv, training, momentum, eps, cl):
    """float64 reference: returns y, new running mean, new running var."""
    xd = x.astype(np.float64)
    axes, bs = reduce_axes(x, cl), bshape(x, cl)
    if training:
        mean, var = xd.mean(axes), xd.var(axes)
        m = xd.size // mean.size
        if rm is not None:
            rm = (1 - momentum) * rm + momentum * mean
            rv = (1 - momentum) * rv + momentum * var * m / (m - 1)
    else:
        mean, var = rm.astype(np.float64), rv.astype(np.float64)
    y = (xd - mean.reshape(bs)) / np.sqrt(var.reshape(bs) + eps)
    if w is not None:
        y = y * w.reshape(bs) + b.reshape(bs)
    return y, rm, rv


def ref_backward(dy, x, w, mean, var, eps, training, cl):
    """float64 reference of d(sum(dy*y)) w.r.t. x, weight, bias."""
    xd, dyd = x.astype(np.float64), dy.astype(np.float64)
    axes, bs = reduce_axes(x, cl), bshape(x, cl)
    invstd = 1 / np.sqrt(var + eps)
    xhat = (xd - mean.reshape(bs)) * invstd.reshape(bs)
    wd = np.ones_like(mean) if w is None else w.astype(np.float64)
    dw, db = (dyd * xhat).sum(axes), dyd.sum(axes)
    if training:
        dx = (wd * invstd).reshape(bs) * (dyd - dyd.mean(axes).reshape(bs)
                                          - xhat * (dyd * xhat).mean(axes).reshape(bs))
    else:
        dx = (wd * invstd).reshape(bs) * dyd
    return dx, dw, db


def make(shape, dtype, seed=0, loc=0.0, scale=1.0):
    rng = np.random.default_rng(seed)
    return (loc + scale * rng.standard_normal(shape)).astype(dtype)


def close(a, b, dtype, scale=1.0):
    np.testing.assert_allclose(a, b, rtol=TOL[dtype], atol=TOL[dtype] * scale)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,cl", SHAPES)
def test_training_forward_backward_and_running_stats(shape, cl, dtype):
    x0 = make(shape, dtype, 0, loc=0.5, scale=2.0)
    C = shape[-1] if cl else shape[1]
    bn = fo.BatchNorm(C, momentum=0.1, dtype=dtype, channels_last=cl)
    bn.weight[:] = make((C,), dtype, 1)
    bn.bias[:] = make((C,), dtype, 2)
    rm, rv = np.zeros(C), np.ones(C)
    gw, gb = np.zeros(C), np.zeros(C)
    for step in range(4):   # several steps: running stats and accumulated grads drift
        x = make(shape, dtype, 10 + step, loc=0.5, scale=2.0) if step else x0
        y = bn.forward(x)
        yr, rm, rv = ref_forward(x, bn.weight, bn.bias, rm, rv, True, 0.1, 1e-5, cl)
        close(y, yr, dtype, scale=3)
        dy = make(shape, dtype, 20 + step)
        x_before, dy_before = x.copy(), dy.copy()
        dx = bn.backward(dy)
        xd = x.astype(np.float64)
        dxr, dw, db = ref_backward(dy, x, bn.weight, xd.mean(reduce_axes(x, cl)),
                                   xd.var(reduce_axes(x, cl)), 1e-5, True, cl)
        gw += dw
        gb += db
        # dx cancels (exactly 0 for 2 values per channel): absolute tolerance on
        # the scale of its terms, |w*invstd*dy|
        term = np.abs(dy).max() * np.abs(bn.weight).max() / np.sqrt(
            xd.var(reduce_axes(x, cl)).min() + 1e-5)
        close(dx, dxr, dtype, scale=10 * term)
        close(bn.grad_weight, gw, dtype, scale=np.abs(gw).max() * 10)
        close(bn.grad_bias, gb, dtype, scale=np.abs(gb).max() * 10)
        np.testing.assert_array_equal(x, x_before)      # inputs unchanged
        np.testing.assert_array_equal(dy, dy_before)
    close(bn.running_mean, rm, dtype)
    close(bn.running_var, rv, dtype)
    assert bn.num_batches_tracked == 4


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,cl", SHAPES)
def test_eval_forward_backward(shape, cl, dtype):
    C = shape[-1] if cl else shape[1]
    bn = fo.BatchNorm(C, dtype=dtype, channels_last=cl).eval()
    bn.running_mean[:] = make((C,), dtype, 3)
    bn.running_var[:] = np.abs(make((C,), dtype, 4)) + 0.5
    bn.weight[:] = make((C,), dtype, 5)
    bn.bias[:] = make((C,), dtype, 6)
    x, dy = make(shape, dtype, 7), make(shape, dtype, 8)
    rm0, rv0 = bn.running_mean.copy(), bn.running_var.copy()
    y = bn.forward(x)
    yr, _, _ = ref_forward(x, bn.weight, bn.bias, bn.running_mean, bn.running_var, False,
                           0.1, 1e-5, cl)
    close(y, yr, dtype, scale=3)
    dx = bn.backward(dy)
    dxr, dw, db = ref_backward(dy, x, bn.weight, rm0.astype(np.float64),
                               rv0.astype(np.float64), 1e-5, False, cl)
    close(dx, dxr, dtype, scale=3)
    close(bn.grad_weight, dw, dtype, scale=np.abs(dw).max() * 10)
    close(bn.grad_bias, db, dtype, scale=np.abs(db).max() * 10)
    np.testing.assert_array_equal(bn.running_mean, rm0)   # eval does not update
    np.testing.assert_array_equal(bn.running_var, rv0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_no_affine_no_running_stats_cumulative_momentum(dtype):
    shape = (6, 4, 3, 3)
    x, dy = make(shape, dtype, 1, 2.0, 3.0), make(shape, dtype, 2)
    bn = fo.BatchNorm(4, affine=False, track_running_stats=False, dtype=dtype)
    assert bn.parameters() == [] and bn.gradients() == []
    for mode in (True, False):   # batch statistics in both modes
        bn.train(mode)
        y = bn.forward(x)
        close(y, ref_forward(x, None, None, None, None, True, 0, 1e-5, False)[0], dtype, 3)
        dx = bn.backward(dy)
        xd = x.astype(np.float64)
        dxr = ref_backward(dy, x, None, xd.mean((0, 2, 3)), xd.var((0, 2, 3)), 1e-5, True,
                           False)[0]
        close(dx, dxr, dtype, scale=3)
    # momentum=None: running stats are the plain average over batches
    bn = fo.BatchNorm(4, momentum=None, dtype=dtype)
    xs = [make(shape, dtype, 10 + i, 1.0, 2.0) for i in range(3)]
    for xi in xs:
        bn.forward(xi)
    mean = np.mean([xi.astype(np.float64).mean((0, 2, 3)) for xi in xs], axis=0)
    var = np.mean([xi.astype(np.float64).var((0, 2, 3), ddof=1) for xi in xs], axis=0)
    close(bn.running_mean, mean, dtype, 3)
    close(bn.running_var, var, dtype, 3)


@pytest.mark.parametrize("shape,cl", [((5, 3), False), ((3, 2, 4, 3), False),
                                      ((2, 3, 3, 2), True)])
@pytest.mark.parametrize("training", [True, False])
def test_finite_differences(shape, cl, training):
    """Central differences of L = sum(r * y) in float64 for x, weight, bias."""
    C = shape[-1] if cl else shape[1]
    x, r = make(shape, np.float64, 1, 1.0, 2.0), make(shape, np.float64, 2)
    w, b = make((C,), np.float64, 3), make((C,), np.float64, 4)
    rm, rv = make((C,), np.float64, 5), np.abs(make((C,), np.float64, 6)) + 0.5

    def loss(x, w, b):
        y, _, _ = F.batch_norm_forward(x, rm.copy(), rv.copy(), w, b, training=training,
                                       channels_last=cl)
        return float((r * y).sum())

    y, sm, si = F.batch_norm_forward(x, rm.copy(), rv.copy(), w, b, training=training,
                                     channels_last=cl)
    dx, dw, db = F.batch_norm_backward(r, x, sm, si, w, training=training, channels_last=cl)
    for arr, grad in ((x, dx), (w, dw), (b, db)):
        num = central_differences(lambda: loss(x, w, b), arr)
        np.testing.assert_allclose(grad.reshape(-1), num.reshape(-1), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,cl", [((4, 3, 5, 7), False), ((16, 5), False),
                                      ((4, 5, 7, 3), True), ((3, 2, 4, 5, 6), False)])
def test_torch_parity(torch, shape, cl, dtype):
    """Forward, dx, dweight, dbias and running stats after several steps, against
    torch.nn.functional.batch_norm with autograd (channels-last input is
    compared through a permuted NCHW view)."""
    tdt = torch.float32 if dtype == np.float32 else torch.float64
    C = shape[-1] if cl else shape[1]
    bn = fo.BatchNorm(C, dtype=dtype, channels_last=cl)
    w0, b0 = make((C,), dtype, 1), make((C,), dtype, 2)
    bn.weight[:], bn.bias[:] = w0, b0
    tw = torch.tensor(w0, requires_grad=True)
    tb = torch.tensor(b0, requires_grad=True)
    trm, trv = torch.zeros(C, dtype=tdt), torch.ones(C, dtype=tdt)

    def to_nchw(t):
        return t.movedim(-1, 1) if cl else t

    for step in range(3):
        x, dy = make(shape, dtype, 10 + step, 0.3, 1.7), make(shape, dtype, 20 + step)
        tx = torch.tensor(x, requires_grad=True)
        ty = torch.nn.functional.batch_norm(to_nchw(tx), trm, trv, tw, tb, training=True,
                                            momentum=0.1, eps=1e-5)
        ty.backward(to_nchw(torch.tensor(dy)))
        y = bn.forward(x)
        dx = bn.backward(dy)
        tol = dict(rtol=1e-4, atol=1e-4) if dtype == np.float32 else dict(rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(y, ty.detach().movedim(1, -1).numpy() if cl
                                   else ty.detach().numpy(), **tol)
        np.testing.assert_allclose(dx, tx.grad.numpy(), **tol)
        np.testing.assert_allclose(bn.grad_weight, tw.grad.numpy(), **tol)
        np.testing.assert_allclose(bn.grad_bias, tb.grad.numpy(), **tol)
    np.testing.assert_allclose(bn.running_mean, trm.numpy(), **tol)
    np.testing.assert_allclose(bn.running_var, trv.numpy(), **tol)
    # eval mode against torch's eval
    bn.eval()
    x = make(shape, dtype, 30)
    ty = torch.nn.functional.batch_norm(to_nchw(torch.tensor(x)), trm, trv, tw.detach(),
                                        tb.detach(), training=False, eps=1e-5)
    y = bn.forward(x)
    np.testing.assert_allclose(y, ty.movedim(1, -1).numpy() if cl else ty.numpy(), **tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,cl", [((16, 8, 32, 32), False), ((4096, 64), False),
                                      ((8, 32, 32, 16), True), ((64, 6, 3, 100), False),
                                      ((512, 300), False), ((16, 130, 7, 7), False),
                                      # more units than the partial-sum cap (8 MB) allows
                                      ((256, 16384), False)])
def test_thread_count_determinism(threads, shape, cl, dtype):
    C = shape[-1] if cl else shape[1]
    x, dy = make(shape, dtype, 1, 5.0, 2.0), make(shape, dtype, 2)
    w, b = make((C,), dtype, 3), make((C,), dtype, 4)
    results = []
    for nt in (1, 2, 3):
        fo.set_num_threads(nt)
        rm, rv = np.zeros(C, dtype), np.ones(C, dtype)
        y, sm, si = F.batch_norm_forward(x, rm, rv, w, b, training=True, channels_last=cl)
        dx, dw, db = F.batch_norm_backward(dy, x, sm, si, w, channels_last=cl)
        results.append((y, sm, si, rm, rv, dx, dw, db))
    for other in results[1:]:
        for a, b_ in zip(results[0], other):
            np.testing.assert_array_equal(a, b_)


@pytest.mark.parametrize("shape,cl", [((64, 16, 8, 8), False), ((512, 32), False),
                                      ((16, 8, 8, 12), True)])
def test_large_mean_small_spread_float32(shape, cl):
    """x = 1e4 + N(0, 1) in float32 still normalizes to unit variance (1e-3)."""
    x = make(shape, np.float32, 0, loc=1e4, scale=1.0)
    y, sm, si = F.batch_norm_forward(x, None, None, training=True, channels_last=cl)
    axes = reduce_axes(x, cl)
    yd = y.astype(np.float64)
    assert np.abs(yd.var(axes) - 1).max() < 1e-3
    assert np.abs(yd.mean(axes)).max() < 1e-3
    xd = x.astype(np.float64)
    np.testing.assert_allclose(sm, xd.mean(axes), rtol=1e-7)
    np.testing.assert_allclose(1 / si.astype(np.float64) ** 2 - 1e-5, xd.var(axes), rtol=1e-4)


def test_functional_out_buffers_and_in_place():
    x = make((8, 4, 5), np.float32, 0)
    out, sm, si = np.empty_like(x), np.empty(4, np.float32), np.empty(4, np.float32)
    y, sm2, si2 = F.batch_norm_forward(x, None, None, training=True, out=out, save_mean=sm,
                                       save_invstd=si)
    assert y is out and sm2 is sm and si2 is si
    ref = ref_forward(x, None, None, None, None, True, 0, 1e-5, False)[0]
    close(y, ref, np.float32, 3)
    dy = make(x.shape, np.float32, 1)
    dxo, dw, db = np.empty_like(x), np.ones(4, np.float32), np.ones(4, np.float32)
    w = np.ones(4, np.float32)
    dx, dw2, db2 = F.batch_norm_backward(dy, x, sm, si, w, out=dxo, dweight=dw, dbias=db,
                                         accumulate=True)
    assert dx is dxo and dw2 is dw and db2 is db
    _, rdw, rdb = ref_backward(dy, x, None, x.astype(np.float64).mean((0, 2)),
                               x.astype(np.float64).var((0, 2)), 1e-5, True, False)
    close(dw, rdw + 1, np.float32, 10)
    close(db, rdb + 1, np.float32, 10)
    # eval forward in place (y is x)
    rm, rv = np.zeros(4, np.float32), np.full(4, 4.0, np.float32)
    x2 = x.copy()
    y, _, _ = F.batch_norm_forward(x2, rm, rv, training=False, out=x2)
    assert y is x2
    close(x2, x / np.sqrt(4 + 1e-5), np.float32, 3)


def test_trains_with_adam():
    """BatchNorm + Adam: fit weight/bias so that y matches a target affine map."""
    rng = np.random.default_rng(0)
    bn = fo.BatchNorm(3)
    opt = fo.Adam(bn.parameters(), lr=0.05)
    target_w, target_b = np.array([2.0, -1.0, 0.5]), np.array([0.3, 0.0, -2.0])
    for _ in range(300):
        x = rng.standard_normal((64, 3)).astype(np.float32) * 3 + 1
        y = bn.forward(x)
        xhat = (x - x.mean(0)) / np.sqrt(x.var(0) + 1e-5)
        dy = (2 * (y - (xhat * target_w + target_b)) / y.size).astype(np.float32)
        bn.zero_grad()
        bn.backward(dy)
        opt.step(bn.gradients())
    np.testing.assert_allclose(bn.weight, target_w, atol=0.02)
    np.testing.assert_allclose(bn.bias, target_b, atol=0.02)


# ---------------------------------------------------------------- bad input

def _snapshot(*arrays):
    return [a.copy() for a in arrays]


@pytest.mark.parametrize("case", ["dtype", "channels", "noncontig", "readonly_out",
                                  "one_value", "eps", "momentum", "overlap", "running_pair",
                                  "eval_no_stats", "not_array", "byte_order", "w_byte_order"])
def test_forward_bad_input_raises_before_writing(case):
    x = make((4, 3, 5), np.float32, 0)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    w, b = np.ones(3, np.float32), np.zeros(3, np.float32)
    out = np.full_like(x, 7.0)
    kw = dict(training=True, out=out)
    args = [x, rm, rv, w, b]
    if case == "dtype":
        args[1] = rm.astype(np.float64)
    elif case == "channels":
        args[3] = np.ones(4, np.float32)
    elif case == "noncontig":
        args[0] = np.asfortranarray(x)
    elif case == "readonly_out":
        out.setflags(write=False)
    elif case == "one_value":
        args[0] = x[:1, :, :1].copy()
        kw["out"] = None
    elif case == "eps":
        kw["eps"] = 0.0
    elif case == "momentum":
        kw["momentum"] = float("nan")
    elif case == "overlap":
        args[2] = rm      # running_var is running_mean
    elif case == "running_pair":
        args[2] = None
    elif case == "eval_no_stats":
        args[1] = args[2] = None
        kw["training"] = False
    elif case == "not_array":
        args[0] = x.tolist()
    elif case == "byte_order":   # the kernel would read garbage
        args[0] = x.astype(x.dtype.newbyteorder())
    elif case == "w_byte_order":
        args[3] = w.astype(w.dtype.newbyteorder())
    before = _snapshot(x, rm, rv, w, b, out)
    with pytest.raises((TypeError, ValueError)):
        F.batch_norm_forward(*args, **kw)
    for a, s in zip((x, rm, rv, w, b, out), before):
        np.testing.assert_array_equal(a, s)


def test_backward_bad_input_and_layer_checks():
    x = make((4, 3, 5), np.float32, 0)
    _, sm, si = F.batch_norm_forward(x, None, None, training=True)
    dy = make(x.shape, np.float32, 1)
    dw = np.zeros(3, np.float32)
    with pytest.raises(ValueError, match="dy"):
        F.batch_norm_backward(dy[:3].copy(), x, sm, si, np.ones(3, np.float32), dweight=dw)
    with pytest.raises(TypeError, match="dy"):
        F.batch_norm_backward(dy.astype(np.float64), x, sm, si, dweight=dw)
    with pytest.raises(ValueError, match="dweight"):
        F.batch_norm_backward(dy, x, sm, si, dweight=sm)   # dweight shares memory with save_mean
    assert not dw.any()
    bn = fo.BatchNorm(3)
    with pytest.raises(ValueError, match="without a matching forward"):
        bn.backward(dy)
    with pytest.raises(TypeError, match="dtype"):
        bn.forward(x.astype(np.float64))
    with pytest.raises(ValueError, match="num_features"):
        bn.forward(make((4, 5), np.float32, 0))
    rm = bn.running_mean.copy()
    with pytest.raises(ValueError):
        bn.forward(x[:1, :, :1].copy())            # one value per channel in training
    np.testing.assert_array_equal(bn.running_mean, rm)
    assert bn.num_batches_tracked == 0
    bn.forward(x)
    with pytest.raises(ValueError, match="shape"):
        bn.backward(dy[:, :, :4].copy())
    x_before = x.copy()
    with pytest.raises(ValueError, match="shares memory"):
        bn.forward(x, out=x)                        # backward would read a clobbered x
    np.testing.assert_array_equal(x, x_before)
    with pytest.raises(ValueError):
        fo.BatchNorm(0)
    with pytest.raises(ValueError):
        fo.BatchNorm(3, eps=-1.0)
    with pytest.raises(ValueError):
        fo.BatchNorm(3, momentum=1.5)
    with pytest.raises(TypeError):
        fo.BatchNorm(3, dtype=np.int32)


def _assert_unchanged(arrays, before):
    for a, s in zip(arrays, before):
        np.testing.assert_array_equal(a, s)


def _bn_state(bn):
    """The layer's arrays (copied) and step count, to check a failed call left them."""
    arrays = [a for a in (bn.weight, bn.bias, bn.grad_weight, bn.grad_bias, bn.running_mean,
                          bn.running_var, bn._save_mean, bn._save_invstd) if a is not None]
    return arrays, _snapshot(*arrays), bn.num_batches_tracked


def _assert_bn_unchanged(bn, state):
    arrays, before, tracked = state
    _assert_unchanged(arrays, before)
    assert bn.num_batches_tracked == tracked


@pytest.mark.parametrize("name", ["training", "channels_last", "b:training", "b:channels_last",
                                  "b:accumulate", "b:input_grad"])
@pytest.mark.parametrize("value", ["no", 1, None])
def test_functional_bool_options_must_be_bools(name, value):
    """training="no" was bool()-coerced (and trained): boolean options must be
    bool or numpy.bool_, else a TypeError naming them, nothing written."""
    x = make((4, 3, 5), np.float32, 0)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    out = np.full_like(x, 7.0)
    _, sm, si = F.batch_norm_forward(x, None, None, training=True)
    dy, dw, db = make(x.shape, np.float32, 1), np.full(3, 5.0, np.float32), np.ones(3, np.float32)
    arrays = (x, rm, rv, out, sm, si, dy, dw, db)
    before = _snapshot(*arrays)
    backward, name = name.startswith("b:"), name.removeprefix("b:")
    with pytest.raises(TypeError, match=f"^{name} must be a bool"):
        if backward:
            F.batch_norm_backward(dy, x, sm, si, out=out, dweight=dw, dbias=db, **{name: value})
        else:
            F.batch_norm_forward(x, rm, rv, out=out, **{name: value})
    _assert_unchanged(arrays, before)
    F.batch_norm_forward(x, rm, rv, training=np.bool_(True), channels_last=np.False_)
    assert rm.any()                      # numpy.bool_ True trains


@pytest.mark.parametrize("case", ["affine", "track_running_stats", "channels_last", "train",
                                  "training_attr"])
def test_layer_bool_options_must_be_bools(case):
    if case in ("affine", "track_running_stats", "channels_last"):
        with pytest.raises(TypeError, match=f"^{case} must be a bool"):
            fo.BatchNorm(3, **{case: "no"})
        assert fo.BatchNorm(3, **{case: np.bool_(False)}).__dict__[case] is False
        return
    bn = fo.BatchNorm(3)
    x = make((4, 3), np.float32, 0)
    bn.forward(x)
    state = _bn_state(bn)
    if case == "train":
        with pytest.raises(TypeError, match="^mode must be a bool"):
            bn.train("no")
        assert bn.training is True
    else:
        bn.training = "no"               # truthy: would have trained
        with pytest.raises(TypeError, match="^training must be a bool"):
            bn.forward(x)
    _assert_bn_unchanged(bn, state)


def test_out_not_an_array_names_out():
    """out=[0] gave Cython's "Argument 'y' has incorrect type"."""
    x = make((4, 3), np.float32, 0)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    before = _snapshot(x, rm, rv)
    with pytest.raises(TypeError, match=r"^out \(list\) would be copied"):
        F.batch_norm_forward(x, rm, rv, training=True, out=[0])
    bn = fo.BatchNorm(3)
    state = _bn_state(bn)
    with pytest.raises(TypeError, match=r"^out \(list\) would be copied"):
        bn.forward(x, out=[0])
    _assert_unchanged((x, rm, rv), before)
    _assert_bn_unchanged(bn, state)


def test_running_stats_as_lists_are_read_in_eval_and_refused_in_training():
    """Eval only reads the running statistics: lists were refused there as
    "would be copied" (training writes them, so there they still are)."""
    x = make((5, 3), np.float64, 0)
    rm, rv = [0.5, -1.0, 2.0], [1.0, 4.0, 0.25]
    y, _, _ = F.batch_norm_forward(x, rm, rv, eps=1e-5)
    np.testing.assert_allclose(y, (x - np.array(rm)) / np.sqrt(np.array(rv) + 1e-5), rtol=1e-14)
    with pytest.raises(TypeError, match=r"^running_mean \(list\) would be copied"):
        F.batch_norm_forward(x, rm, rv, training=True)


@pytest.mark.parametrize("attr,value,exc", [("momentum", "a", TypeError),
                                            ("momentum", 1.5, ValueError),
                                            ("momentum", float("nan"), ValueError),
                                            ("eps", "a", TypeError), ("eps", 0.0, ValueError)])
def test_edited_hyperparameters_are_named(attr, value, exc):
    """bn.momentum = "a" gave "could not convert string to float"."""
    bn = fo.BatchNorm(3)
    x = make((4, 3), np.float32, 0)
    setattr(bn, attr, value)
    state = _bn_state(bn)
    with pytest.raises(exc, match=f"^{attr} must be"):
        bn.forward(x)
    _assert_bn_unchanged(bn, state)
    assert bn._ctx is None


@pytest.mark.parametrize("n,dtype", [(2**62, np.float32), (2**61, np.float64),
                                     (2**63, np.float32)])
def test_huge_num_features_names_it(n, dtype):
    """BatchNorm(2**62) gave NumPy's "array is too big"."""
    with pytest.raises(ValueError, match="num_features"):
        fo.BatchNorm(n, dtype=dtype)


@pytest.mark.parametrize("training", [True, False])
def test_backward_once_per_forward(training):
    """A second backward for one forward added the parameter grads again;
    now refused (as torch without retain_graph), and a failed backward does
    not use up its forward."""
    bn = fo.BatchNorm(3).train(training)
    x, dy = make((4, 3, 5), np.float32, 0), make((4, 3, 5), np.float32, 1)
    bn.forward(x)
    with pytest.raises(ValueError, match="shape"):
        bn.backward(dy[:, :, :4].copy())
    with pytest.raises(TypeError, match=r"^out \(list\) would be copied"):
        bn.backward(dy, out=[0])
    dx = bn.backward(dy)
    state = _bn_state(bn)
    out = np.full_like(dx, 7.0)
    with pytest.raises(ValueError, match="forward first"):
        bn.backward(dy, out=out)
    _assert_bn_unchanged(bn, state)
    assert (out == 7.0).all()
    bn.forward(x)                         # a new forward: one more backward
    np.testing.assert_array_equal(bn.backward(dy), dx)
    np.testing.assert_array_equal(bn.grad_weight, 2 * state[1][2])


def test_eval_reads_read_only_running_stats():
    """Eval only reads running_mean/var: read-only ones are fine there (they
    were refused); training writes them, so there they are still refused."""
    x = make((4, 3, 5), np.float32, 0)
    rm, rv = make((3,), np.float32, 1), np.abs(make((3,), np.float32, 2)) + 0.5
    rm.setflags(write=False)
    rv.setflags(write=False)
    y, sm, si = F.batch_norm_forward(x, rm, rv, training=False)
    yr = ref_forward(x, None, None, rm, rv, False, 0.1, 1e-5, False)[0]
    close(y, yr, np.float32, scale=3)
    bn = fo.BatchNorm(3).eval()
    bn.running_mean, bn.running_var = rm, rv
    close(bn.forward(x), yr, np.float32, scale=3)
    out = np.full_like(x, 7.0)
    with pytest.raises(ValueError, match="running_mean is read-only"):
        F.batch_norm_forward(x, rm, rv, training=True, out=out)
    assert (out == 7.0).all()
    rm2, rv2 = rm.copy(), rv.copy()      # read in eval, but never written over
    before = _snapshot(rm2, rv2, out)
    with pytest.raises(ValueError, match="save_mean shares memory with running_mean"):
        F.batch_norm_forward(x, rm2, rv2, training=False, out=out, save_mean=rm2)
    _assert_unchanged((rm2, rv2, out), before)


@pytest.mark.parametrize("shape,cl", [((6, 3, 4, 5), False), ((40, 3), False), ((6, 4, 5, 3), True)])
def test_nan_propagates_to_its_channel(shape, cl):
    x = make(shape, np.float32, 0)
    idx = [0] * x.ndim
    idx[channel_axis(x, cl)] = 1
    x[tuple(idx)] = np.nan
    y, sm, si = F.batch_norm_forward(x, None, None, training=True, channels_last=cl)
    ch = np.moveaxis(y, channel_axis(x, cl), 0)
    assert np.isnan(ch[1]).all() and np.isnan(sm[1]) and np.isnan(si[1])
    assert np.isfinite(ch[[0, 2]]).all()


@pytest.mark.parametrize("shape,cl", [((4, 3, 2, 2), False), ((4, 3), False), ((4, 2, 2, 3), True)])
def test_a_variance_beyond_float64_is_inf_as_in_torch(shape, cl):
    """float64 data beyond 1e154: the sum of squares overflows. Its variance
    came out NaN (Inf - Inf), and with it y and running_var; torch gives
    running_var Inf and y = 0 (an invstd of 0)."""
    x = make(shape, np.float64, 0)
    big = np.moveaxis(x, channel_axis(x, cl), 0)[1]
    big.flat[0] = 1e200
    rm, rv = np.zeros(3), np.ones(3)
    y, sm, si = F.batch_norm_forward(x, rm, rv, training=True, channels_last=cl)
    ch = np.moveaxis(y, channel_axis(x, cl), 0)
    assert (ch[1] == 0).all() and si[1] == 0 and rv[1] == np.inf
    assert np.isfinite(rm[1]) and np.isfinite(ch[[0, 2]]).all()


@pytest.mark.parametrize("shape,cl", [((4, 3, 2, 2), False), ((5, 3), False), ((4, 2, 2, 3), True)])
@pytest.mark.parametrize("where", [0, 1, -1])
@pytest.mark.parametrize("sign", [1, -1])
def test_an_inf_makes_the_mean_inf_and_the_variance_nan_as_in_torch(shape, cl, where, sign):
    """torch: an Inf in a channel makes its mean that Inf and its variance NaN.
    An Inf as the channel's first element (the shift of its sums) made the
    mean NaN; elsewhere the variance came out Inf."""
    x = make(shape, np.float32, 0)
    np.moveaxis(x, channel_axis(x, cl), 0)[1].flat[where] = sign * np.inf
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    F.batch_norm_forward(x, rm, rv, training=True, momentum=0.5, channels_last=cl)
    assert rm[1] == sign * np.inf and np.isnan(rv[1])
    assert np.isfinite(rm[[0, 2]]).all() and np.isfinite(rv[[0, 2]]).all()


@pytest.mark.parametrize("where", [0, 1, -1])
def test_an_inf_gives_torchs_running_stats(torch, where):
    x = make((4, 3, 2, 2), np.float32, 0)
    x[:, 1].flat[where] = np.inf
    x[:, 2].flat[where] = -np.inf
    x[:, 2].flat[where - 1] = np.inf      # both signs: the mean is NaN too
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    F.batch_norm_forward(x, rm, rv, training=True, momentum=0.5)
    t_rm, t_rv = torch.zeros(3), torch.ones(3)
    torch.nn.functional.batch_norm(torch.from_numpy(x), t_rm, t_rv, training=True, momentum=0.5)
    np.testing.assert_array_equal(rm[1:], t_rm.numpy()[1:])   # Inf, NaN
    np.testing.assert_array_equal(rv[1:], t_rv.numpy()[1:])   # NaN, NaN
    np.testing.assert_allclose(rm[0], t_rm.numpy()[0], rtol=1e-6)
    np.testing.assert_allclose(rv[0], t_rv.numpy()[0], rtol=1e-6)


# ------------------------------------------------- random shapes (hypothesis)
from hypothesis import given, settings, strategies as st  # noqa: E402


@settings(max_examples=80, deadline=None)
@given(n=st.integers(2, 9), c=st.integers(1, 40),
       spatial=st.lists(st.integers(1, 24), min_size=0, max_size=2),
       cl=st.booleans(), dtype=st.sampled_from(DTYPES), training=st.booleans(),
       loc=st.sampled_from([0.0, 3.0, 1e3]), seed=st.integers(0, 2**16))
def test_random_shapes_against_reference(n, c, spatial, cl, dtype, training, loc, seed):
    """Any (N, C, *spatial) / (N, *spatial, C): both kernel loop shapes, odd
    sizes, vector tails, the row/segment boundary (inner around 16)."""
    shape = (n, *spatial, c) if cl else (n, c, *spatial)
    x = make(shape, dtype, seed, loc, 2.0)
    dy = make(shape, dtype, seed + 1)
    w, b = make((c,), dtype, seed + 2), make((c,), dtype, seed + 3)
    rm, rv = make((c,), dtype, seed + 4, loc), np.abs(make((c,), dtype, seed + 5)) + 0.5
    rm0, rv0 = rm.copy(), rv.copy()
    y, sm, si = F.batch_norm_forward(x, rm, rv, w, b, training=training, momentum=0.2,
                                     channels_last=cl)
    yr, rmr, rvr = ref_forward(x, w, b, rm0.astype(np.float64), rv0.astype(np.float64),
                               training, 0.2, 1e-5, cl)
    close(y, yr, dtype, scale=10)
    close(rm, rmr, dtype, scale=10 * (1 + loc))
    close(rv, rvr, dtype, scale=10)
    dx, dw, db = F.batch_norm_backward(dy, x, sm, si, w, training=training, channels_last=cl)
    axes = reduce_axes(x, cl)
    mean = x.astype(np.float64).mean(axes) if training else rm0.astype(np.float64)
    var = x.astype(np.float64).var(axes) if training else rv0.astype(np.float64)
    dxr, dwr, dbr = ref_backward(dy, x, w, mean, var, 1e-5, training, cl)
    term = np.abs(dy).max() * np.abs(w).max() / np.sqrt(var.min() + 1e-5)
    # float32 save_mean is the mean rounded to float32 (as torch's): its
    # rounding, (1 + loc) * 2^-24, enters dweight through sum(dy)*invstd
    m = x.size // c
    close(dx, dxr, dtype, scale=20 * term * (1 + loc / 1e2))
    close(dw, dwr, dtype, scale=20 * np.sqrt(m) * (1 + loc) * np.abs(dy).max()
          * np.sqrt(1 / (var.min() + 1e-5)))
    close(db, dbr, dtype, scale=20 * np.sqrt(m) * np.abs(dy).max())


def _aligned_empty(shape, dtype, align):
    """An array whose data address is `align` (64, 16, 8, 4) modulo 64."""
    n = int(np.prod(shape)) * np.dtype(dtype).itemsize
    raw = np.empty(n + 128, np.uint8)
    start = (-raw.ctypes.data) % 64 + (align if align < 64 else 0)
    out = raw[start:start + n].view(dtype).reshape(shape)
    assert out.ctypes.data % 64 == align % 64
    return out


@pytest.mark.parametrize("shape,cl,dtype", [((8, 16, 184, 184), False, np.float32),
                                            ((8, 184, 184, 16), True, np.float32),
                                            ((4, 128, 128, 64), True, np.float32),
                                            ((4, 181, 181, 24), True, np.float64),
                                            ((8, 16, 128, 128), False, np.float64),
                                            ((4, 8, 361, 361), False, np.float32),
                                            ((180, 512, 7, 7), False, np.float32),
                                            ((90, 512, 7, 7), False, np.float64)])
@pytest.mark.parametrize("align", [64, 16, "element"])
def test_large_outputs_streaming_stores(shape, cl, dtype, align):
    """Outputs over 16 MB take the streaming-store apply pass (64/16-byte
    aligned output with 16-byte multiple lines, or lines of 64 bytes or more
    written as one run, as 7x7 planes are; otherwise, as for an
    output aligned only to its element size, ordinary stores; channels-last
    rows of 1 to 4 whole vectors keep their coefficients in registers): forward
    and backward against the float64 reference, on fastopt's default threads
    (two here: each thread's run starts and ends inside a line)."""
    if align == "element":
        align = np.dtype(dtype).itemsize
    C = shape[-1] if cl else shape[1]
    x, dy = make(shape, dtype, 1, 2.0, 3.0), make(shape, dtype, 2)
    w, b = make((C,), dtype, 3), make((C,), dtype, 4)
    y = _aligned_empty(shape, dtype, align)
    dx = _aligned_empty(shape, dtype, align)
    _, sm, si = F.batch_norm_forward(x, None, None, w, b, training=True, channels_last=cl, out=y)
    F.batch_norm_backward(dy, x, sm, si, w, channels_last=cl, out=dx)
    yr = ref_forward(x, w, b, None, None, True, 0.1, 1e-5, cl)[0]
    axes = reduce_axes(x, cl)
    xd = x.astype(np.float64)
    dxr = ref_backward(dy, x, w, xd.mean(axes), xd.var(axes), 1e-5, True, cl)[0]
    close(y, yr, dtype, scale=10)
    close(dx, dxr, dtype, scale=10 * np.abs(dxr).max())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,cl", [((19, 1040), False), ((21, 2, 528), False),
                                      ((5, 1024), False), ((6, 40, 16), True),
                                      ((8, 560), False), ((9, 560), False),
                                      # rows split between two threads
                                      ((40, 1024), False), ((10, 60, 64), True)])
def test_every_offset_of_x_in_a_line(threads, shape, cl, dtype):
    """NumPy aligns arrays to 16 bytes only: x and dy at every offset in a
    64-byte line give the reference, and the same bits as at offset 0, on one
    thread and on two (the apply pass and the reduction of wide rows run
    their vectors from x's first line)."""
    C = shape[-1] if cl else shape[1]
    x0, dy0 = make(shape, dtype, 1, 2.0, 3.0), make(shape, dtype, 2)
    w, b = make((C,), dtype, 3), make((C,), dtype, 4)
    axes = reduce_axes(x0, cl)
    xd = x0.astype(np.float64)
    yr = ref_forward(x0, w, b, None, None, True, 0.1, 1e-5, cl)[0]
    dxr, dwr, dbr = ref_backward(dy0, x0, w, xd.mean(axes), xd.var(axes), 1e-5, True, cl)
    first = None
    for align in range(0, 64, np.dtype(dtype).itemsize):
        x = _aligned_empty(shape, dtype, align or 64)
        dy = _aligned_empty(shape, dtype, (align + 24) % 64 or 64)
        x[...], dy[...] = x0, dy0
        for nt in (1, 2):
            fo.set_num_threads(nt)
            y, sm, si = F.batch_norm_forward(x, None, None, w, b, training=True,
                                             channels_last=cl)
            dx, dw, db = F.batch_norm_backward(dy, x, sm, si, w, channels_last=cl)
            if first is None:
                first = (y, dx, dw, db)
                close(y, yr, dtype, scale=10)
                close(dx, dxr, dtype, scale=10 * np.abs(dxr).max())
                close(dw, dwr, dtype, scale=10 * np.sqrt(x.size / C))
                close(db, dbr, dtype, scale=10 * np.sqrt(x.size / C))
            for got, want in zip((y, dx, dw, db), first):
                np.testing.assert_array_equal(
                    got, want, err_msg=f"x at {align} bytes in a line, {nt} threads")


@pytest.mark.parametrize("shape,cl", [((8, 16, 184, 184), False), ((8, 184, 184, 16), True),
                                      ((3, 5, 7), False)])
def test_eval_backward_does_not_read_x(shape, cl):
    """Eval backward is dx = weight*invstd*dy (x is not read: an Inf in x does
    not reach dx), also on the streaming-store path of large outputs."""
    C = shape[-1] if cl else shape[1]
    x, dy = make(shape, np.float32, 1), make(shape, np.float32, 2)
    x.reshape(-1)[::97] = np.inf
    w = make((C,), np.float32, 3)
    rv = np.abs(make((C,), np.float32, 4)) + 0.5
    sm, si = make((C,), np.float32, 5), (1 / np.sqrt(rv + 1e-5)).astype(np.float32)
    dx, _, _ = F.batch_norm_backward(dy, x, sm, si, w, training=False, channels_last=cl,
                                     out=_aligned_empty(shape, np.float32, 16))
    k = (w.astype(np.float64) * si).reshape(bshape(x, cl))
    close(dx, k * dy, np.float32, scale=10)


@pytest.mark.parametrize("shape", [(0, 3), (0, 3, 2), (2, 3, 0)])
def test_empty_batch_trains_to_nothing(shape):
    # as torch: an empty output, running stats untouched, the batch counted,
    # zero parameter grads (the saved statistics are 0, not stale memory)
    bn = fo.BatchNorm(3)
    bn._save_mean[:] = bn._save_invstd[:] = np.nan
    y = bn.forward(np.zeros(shape, np.float32))
    dx = bn.backward(np.zeros(shape, np.float32))
    assert y.shape == dx.shape == shape
    np.testing.assert_array_equal(bn.running_mean, 0.0)
    np.testing.assert_array_equal(bn.running_var, 1.0)
    assert bn.num_batches_tracked == 1
    np.testing.assert_array_equal(bn.grad_weight, 0.0)
    np.testing.assert_array_equal(bn.grad_bias, 0.0)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        bn.forward(np.zeros((1, 3), np.float32))


@pytest.mark.parametrize("shape", [(2, 1000, 0), (2, 3, 0, 4), (2, 5000, 3, 0)])
def test_a_zero_size_spatial_dim_is_an_empty_batch(shape):
    """(N, C, 0): the kernel planned per-column scratch for C*0 entries and wrote
    C past it (heap corruption: malloc aborted, or a segfault, for C = 1000).
    Now as an empty batch: training saves zeros and leaves the running stats,
    eval saves the running stats' mean and 1/sqrt(var + eps)."""
    C = shape[1]
    x = np.zeros(shape, np.float32)
    rm, rv = np.full(C, 0.5, np.float32), np.full(C, 3.0, np.float32)
    for _ in range(3):     # a corrupted heap shows at a later allocation
        y, sm, si = F.batch_norm_forward(x, rm, rv, training=True)
        assert y.shape == shape and (sm == 0).all() and (si == 0).all()
        dx, dw, db = F.batch_norm_backward(x, x, sm, si, np.ones(C, np.float32), training=True)
        assert dx.shape == shape and (dw == 0).all() and (db == 0).all()
    np.testing.assert_array_equal(rm, 0.5)
    np.testing.assert_array_equal(rv, 3.0)
    y, sm, si = F.batch_norm_forward(x, rm, rv, training=False)
    np.testing.assert_array_equal(sm, rm)
    np.testing.assert_allclose(si, 1 / np.sqrt(3.0 + 1e-5), rtol=1e-6)


def test_an_out_buffer_with_input_grad_false_is_refused():
    """input_grad=False computes no dx: an out= buffer was left unwritten and
    returned as None, silently (F.dropout refuses its unused mask the same way)."""
    x = make((4, 3), np.float32, 0)
    _, sm, si = F.batch_norm_forward(x, None, None, training=True)
    buf = np.full_like(x, 7.0)
    with pytest.raises(ValueError, match="^out must be None with input_grad=False"):
        F.batch_norm_backward(x, x, sm, si, input_grad=False, out=buf)
    assert (buf == 7.0).all()


def test_named_parameters_are_torchs_names_and_the_layers_arrays(torch):
    for affine in (True, False):
        bn = fo.BatchNorm(4, affine=affine)
        named = bn.named_parameters()
        assert [k for k, _ in named] == [k for k, _ in torch.nn.BatchNorm1d(4, affine=affine).named_parameters()]
        assert all(a is b for (_, a), b in zip(named, bn.parameters()))
    assert fo.Dropout(0.5).named_parameters() == []


@pytest.mark.parametrize("affine,track", [(True, True), (False, True), (True, False)])
def test_state_dict_names_and_round_trip(affine, track):
    bn = fo.BatchNorm(4, affine=affine, track_running_stats=track)
    for seed in range(3):
        bn.forward(make((8, 4), np.float32, seed))
    sd = bn.state_dict()
    expected = (["weight", "bias"] if affine else []) + (
        ["running_mean", "running_var", "num_batches_tracked"] if track else [])
    assert list(sd) == expected
    if track:
        assert sd["num_batches_tracked"].dtype == np.int64 and sd["num_batches_tracked"] == 3
    fresh = fo.BatchNorm(4, affine=affine, track_running_stats=track)
    fresh.load_state_dict(sd)
    for k, v in fresh.state_dict().items():
        np.testing.assert_array_equal(v, sd[k])
    assert fresh.num_batches_tracked == bn.num_batches_tracked


def test_state_dict_moves_to_and_from_torch(torch):
    tbn = torch.nn.BatchNorm2d(3)
    with torch.no_grad():
        tbn.weight.uniform_(0.5, 1.5), tbn.bias.uniform_(-1, 1)
    tbn(torch.randn(4, 3, 5, 5))
    tbn(torch.randn(4, 3, 5, 5))
    bn = fo.BatchNorm(3)
    bn.load_state_dict(tbn.state_dict())          # tensors as they are
    for k, v in tbn.state_dict().items():
        np.testing.assert_array_equal(bn.state_dict()[k], v.numpy())
    assert bn.num_batches_tracked == 2
    bn.forward(make((4, 3, 5, 5), np.float32, 1))
    tbn2 = torch.nn.BatchNorm2d(3)
    tbn2.load_state_dict({k: torch.from_numpy(v) for k, v in bn.state_dict().items()})
    assert int(tbn2.num_batches_tracked) == 3


def test_bad_state_dict_is_refused_whole():
    bn = fo.BatchNorm(3)
    bn.forward(make((8, 3), np.float32, 0))
    before = bn.state_dict()
    bad = [({k: v for k, v in before.items() if k != "bias"}, ValueError, "missing"),
           (dict(before, extra=np.zeros(3)), ValueError, "unexpected"),
           (dict(before, running_var=np.ones(4, np.float32)), ValueError, "shape"),
           (dict(before, running_mean=np.zeros(3)), TypeError, "dtype"),
           (None, TypeError, "mapping")]
    for sd, exc, msg in bad:
        if sd is not None:
            sd = dict(sd, weight=np.full(3, 7.0, np.float32))   # would be written first
        with pytest.raises(exc, match=msg):
            bn.load_state_dict(sd)
        for k, v in bn.state_dict().items():
            np.testing.assert_array_equal(v, before[k])


def test_capped_partial_sums_still_match_the_formula():
    # (256, 16384) would take 64 units of 2*16384 partial sums; the cap (8 MB)
    # makes that 32 units of more rows each: same statistics, to rounding
    x = make((256, 16384), np.float32, 7, 3.0, 0.5)
    rm, rv = np.zeros(16384, np.float32), np.ones(16384, np.float32)
    y, sm, si = F.batch_norm_forward(x, rm, rv, training=True)
    xd = x.astype(np.float64)
    mean, var = xd.mean(0), xd.var(0)
    np.testing.assert_allclose(sm, mean, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(si, 1 / np.sqrt(var + 1e-5), rtol=1e-5)
    np.testing.assert_allclose(y, (xd - mean) / np.sqrt(var + 1e-5), rtol=1e-4, atol=1e-4)


# ------------------------------------------------- bad input: audit 3's defects

@pytest.mark.parametrize("attr,value,exc,msg", [
    ("channels_last", "no", TypeError, "channels_last must be a bool"),
    ("channels_last", 0, TypeError, "channels_last must be a bool"),
    ("track_running_stats", "no", TypeError, "track_running_stats must be a bool")])
def test_edited_flags_are_checked_at_forward(attr, value, exc, msg):
    """bn.channels_last = "no" was taken as True (normalizing over the last
    axis), as bn.training = "no" already was not."""
    bn = fo.BatchNorm(3)
    x = make((4, 3, 3), np.float32, 0)
    bn.forward(x)
    setattr(bn, attr, value)
    state, ctx = _bn_state(bn), bn._ctx
    out = np.full_like(x, 7.0)
    with pytest.raises(exc, match=f"^{msg}"):
        bn.forward(x, out=out)
    assert (out == 7.0).all()
    _assert_bn_unchanged(bn, state)
    assert bn._ctx is ctx


def test_track_running_stats_cannot_be_turned_on_later():
    """Turning it on for a layer built without running statistics failed
    after y was written (None has no num_batches_tracked to count)."""
    bn = fo.BatchNorm(3, track_running_stats=False)
    bn.track_running_stats = True
    x, out = make((4, 3), np.float32, 0), np.full((4, 3), 7.0, np.float32)
    with pytest.raises(ValueError, match="^track_running_stats cannot be turned on"):
        bn.forward(x, out=out)
    assert (out == 7.0).all() and bn._ctx is None


def test_backward_takes_the_layout_of_its_forward():
    """channels_last edited between forward and backward: backward uses the
    forward's layout, as the saved statistics do."""
    x, dy = make((4, 3, 3), np.float32, 0), make((4, 3, 3), np.float32, 1)
    bn, ref = fo.BatchNorm(3), fo.BatchNorm(3)
    bn.forward(x)
    ref.forward(x)
    bn.channels_last = True
    np.testing.assert_array_equal(bn.backward(dy), ref.backward(dy))
    np.testing.assert_array_equal(bn.grad_weight, ref.grad_weight)


def test_num_batches_tracked_is_checked_when_loaded_and_cannot_wrap():
    """load_state_dict took a negative count (then ZeroDivisionError with
    momentum=None); 2**63 - 1 wrapped to -2**63 at the next training forward;
    the setter raised OverflowError for 2**64."""
    x = make((4, 3), np.float32, 0)
    bn = fo.BatchNorm(3, momentum=None)
    bn.forward(x)
    before = bn.state_dict()
    for bad in (-1, np.iinfo(np.int64).min):
        with pytest.raises(ValueError, match=r"^state_dict\['num_batches_tracked'\] must be"):
            bn.load_state_dict(dict(before, num_batches_tracked=np.array(bad, np.int64),
                                    weight=np.full(3, 7.0, np.float32)))
        for k, v in bn.state_dict().items():
            np.testing.assert_array_equal(v, before[k])
    for bad in (-1, 2 ** 63, 2 ** 64, 1.0, True):
        with pytest.raises(ValueError, match="^num_batches_tracked must be"):
            bn.num_batches_tracked = bad
    assert bn.num_batches_tracked == 1
    bn.load_state_dict(dict(before, num_batches_tracked=np.array(2 ** 63 - 1)))
    state, out = _bn_state(bn), np.full_like(x, 7.0)
    with pytest.raises(ValueError, match="^num_batches_tracked is 9223372036854775807"):
        bn.forward(x, out=out)                   # would count past int64
    assert (out == 7.0).all()
    _assert_bn_unchanged(bn, state)
    bn.eval().forward(x)                         # eval counts nothing: still fine
    bn.train().num_batches_tracked = 0
    bn.forward(x)
    assert bn.num_batches_tracked == 1


def test_scratch_kept_between_calls_and_threads():
    """Each calling thread keeps a scratch block between calls (src_c/parallel.c):
    calls whose scratch shrinks and grows, made from several Python threads at
    once (the kernels release the GIL), agree with the float64 reference and
    give bitwise what the same call gives alone."""
    import threading
    shapes = [(256, 1024), (4, 7), (32, 64, 9, 9), (64, 300), (8, 16, 5, 5), (2, 3)]

    def train_step(shape, seed):
        x, dy = make(shape, np.float32, seed), make(shape, np.float32, seed + 1)
        w, b = make((shape[1],), np.float32, seed + 2), make((shape[1],), np.float32, seed + 3)
        y, mean, invstd = F.batch_norm_forward(x, None, None, w, b, training=True)
        dx, dw, db = F.batch_norm_backward(dy, x, mean, invstd, w, training=True)
        return x, dy, w, b, y, dx, dw, db

    alone = [train_step(s, 10 * i) for i, s in enumerate(shapes)]
    for (x, dy, w, b, y, dx, dw, db), shape in zip(alone, shapes):
        ry, _, _ = ref_forward(x, w, b, None, None, True, 0.1, 1e-5, False)
        axes = reduce_axes(x, False)
        rdx, rdw, rdb = ref_backward(dy, x, w, x.astype(np.float64).mean(axes),
                                     x.astype(np.float64).var(axes), 1e-5, True, False)
        np.testing.assert_allclose(y, ry, rtol=1e-4, atol=1e-4, err_msg=str(shape))
        np.testing.assert_allclose(dx, rdx, rtol=1e-3, atol=1e-4, err_msg=str(shape))
        np.testing.assert_allclose(dw, rdw, rtol=1e-3, atol=1e-3, err_msg=str(shape))
    results, errors = {}, []

    def worker(t):
        try:
            for rep in range(3):
                order = list(range(len(shapes)))[::1 if (t + rep) % 2 else -1]
                for i in order:
                    results[(t, rep, i)] = train_step(shapes[i], 10 * i)
        except Exception as e:   # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    assert len(results) == 4 * 3 * len(shapes)
    for (t, rep, i), got in results.items():
        for a, b in zip(got[4:], alone[i][4:]):
            np.testing.assert_array_equal(a, b, err_msg=f"thread {t} round {rep} {shapes[i]}")
