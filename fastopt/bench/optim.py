"""Optimizer cases: one step of each optimizer, fastopt against NumPy (naive:
the formula as one would first write it, with temporaries; careful: in-place
ufuncs with out= into preallocated scratch) and torch.optim (fused=True where
torch has it, else the single-tensor loop; foreach=True as torch-foreach)."""
import numpy as np

import fastopt as fo

from . import Case, register, torch_or_none

SIZES = [10_000, 1_000_000, 16_000_000, "model150"]
QUICK = [10_000, 1_000_000, "model150"]


def model_shapes():
    """~150 tensors of mixed sizes totalling ~1e7 elements: 25 blocks of
    (256x768, 768, 768x256, 256, 256, 256), as in a small transformer MLP stack."""
    block = [(256, 768), (768,), (768, 256), (256,), (256,), (256,)]
    return block * 25


MODEL_TOTAL = sum(int(np.prod(s)) for s in model_shapes())


def _shapes(size):
    return model_shapes() if size == "model150" else [(size,)]


def _arrays(size, dtype, seed):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(dtype) for s in _shapes(size)]


def _torch_case(name, params, grads, **kw):
    """Named torch steppers: fused (or the single-tensor loop where torch has no
    fused kernel) as 'torch', foreach as 'torch_foreach'."""
    torch = torch_or_none()
    if torch is None:
        return {}
    cls = getattr(torch.optim, name)
    fns = {}
    variants = {"torch": {"fused": True} if name != "RMSprop" else {"foreach": False},
                "torch_foreach": {"foreach": True}}
    for key, extra in variants.items():
        tp = [torch.tensor(p).requires_grad_() for p in params]
        for t, g in zip(tp, grads):
            t.grad = torch.tensor(g)
        opt = cls(tp, **kw, **extra)
        fns[key] = opt.step
    return fns


def _bytes(size, dtype, narrays):
    n = MODEL_TOTAL if size == "model150" else size
    return n * np.dtype(dtype).itemsize * narrays


def _setup(size, dtype, cls, **kw):
    """params, grads, a fastopt optimizer over copies of params, and a second
    copy of params for the NumPy versions to update."""
    params, grads = _arrays(size, dtype, 0), _arrays(size, dtype, 1)
    opt = cls([p.copy() for p in params], **kw)
    return params, grads, opt, [p.copy() for p in params]


def _case(size, dtype, narrays, opt, grads, numpy_naive, numpy_careful, torch_name,
          params, **kw):
    fns = {"fastopt": lambda: opt.step(grads), "numpy": numpy_naive,
           "numpy_careful": numpy_careful}
    fns.update(_torch_case(torch_name, params, grads, **kw))
    return Case(fns, _bytes(size, dtype, narrays))


@register("optim", "adam", SIZES + [MODEL_TOTAL], QUICK)
def adam(size, dtype):
    lr, b1, b2, eps = 1e-3, 0.9, 0.999, 1e-8
    params, grads, opt, np_p = _setup(size, dtype, fo.Adam, lr=lr, betas=(b1, b2), eps=eps)
    m = [np.zeros_like(p) for p in params]
    v = [np.zeros_like(p) for p in params]
    tmp = [np.empty_like(p) for p in params]
    state = {"t": 0}

    def numpy_naive():
        state["t"] += 1
        t = state["t"]
        for i, (p, g) in enumerate(zip(np_p, grads)):
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            mhat = m[i] / (1 - b1 ** t)
            vhat = v[i] / (1 - b2 ** t)
            p -= lr * mhat / (np.sqrt(vhat) + eps)

    def numpy_careful():
        state["t"] += 1
        t = state["t"]
        c1, c2 = lr / (1 - b1 ** t), 1 / np.sqrt(1 - b2 ** t)
        for p, g, mi, vi, w in zip(np_p, grads, m, v, tmp):
            mi *= b1
            np.multiply(g, 1 - b1, out=w)
            mi += w
            vi *= b2
            np.multiply(g, g, out=w)
            w *= 1 - b2
            vi += w
            np.sqrt(vi, out=w)
            w *= c2
            w += eps
            np.divide(mi, w, out=w)
            w *= c1
            p -= w

    case = _case(size, dtype, 7, opt, grads, numpy_naive, numpy_careful, "Adam", params,
                 lr=lr, betas=(b1, b2), eps=eps)
    if size == "model150":
        # the same optimizer on one flat array of the model's total size, timed
        # in the same rounds: the cost of splitting the work into 150 tensors
        flat_p, flat_g = _arrays(MODEL_TOTAL, dtype, 0), _arrays(MODEL_TOTAL, dtype, 1)
        flat = fo.Adam(flat_p, lr=lr, betas=(b1, b2), eps=eps)
        case.fns["fastopt_flat"] = lambda: flat.step(flat_g)
    return case


@register("optim", "sgd-momentum", SIZES, QUICK)
def sgd_momentum(size, dtype):
    lr, mom = 1e-3, 0.9
    params, grads, opt, np_p = _setup(size, dtype, fo.SGD, lr=lr, momentum=mom)
    b = [g.copy() for g in grads]

    def numpy_naive():
        for i, (p, g) in enumerate(zip(np_p, grads)):
            b[i] = mom * b[i] + g
            p -= lr * b[i]

    def numpy_careful():
        for p, g, bi in zip(np_p, grads, b):
            bi *= mom
            bi += g
            p -= lr * bi     # one temporary: there is no fused axpy ufunc

    return _case(size, dtype, 5, opt, grads, numpy_naive, numpy_careful, "SGD", params,
                 lr=lr, momentum=mom)


def _careful_rms_update(p, g, s, w, lr, eps):
    """p -= lr*g/(sqrt(s)+eps) in place, w as scratch (Adagrad's and RMSprop's tail)."""
    np.sqrt(s, out=w)
    w += eps
    np.divide(g, w, out=w)
    w *= lr
    p -= w


@register("optim", "adagrad", SIZES, QUICK)
def adagrad(size, dtype):
    lr, eps = 1e-2, 1e-10
    params, grads, opt, np_p = _setup(size, dtype, fo.Adagrad, lr=lr, eps=eps)
    s = [np.zeros_like(p) for p in params]
    tmp = [np.empty_like(p) for p in params]

    def numpy_naive():
        for i, (p, g) in enumerate(zip(np_p, grads)):
            s[i] = s[i] + g * g
            p -= lr * g / (np.sqrt(s[i]) + eps)

    def numpy_careful():
        for p, g, si, w in zip(np_p, grads, s, tmp):
            np.multiply(g, g, out=w)
            si += w
            _careful_rms_update(p, g, si, w, lr, eps)

    return _case(size, dtype, 5, opt, grads, numpy_naive, numpy_careful, "Adagrad", params,
                 lr=lr, eps=eps)


@register("optim", "rmsprop", SIZES, QUICK)
def rmsprop(size, dtype):
    lr, alpha, eps = 1e-2, 0.99, 1e-8
    params, grads, opt, np_p = _setup(size, dtype, fo.RMSprop, lr=lr, alpha=alpha, eps=eps)
    s = [np.zeros_like(p) for p in params]
    tmp = [np.empty_like(p) for p in params]

    def numpy_naive():
        for i, (p, g) in enumerate(zip(np_p, grads)):
            s[i] = alpha * s[i] + (1 - alpha) * g * g
            p -= lr * g / (np.sqrt(s[i]) + eps)

    def numpy_careful():
        for p, g, si, w in zip(np_p, grads, s, tmp):
            si *= alpha
            np.multiply(g, g, out=w)
            w *= 1 - alpha
            si += w
            _careful_rms_update(p, g, si, w, lr, eps)

    return _case(size, dtype, 5, opt, grads, numpy_naive, numpy_careful, "RMSprop", params,
                 lr=lr, alpha=alpha, eps=eps)
