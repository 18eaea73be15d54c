"""Optimizers against the formulas of DESIGN.md written here in NumPy, and
against torch.optim (foreach=False) where torch is installed: many steps,
float32 and float64, odd sizes, several tensors, two param groups, lr changed
mid-run, state_dict round trips, thread-count determinism, bad input."""
import numpy as np
import pytest

import fastopt as fo
from conftest import DTYPES, RTOL, require_torch

ATOL = {np.float32: 1e-6, np.float64: 1e-13}
SHAPES = [(0,), (1,), (7,), (1023,), (3, 5, 2)]
BIG = 2 ** 20 + 3
STEPS = 50


# ---------------------------------------------------------------- references
# One step of each optimizer on one array, straight from the formulas; `st` is
# the param's state dict, `t` the 1-based step. Scalars are Python floats, so
# NumPy computes in the array's dtype.

def _pre(p, g, h):
    g = -g if h.get("maximize") else g.copy()
    if h.get("weight_decay") and not h.get("_decoupled"):
        g = g + h["weight_decay"] * p
    if h.get("l1") and not h.get("_decoupled"):
        g = g + h["l1"] * np.sign(p)
    return g


def ref_sgd(p, g, st, t, h):
    g = _pre(p, g, h)
    mom, damp = h.get("momentum", 0.0), h.get("dampening", 0.0)
    if mom:
        b = g.copy() if "b" not in st else mom * st["b"] + (1 - damp) * g
        st["b"] = b
        g = g + mom * b if h.get("nesterov") else b
    p -= h["lr"] * g


def ref_adagrad(p, g, st, t, h):
    g = _pre(p, g, h)
    clr = h["lr"] / (1 + (t - 1) * h.get("lr_decay", 0.0))
    st.setdefault("s", np.full_like(p, h.get("initial_accumulator_value", 0.0)))
    st["s"] = st["s"] + g * g
    p -= clr * g / (np.sqrt(st["s"]) + h.get("eps", 1e-10))


def ref_rmsprop(p, g, st, t, h):
    g = _pre(p, g, h)
    a, eps, mom = h.get("alpha", 0.99), h.get("eps", 1e-8), h.get("momentum", 0.0)
    st["s"] = a * st.get("s", np.zeros_like(p)) + (1 - a) * g * g
    if h.get("centered"):
        st["ga"] = a * st.get("ga", np.zeros_like(p)) + (1 - a) * g
        avg = np.sqrt(st["s"] - st["ga"] * st["ga"]) + eps
    else:
        avg = np.sqrt(st["s"]) + eps
    if mom > 0:
        st["b"] = mom * st.get("b", np.zeros_like(p)) + g / avg
        p -= h["lr"] * (g / avg + mom * st["b"] if h.get("nesterov") else st["b"])
    else:
        p -= h["lr"] * g / avg


def ref_adam(p, g, st, t, h):
    b1, b2 = h.get("betas", (0.9, 0.999))
    lr, eps = h["lr"], h.get("eps", 1e-8)
    if h.get("_decoupled"):
        p[...] = p * (1 - lr * h.get("weight_decay", 1e-2)) - lr * h.get("l1", 0.0) * np.sign(p)
    g = _pre(p, g, h) if not h.get("_decoupled") else (-g if h.get("maximize") else g)
    st["m"] = b1 * st.get("m", np.zeros_like(p)) + (1 - b1) * g
    st["v"] = b2 * st.get("v", np.zeros_like(p)) + (1 - b2) * g * g
    v = st["v"]
    if h.get("amsgrad"):
        st["vmax"] = v = np.maximum(st.get("vmax", np.zeros_like(p)), v)
    denom = np.sqrt(v) / np.sqrt(1 - b2 ** t) + eps
    p -= lr / (1 - b1 ** t) * st["m"] / denom


def ref_adamw(p, g, st, t, h):
    ref_adam(p, g, st, t, dict(h, _decoupled=True))


CONFIGS = {
    "SGD": (ref_sgd, [
        dict(lr=0.05), dict(lr=0.05, momentum=0.9), dict(lr=0.05, momentum=0.9, dampening=0.3),
        dict(lr=0.05, momentum=0.9, nesterov=True), dict(lr=0.05, weight_decay=0.1),
        dict(lr=0.05, momentum=0.5, maximize=True), dict(lr=0.05, momentum=0.9, l1=0.01),
        # maximize negates g before weight decay is added (torch's order)
        dict(lr=0.05, momentum=0.5, maximize=True, weight_decay=0.1)]),
    "Adagrad": (ref_adagrad, [
        dict(lr=0.05), dict(lr=0.05, lr_decay=0.01), dict(lr=0.05, weight_decay=0.1),
        dict(lr=0.05, initial_accumulator_value=0.1, eps=1e-6), dict(lr=0.05, maximize=True),
        dict(lr=0.05, l1=0.01), dict(lr=0.05, maximize=True, weight_decay=0.1)]),
    "RMSprop": (ref_rmsprop, [
        dict(lr=0.01), dict(lr=0.01, centered=True), dict(lr=0.01, momentum=0.9),
        dict(lr=0.01, centered=True, momentum=0.5, alpha=0.9), dict(lr=0.01, weight_decay=0.1),
        dict(lr=0.01, maximize=True, eps=1e-6), dict(lr=0.01, momentum=0.9, nesterov=True),
        dict(lr=0.01, centered=True, momentum=0.9, nesterov=True, l1=0.01),
        dict(lr=0.01, maximize=True, weight_decay=0.1),
        dict(lr=0.01, centered=True, alpha=0.3)]),   # lerp weight >= 0.5: from the far end
    "Adam": (ref_adam, [
        dict(lr=0.01), dict(lr=0.01, amsgrad=True), dict(lr=0.01, weight_decay=0.1),
        dict(lr=0.01, betas=(0.8, 0.99), eps=1e-6, maximize=True),
        dict(lr=0.01, l1=0.01, amsgrad=True), dict(lr=0.01, maximize=True, weight_decay=0.1),
        dict(lr=0.01, betas=(0.2, 0.9))]),
    "AdamW": (ref_adamw, [
        dict(lr=0.01), dict(lr=0.01, amsgrad=True), dict(lr=0.01, weight_decay=0.1),
        dict(lr=0.01, maximize=True), dict(lr=0.01, l1=0.01),
        dict(lr=0.01, maximize=True, weight_decay=0.1)]),
}
CASES = [(name, i) for name, (_, cfgs) in CONFIGS.items() for i in range(len(cfgs))]
TORCH_LACKS = {"l1", "nesterov"}   # fastopt-only options (nesterov: RMSprop only)
# nesterov is torch's too for SGD; l1 and RMSprop's nesterov only the formula checks
TORCH_CASES = [(n, i) for n, i in CASES
               if not (TORCH_LACKS & set(CONFIGS[n][1][i])) or
               (n == "SGD" and "l1" not in CONFIGS[n][1][i])]


def _case_id(c):
    name, i = c
    return f"{name}-{'-'.join(f'{k}={v}' for k, v in CONFIGS[name][1][i].items())}"


def grad_at(step, shape, dtype, k=0):
    """The gradient fed at a given step: deterministic, so every optimizer run
    (fastopt, reference, torch) sees the same sequence."""
    rng = np.random.default_rng(1000 * step + k)
    return rng.standard_normal(shape).astype(dtype)


def init_params(shapes, dtype, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(dtype) for s in shapes]


def split_groups(name, cfg, shapes):
    """Two param groups: the config, and the config with a different lr (and a
    different first hyperparameter where that is meaningful)."""
    g2 = dict(cfg, lr=cfg["lr"] * 0.5)
    half = len(shapes) // 2
    return [(cfg, list(range(half))), (g2, list(range(half, len(shapes))))]


def run_reference(ref, groups, params, steps, dtype, lr_change_at=None):
    states = [{} for _ in params]
    for t in range(1, steps + 1):
        for h, idx in groups:
            for i in idx:
                lr_scale = 0.3 if lr_change_at is not None and t > lr_change_at and idx[0] == 0 else 1.0
                ref(params[i], grad_at(t, params[i].shape, dtype, i), states[i], t,
                    dict(h, lr=h["lr"] * lr_scale))
    return params


def run_fastopt(name, groups, params, steps, dtype, lr_change_at=None, opt=None, start=1):
    cls = getattr(fo, name)
    if opt is None:
        opt = cls([{"params": [params[i] for i in idx], **h} for h, idx in groups])
    for t in range(start, steps + 1):
        if lr_change_at is not None and t == lr_change_at + 1:
            opt.param_groups[0]["lr"] *= 0.3
        opt.step([grad_at(t, p.shape, dtype, i) for i, p in enumerate(params)])
    return opt


def run_torch(torch, name, groups, params, steps, dtype, lr_change_at=None):
    tp = [torch.tensor(p) for p in params]
    # torch fills Adagrad's 'sum' from the constructor's initial_accumulator_value
    # for every group (fastopt honours a per-group value); both groups use one here
    init = {k: v for k, v in groups[0][0].items() if k == "initial_accumulator_value"}
    opt = getattr(torch.optim, name)(
        [{"params": [tp[i] for i in idx], **h} for h, idx in groups], foreach=False, **init)
    for t in range(1, steps + 1):
        if lr_change_at is not None and t == lr_change_at + 1:
            opt.param_groups[0]["lr"] *= 0.3
        for i, p in enumerate(tp):
            p.grad = torch.tensor(grad_at(t, p.shape, dtype, i))
        opt.step()
    return [p.numpy() for p in tp]


def assert_close(a, b, dtype):
    for x, y in zip(a, b):
        np.testing.assert_allclose(x, y, rtol=RTOL[dtype] * 10, atol=ATOL[dtype])


# ---------------------------------------------------------------- parity

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_matches_formula(case, dtype):
    name, i = case
    ref, cfgs = CONFIGS[name]
    cfg = cfgs[i]
    groups = split_groups(name, cfg, SHAPES)
    p_fo = init_params(SHAPES, dtype)
    p_ref = init_params(SHAPES, dtype)
    ids = [id(p) for p in p_fo]
    run_fastopt(name, groups, p_fo, STEPS, dtype, lr_change_at=25)
    run_reference(ref, groups, p_ref, STEPS, dtype, lr_change_at=25)
    assert [id(p) for p in p_fo] == ids
    assert all(p.dtype == dtype for p in p_fo)
    assert_close(p_fo, p_ref, dtype)
    assert not np.allclose(p_fo[3], init_params(SHAPES, dtype)[3])   # it did move


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", TORCH_CASES, ids=_case_id)
def test_matches_torch(case, dtype):
    torch = require_torch()
    name, i = case
    cfg = CONFIGS[name][1][i]
    groups = split_groups(name, cfg, SHAPES)
    p_fo = init_params(SHAPES, dtype)
    run_fastopt(name, groups, p_fo, STEPS, dtype, lr_change_at=25)
    p_t = run_torch(torch, name, groups, init_params(SHAPES, dtype), STEPS, dtype, lr_change_at=25)
    assert_close(p_fo, p_t, dtype)


BIG_CASES = [("SGD", 1), ("Adagrad", 0), ("RMSprop", 3), ("Adam", 1), ("AdamW", 0)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", BIG_CASES, ids=_case_id)
def test_large_array(case, dtype):
    """2^20+3 elements (the threaded path, and a tail that is no vector multiple)."""
    name, i = case
    ref, cfgs = CONFIGS[name]
    groups = [(cfgs[i], [0])]
    steps = 12
    p_fo, p_ref = init_params([(BIG,)], dtype), init_params([(BIG,)], dtype)
    run_fastopt(name, groups, p_fo, steps, dtype)
    run_reference(ref, groups, p_ref, steps, dtype)
    assert_close(p_fo, p_ref, dtype)
    torch = require_torch()
    if (name, i) in TORCH_CASES:
        p_t = run_torch(torch, name, groups, init_params([(BIG,)], dtype), steps, dtype)
        assert_close(p_fo, p_t, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name,kw,key", [
    ("Adam", dict(betas=(0.0, 0.5)), "exp_avg"), ("AdamW", dict(betas=(0.0, 0.5)), "exp_avg"),
    ("RMSprop", dict(alpha=0.0, centered=True), "grad_avg")])
def test_no_averaging_keeps_exactly_the_last_gradient(name, kw, key, dtype):
    """beta1 = 0 (alpha = 0): the average is the gradient itself. Computed as
    m + 1*(g - m), a small g after a large one came out 0 and the update was
    lost; torch's lerp takes g + (w - 1)*(g - m) for a weight w >= 0.5."""
    p = np.zeros(3, dtype)
    opt = getattr(fo, name)([p], lr=1.0, **kw)
    last = np.array([1e-9, 3.0, 0.5], dtype)
    for g in (np.array([1.0, 1e20, -1.0], dtype), last):
        opt.step([g])
    np.testing.assert_array_equal(opt.state_dict()["state"][0][key], last)


# ------------------------------------------------------- lecture algorithms

@pytest.mark.parametrize("dtype", DTYPES)
def test_sgd_nesterov_is_lecture_lookahead(dtype):
    """Lecture's Nesterov: v <- a*v - lr*grad(theta + a*v); theta <- theta + v.
    SGD(nesterov=True) stores p at the look-ahead point theta + a*v."""
    A = np.array([1.0, 4.0, 10.0, 0.5], dtype)   # f(x) = 0.5 * sum(A * x^2)
    a, lr = 0.9, 0.05
    theta = np.array([1.0, -2.0, 0.5, 3.0], dtype)
    v = np.zeros_like(theta)
    p = theta.copy()
    opt = fo.SGD([p], lr=lr, momentum=a, nesterov=True)
    for _ in range(100):
        v = a * v - lr * (A * (theta + a * v))
        theta = theta + v
        opt.step([A * p])
        np.testing.assert_allclose(p, theta + a * v, rtol=RTOL[dtype] * 100, atol=ATOL[dtype] * 10)
    assert np.abs(theta).max() < 1e-2   # and it converged


# ---------------------------------------------------------- state_dict

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_state_dict_round_trip_is_exact(case, dtype):
    name, i = case
    cfg = CONFIGS[name][1][i]
    groups = split_groups(name, cfg, SHAPES)
    full = init_params(SHAPES, dtype)
    run_fastopt(name, groups, full, STEPS, dtype)

    part = init_params(SHAPES, dtype)
    opt = run_fastopt(name, groups, part, 10, dtype)
    sd = opt.state_dict()
    resumed = [p.copy() for p in part]
    opt2 = getattr(fo, name)([{"params": [resumed[j] for j in idx], **h} for h, idx in groups])
    opt2.load_state_dict(sd)
    assert opt2.state_dict()["param_groups"] == sd["param_groups"]
    run_fastopt(name, groups, resumed, STEPS, dtype, opt=opt2, start=11)
    for x, y in zip(resumed, full):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("how", ["pickle", "deepcopy"])
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_pickled_or_deep_copied_optimizer_continues_exactly_and_alone(case, how):
    """An optimizer copied after 10 steps (pickle, copy.deepcopy: params and
    state copied, as torch's) continues the uninterrupted trajectory on its own
    copies of the params, which are the arrays in its param_groups, and leaves
    the original's params alone."""
    import copy
    import pickle
    name, i = case
    dtype = np.float32
    groups = split_groups(name, CONFIGS[name][1][i], SHAPES)
    full = init_params(SHAPES, dtype)
    run_fastopt(name, groups, full, STEPS, dtype)

    part = init_params(SHAPES, dtype)
    opt = run_fastopt(name, groups, part, 10, dtype)
    at10 = [p.copy() for p in part]
    clone = pickle.loads(pickle.dumps(opt)) if how == "pickle" else copy.deepcopy(opt)
    mine = [p for g in clone.param_groups for p in g["params"]]
    # split_groups numbers params in order, so the groups' params are `part` in order
    assert not any(np.shares_memory(a, b) for a in mine for b in part)
    run_fastopt(name, groups, mine, STEPS, dtype, opt=clone, start=11)
    for x, y in zip(mine, full):
        np.testing.assert_array_equal(x, y)
    for x, y in zip(part, at10):
        np.testing.assert_array_equal(x, y)


def test_state_arrays_are_separate_aligned_and_initialized():
    """State lives in one buffer per dtype (huge pages, one address range):
    every array must still be its param's shape, start on a 64-byte line,
    overlap no other, and hold its initial value; after load_state_dict and
    in a pickled copy too."""
    import pickle
    shapes = [(5,), (3, 2), (0,), (17, 3), (1,)]
    for cls, kw, names, fill in [(fo.Adam, {"amsgrad": True},
                                  ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"), 0.0),
                                 (fo.Adagrad, {"initial_accumulator_value": 0.25}, ("sum",),
                                  0.25)]:
        for dtype in DTYPES:
            p = init_params(shapes, dtype)
            opt = cls(p, **kw)
            opt.step([np.zeros_like(x) for x in p] if cls is fo.Adagrad else
                     [np.ones_like(x) for x in p])
            loaded = cls(init_params(shapes, dtype), **kw)
            loaded.load_state_dict(opt.state_dict())
            for opt_ in (opt, loaded, pickle.loads(pickle.dumps(opt))):
                arrays = [a for n in names for a in opt_._groups[0]["state"][n].arrays]
                for k, a in enumerate(arrays):
                    assert a.shape == shapes[k % len(shapes)] and a.dtype == dtype
                    assert a.size == 0 or a.ctypes.data % 64 == 0
                    assert not any(np.shares_memory(a, b) for b in arrays[k + 1:])
            if cls is fo.Adagrad:   # zero gradients: the accumulator keeps its initial value
                for a in opt._groups[0]["state"]["sum"].arrays:
                    assert np.all(a == dtype(fill))


def test_state_dict_is_a_copy_and_loads_torch_layout(torch):
    p = init_params([(5,), (3, 2)], np.float32)
    opt = fo.Adam(p, lr=0.1, amsgrad=True)
    opt.step([np.ones_like(x) for x in p])
    sd = opt.state_dict()
    assert set(sd["state"][0]) == {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}
    sd["state"][0]["exp_avg"][:] = 123
    assert opt.state_dict()["state"][0]["exp_avg"][0] != 123
    # a torch optimizer's state_dict, converted to NumPy, loads and continues identically
    tp = [torch.tensor(x) for x in init_params([(5,), (3, 2)], np.float32)]
    topt = torch.optim.Adam(tp, lr=0.1, amsgrad=True, foreach=False)
    for x in tp:
        x.grad = torch.ones_like(x)
    topt.step()
    tsd = topt.state_dict()
    conv = {"param_groups": tsd["param_groups"],
            "state": {k: {n: (v.numpy() if hasattr(v, "numpy") else v) for n, v in s.items()}
                      for k, s in tsd["state"].items()}}
    q = [x.detach().numpy().copy() for x in tp]
    opt2 = fo.Adam(q, lr=0.1, amsgrad=True)
    opt2.load_state_dict(conv)
    for x in tp:
        x.grad = torch.full_like(x, 0.5)
    topt.step()
    opt2.step([np.full_like(x, 0.5) for x in q])
    for x, y in zip(q, tp):
        np.testing.assert_allclose(x, y.numpy(), rtol=1e-6)


# ---------------------------------------------------------- threads

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", BIG_CASES, ids=_case_id)
def test_bitwise_identical_across_thread_counts(case, dtype, threads):
    if not fo.has_openmp():
        pytest.skip("built without OpenMP")
    name, i = case
    groups = [(CONFIGS[name][1][i], [0, 1, 2])]
    shapes = [(BIG,), (7,), (100_003,)]
    out = []
    for n in (1, 2):
        fo.set_num_threads(n)
        assert fo.get_num_threads() == n
        p = init_params(shapes, dtype)
        run_fastopt(name, groups, p, 5, dtype)
        out.append(p)
    for x, y in zip(*out):
        np.testing.assert_array_equal(x, y)


_PREFETCH_RUN = """
import sys
import numpy as np
sys.path.insert(0, sys.argv[2])
import test_optim as t
assert t.fo._fastopt._page_prefetch() == (sys.argv[3] == "1")
out = {}
for name, i in t.BIG_CASES:
    for dtype in t.DTYPES:
        p = t.init_params(t.PREFETCH_SHAPES, dtype)
        t.run_fastopt(name, [(t.CONFIGS[name][1][i], [0, 1, 2])], p, 5, dtype)
        for k, x in enumerate(p):
            out[f"{name}{i}-{np.dtype(dtype).name}-{k}"] = x
np.savez(sys.argv[1], **out)
"""
PREFETCH_SHAPES = [(BIG,), (7,), (100_003,)]


def test_page_prefetch_on_or_off_gives_the_same_bits(tmp_path):
    """The loops prefetch one page ahead on Intel CPUs only (fo_prefetch_pages);
    FASTOPT_PAGE_PREFETCH forces it either way, so that both paths run on any
    CPU: the same bits, and the formula's values."""
    import os
    import subprocess
    import sys
    runs = []
    for flag in ("0", "1"):
        f = tmp_path / f"prefetch{flag}.npz"
        env = dict(os.environ, FASTOPT_PAGE_PREFETCH=flag)
        subprocess.run([sys.executable, "-c", _PREFETCH_RUN, str(f), os.path.dirname(__file__), flag],
                       env=env, check=True, timeout=600)
        runs.append(np.load(f))
    for name, i in BIG_CASES:
        for dtype in DTYPES:
            groups = [(CONFIGS[name][1][i], [0, 1, 2])]
            ref = init_params(PREFETCH_SHAPES, dtype)
            run_reference(CONFIGS[name][0], groups, ref, 5, dtype)
            for k, r in enumerate(ref):
                key = f"{name}{i}-{np.dtype(dtype).name}-{k}"
                np.testing.assert_array_equal(runs[0][key], runs[1][key], err_msg=key)
                np.testing.assert_allclose(runs[0][key], r, rtol=RTOL[dtype] * 10,
                                           atol=ATOL[dtype], err_msg=key)


def test_openmp_present_in_ci():
    """The CI build must have OpenMP; a build without it is slow, not wrong."""
    import os
    if os.environ.get("FASTOPT_REQUIRE_OPENMP") == "1":
        assert fo.has_openmp()
    with pytest.raises(ValueError, match=r"n must be in \[1, "):
        fo.set_num_threads(0)


# ---------------------------------------------------------- in place

def test_updates_foreign_buffers_in_place(torch):
    t = torch.zeros(10)
    mv_base = np.zeros(6, np.float64)
    mv = memoryview(mv_base)
    opt = fo.SGD([{"params": [t.numpy()]}, {"params": [mv]}], lr=1.0)  # one dtype per group
    opt.step([np.ones(10, np.float32), np.ones(6)])
    assert torch.equal(t, torch.full((10,), -1.0))
    np.testing.assert_array_equal(mv_base, -1.0)


# ---------------------------------------------------------- bad input

def _snapshot(opt, params):
    arrays = list(params)
    for g in opt._groups:
        for tab in g["state"].values():
            arrays += list(tab.arrays)
    return [(a, a.copy()) for a in arrays]


def _assert_unchanged(snap):
    for a, before in snap:
        np.testing.assert_array_equal(a, before)


def _two_group_opt(name="Adam"):
    p = init_params([(4,), (2, 3), (5,)], np.float32)
    opt = getattr(fo, name)([{"params": p[:2]}, {"params": p[2:], "lr": 0.5}])
    opt.step([np.ones_like(x) for x in p])     # state exists and is non-trivial
    return opt, p


def _unaligned(a):
    """A copy of a whose data starts one byte past an element boundary."""
    buf = np.frombuffer(bytearray(a.nbytes + 1), np.uint8)[1:]
    out = buf.view(a.dtype).reshape(a.shape)
    out[...] = a
    assert not out.flags.aligned
    return out


BAD_GRADS = {
    "dtype": (lambda p: [g.astype(np.float64) for g in p], TypeError, "dtype"),
    "unaligned": (lambda p: [p[0], _unaligned(p[1]), p[2]], ValueError,
                  r"grads\[1\] must be aligned"),
    # the same type in the other byte order: the kernel would read garbage
    "byte-order": (lambda p: [p[0], p[1].astype(p[1].dtype.newbyteorder()), p[2]], TypeError,
                   r"grads\[1\] has dtype >f4"),
    "shape": (lambda p: [p[0], p[1].reshape(3, 2), p[2]], ValueError, "shape"),
    "length": (lambda p: p[:2], ValueError, "expected 3"),
    "contiguity": (lambda p: [p[0], np.ones((3, 2), np.float32).T, p[2]], ValueError,
                   "C-contiguous"),
    # numbered as in the step's list, not within the group
    "last-group": (lambda p: [p[0], p[1], np.ones(4, np.float32)], ValueError, r"grads\[2\]"),
    "aliases-param": ("alias", ValueError, "shares memory"),
    "ragged-list": (lambda p: [p[0], p[1], [1.0, [2.0]]], TypeError, r"grads\[2\]"),
    # the kernel would apply the masked entries too
    "masked": (lambda p: [p[0], np.ma.masked_array(p[1], mask=p[1] > 0), p[2]], TypeError,
               r"grads\[1\] is a masked array"),
    "none": (lambda p: None, TypeError, "grads must be a sequence"),
    # a dict iterated into its keys, which were then read as int arrays
    "dict": (lambda p: dict(enumerate(p)), TypeError, "grads must be a sequence.*dict"),
    "one-array": (lambda p: p[1], TypeError, "grads must be a sequence.*ndarray"),
    # torch would skip that param; fastopt says so instead of 'dtype object'
    "none-entry": (lambda p: [p[0], None, p[2]], TypeError, r"grads\[1\] is None"),
}


@pytest.mark.parametrize("name", ["SGD", "Adagrad", "RMSprop", "Adam", "AdamW"])
@pytest.mark.parametrize("bad", list(BAD_GRADS))
def test_bad_grads_change_nothing(name, bad):
    opt, p = _two_group_opt(name)
    make, exc, msg = BAD_GRADS[bad]
    grads = [np.full_like(x, 0.25) for x in p]
    grads = [grads[0], grads[1], p[2]] if make == "alias" else make(grads)
    snap = _snapshot(opt, p)
    with pytest.raises(exc, match=msg):
        opt.step(grads)
    _assert_unchanged(snap)


@pytest.mark.parametrize("key,value,msg", [
    ("lr", -1.0, "lr"), ("lr", float("nan"), "lr"), ("eps", 0.0, "eps"),
    ("weight_decay", -0.1, "weight_decay"), ("l1", -1.0, "l1"),
    ("betas", (1.0, 0.999), r"betas\[0\]"), ("betas", (0.9, -0.1), r"betas\[1\]"),
    ("lr", "0.1", "lr must be a real number")])
def test_bad_hyperparameter_edited_into_group(key, value, msg):
    opt, p = _two_group_opt("Adam")
    opt.param_groups[1][key] = value
    snap = _snapshot(opt, p)
    with pytest.raises((ValueError, TypeError), match=msg):
        opt.step([np.ones_like(x) for x in p])
    _assert_unchanged(snap)


@pytest.mark.parametrize("cls,kw,msg", [
    (fo.Adam, dict(lr=-1e-3), "lr"), (fo.Adam, dict(betas=(0.9, 1.0)), "betas"),
    (fo.Adam, dict(eps=-1.0), "eps"), (fo.AdamW, dict(weight_decay=-1.0), "weight_decay"),
    (fo.SGD, dict(momentum=-0.1), "momentum"), (fo.SGD, dict(nesterov=True), "nesterov"),
    (fo.SGD, dict(dampening=2.0), "dampening"), (fo.Adagrad, dict(lr_decay=-1.0), "lr_decay"),
    (fo.Adagrad, dict(eps=0.0), "eps"), (fo.RMSprop, dict(alpha=1.5), "alpha"),
    (fo.RMSprop, dict(nesterov=True), "nesterov"), (fo.SGD, dict(l1=float("nan")), "l1"),
    (fo.Adagrad, dict(initial_accumulator_value=-1.0), "initial_accumulator_value")])
def test_bad_hyperparameters_at_construction(cls, kw, msg):
    with pytest.raises(ValueError, match=msg):
        cls([np.zeros(3, np.float32)], **kw)


@pytest.mark.parametrize("name", ["SGD", "Adam"])
def test_grad_aliasing_another_groups_param_is_refused(name):
    # group 0 updates a before group 1 would read it as b's gradient
    a, b = init_params([(4,), (4,)], np.float32)
    opt = getattr(fo, name)([{"params": [a]}, {"params": [b], "lr": 0.5}])
    opt.step([np.ones(4, np.float32), np.ones(4, np.float32)])
    snap = _snapshot(opt, [a, b])
    with pytest.raises(ValueError, match=r"grads\[1\] shares memory with a param"):
        opt.step([np.ones(4, np.float32), a])
    _assert_unchanged(snap)


def test_list_grads_are_read_while_alive():
    # converted grads must outlive the C call (they were once freed before it)
    ps = [np.zeros(64), np.zeros(64), np.zeros(64)]
    fo.SGD(ps, lr=1.0).step([[1.0] * 64, [2.0] * 64, [3.0] * 64])
    for k, p in enumerate(ps):
        np.testing.assert_array_equal(p, -(k + 1.0))


def test_param_made_read_only_later_is_refused():
    opt, p = _two_group_opt("SGD")
    p[2].setflags(write=False)
    snap = _snapshot(opt, p)
    with pytest.raises(ValueError, match=r"params\[2\] has become read-only"):
        opt.step([np.ones_like(x) for x in p])
    _assert_unchanged(snap)


@pytest.mark.parametrize("edit", ["replace", "append", "item"])
def test_editing_a_groups_params_is_refused(edit):
    opt, p = _two_group_opt("SGD")
    q = np.ones(4, np.float32)
    if edit == "replace":
        opt.param_groups[0]["params"] = [q, p[1]]
    elif edit == "append":
        opt.param_groups[0]["params"].append(q)
    else:
        opt.param_groups[0]["params"][0] = q
    snap = _snapshot(opt, p + [q])
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\] was changed"):
        opt.step([np.ones_like(x) for x in p])
    _assert_unchanged(snap)


def test_betas_are_a_tuple_checked_when_replaced():
    opt, p = _two_group_opt("Adam")
    assert opt.param_groups[0]["betas"] == (0.9, 0.999)
    with pytest.raises(TypeError):      # a tuple: no in-place edit behind the check
        opt.param_groups[0]["betas"][1] = float("nan")
    opt.param_groups[0]["betas"] = [0.9, float("nan")]
    snap = _snapshot(opt, p)
    with pytest.raises(ValueError, match=r"betas\[1\]"):
        opt.step([np.ones_like(x) for x in p])
    _assert_unchanged(snap)


@pytest.mark.parametrize("cls,key", [(fo.SGD, "maximize"), (fo.SGD, "nesterov"),
                                     (fo.RMSprop, "centered"), (fo.Adam, "amsgrad")])
def test_flags_must_be_bools(cls, key):
    with pytest.raises(TypeError, match=f"{key} must be a bool"):
        cls([np.zeros(3, np.float32)], momentum=0.9, **{key: "False"}) if cls is fo.SGD \
            else cls([np.zeros(3, np.float32)], **{key: "False"})
    opt = cls([np.zeros(3, np.float32)], **{key: np.bool_(False)})
    assert opt.param_groups[0][key] is False


def test_params_and_threads_types():
    with pytest.raises(TypeError, match="params must be an iterable"):
        fo.SGD(np.zeros((3, 4), np.float32))     # not split into rows
    with pytest.raises(TypeError, match="params must be an iterable"):
        fo.SGD(None)

    class View:    # __array__ gives a view of a fresh copy: not the caller's memory
        data = np.ones(6, np.float32)

        def __array__(self, dtype=None, copy=None):
            return (self.data * 1).reshape(2, 3)
    with pytest.raises(TypeError, match="copied"):
        fo.SGD([View()])
    n = fo.get_num_threads()
    for bad, exc in ((2.5, TypeError), (True, TypeError), (0, ValueError), (2**40, ValueError)):
        with pytest.raises(exc, match="n must"):
            fo.set_num_threads(bad)
    assert fo.get_num_threads() == n


def test_binding_refuses_missing_or_mismatched_tables():
    # the raw binding trusts nothing that would make C read or write out of bounds
    from fastopt import _fastopt as F
    p = F.TensorTable([np.ones(100, np.float32)], "params")
    g = F.check_grads(p, [np.ones(100, np.float32)])
    small = F.TensorTable([np.ones(4, np.float32)], "sum")
    other = F.check_grads(F.TensorTable([np.ones(4, np.float32)], "params"),
                          [np.ones(4, np.float32)])
    with pytest.raises(ValueError, match=r"state_sum\[0\] has 4 elements"):
        F.adagrad_step(p, g, small, 0.1, 0, 0, 1e-10, 0, False, 1)
    with pytest.raises(ValueError, match="exp_avg is required"):
        F.adam_step(p, g, None, None, None, 0.1, 0.9, 0.999, 1e-8, 0, 0, False, False, False, 1)
    with pytest.raises(ValueError, match="momentum_buffer is required"):
        F.sgd_step(p, g, None, 0.1, 0.9, 0, 0, 0, False, False, True)
    with pytest.raises(ValueError, match="check_grads"):
        F.sgd_step(p, None, None, 0.1, 0, 0, 0, 0, False, False, False)
    with pytest.raises(ValueError, match="check_grads"):
        F.sgd_step(p, other, None, 0.1, 0, 0, 0, 0, False, False, False)
    np.testing.assert_array_equal(p.arrays[0], 1.0)


def test_param_changed_in_place_after_it_was_added_is_refused():
    # its table holds the pointer, element count and dtype it was added with
    for change in ("dtype", "byte order"):
        opt, p = _two_group_opt("SGD")
        if change == "dtype":
            p[0].dtype = np.float64           # the same 16 bytes, now 2 float64s
            grads = [np.ones(2), np.ones((2, 3), np.float32), np.ones(5, np.float32)]
        else:
            p[0].dtype = p[0].dtype.newbyteorder()
            grads = [np.ones(4, np.float32), np.ones((2, 3), np.float32),
                     np.ones(5, np.float32)]
        snap = _snapshot(opt, p)
        with pytest.raises((TypeError, ValueError), match=r"grads\[0\]|params\[0\]"):
            opt.step(grads)
        _assert_unchanged(snap)


def test_huge_int_hyperparameters_are_named():
    p = np.ones(3, np.float32)
    for kw, name in ((dict(lr=10**400), "lr"), (dict(momentum=10**400), "momentum")):
        with pytest.raises(ValueError, match=f"{name} is beyond float64's range"):
            fo.SGD([p], **kw)
    with pytest.raises(ValueError, match=r"betas\[0\]|betas"):
        fo.Adam([p], betas=(10**400, 0.9))
    opt = fo.Adam([p])
    opt.param_groups[0]["lr"] = 10**400
    with pytest.raises(ValueError, match="lr is beyond"):
        opt.step([np.ones(3, np.float32)])
    np.testing.assert_array_equal(p, 1.0)


def test_one_array_is_not_a_list_of_params():
    with pytest.raises(TypeError, match="iterable of arrays"):
        fo.SGD(memoryview(np.ones(3, np.float32)))


def test_one_tensor_is_not_a_list_of_params(torch):
    # iterated, a (2, 3) tensor would be two (3,) params (torch.optim refuses it too)
    with pytest.raises(TypeError, match="iterable of arrays"):
        fo.SGD(torch.ones(2, 3))


def test_a_group_of_one_tensor_or_buffer_is_one_param(torch):
    """torch wraps a group's single tensor as [tensor]; iterated, a (2, 3)
    tensor would have been two params of shape (3,)."""
    t = torch.zeros(2, 3, dtype=torch.float64)
    buf = np.zeros(4)
    opt = fo.SGD([{"params": t}, {"params": memoryview(buf), "lr": 0.5}], lr=1.0)
    assert [len(g["params"]) for g in opt.param_groups] == [1, 1]
    opt.step([np.ones((2, 3)), np.ones(4)])
    np.testing.assert_array_equal(t.numpy(), -np.ones((2, 3)))   # updated in place
    np.testing.assert_array_equal(buf, np.full(4, -0.5))
    for bad in ("abc", {1: np.ones(3)}, {np.ones(3).tobytes()}, 3.0):
        with pytest.raises(TypeError, match=r"param_group\['params'\] must be an array"):
            fo.SGD([{"params": bad}])


@pytest.mark.parametrize("edit", ["pop", "pop0", "clear", "tuple"])
def test_removing_a_param_group_is_refused(edit):
    """Popping the last group once made step() ignore it silently (and still
    ask for its grads); groups are added, never removed."""
    opt, p = _two_group_opt("SGD")
    if edit == "pop":
        opt.param_groups.pop()
    elif edit == "pop0":
        opt.param_groups.pop(0)
    elif edit == "clear":
        opt.param_groups.clear()
    else:
        opt.param_groups = tuple(opt.param_groups)
    snap = _snapshot(opt, p)
    with pytest.raises(ValueError, match="param_groups must be a list of the 2 groups"):
        opt.step([np.ones_like(x) for x in p])
    _assert_unchanged(snap)


def test_unreadable_state_values_are_named(torch):
    opt, p = _two_group_opt("Adam")
    for value in ([[1.0], [1.0, 2.0]], torch.ones(4, dtype=torch.bfloat16),
                  torch.ones(4, requires_grad=True)):
        sd = opt.state_dict()
        sd["state"][0]["exp_avg"] = value
        snap = _snapshot(opt, p)
        with pytest.raises((TypeError, ValueError), match="exp_avg"):
            opt.load_state_dict(sd)
        _assert_unchanged(snap)


def test_bad_params():
    ro = np.zeros(3, np.float32)
    ro.setflags(write=False)
    with pytest.raises(ValueError, match="read-only"):
        fo.SGD([ro])
    with pytest.raises(TypeError, match="copied"):
        fo.SGD([[1.0, 2.0]])
    with pytest.raises(TypeError, match="float32 or float64"):
        fo.SGD([np.zeros(3, np.int64)])
    with pytest.raises(TypeError, match=r"params\[1\] is a masked array"):
        fo.SGD([np.zeros(3, np.float32), np.ma.masked_array(np.zeros(3, np.float32))])
    with pytest.raises(ValueError, match=r"params\[0\] must be aligned"):
        fo.SGD([_unaligned(np.zeros(3, np.float32))])
    with pytest.raises(TypeError, match=r"params\[0\] must be in the machine's byte order"):
        fo.SGD([np.zeros(3, np.dtype(np.float32).newbyteorder())])
    with pytest.raises(TypeError, match="dtype"):
        fo.SGD([np.zeros(3, np.float32), np.zeros(3, np.float64)])
    with pytest.raises(ValueError, match="C-contiguous"):
        fo.SGD([np.zeros((3, 4), np.float32)[:, ::2]])
    a = np.zeros(8, np.float32)
    with pytest.raises(ValueError, match="more than one place"):
        fo.SGD([a, a])
    with pytest.raises(ValueError, match="more than one place"):
        fo.SGD([{"params": [a[:4]]}, {"params": [a[2:]]}])
    with pytest.raises(TypeError, match="unexpected"):
        fo.Adam([a], momentum=0.9)
    with pytest.raises(ValueError, match="empty"):
        fo.Adam([])


def test_requires_grad_tensor_is_refused(torch):
    with pytest.raises(TypeError, match=r"params\[0\] is a torch tensor that requires grad: "
                                        r"pass params\[0\]\.detach\(\)"):
        fo.SGD([torch.zeros(3, requires_grad=True)])


@pytest.mark.parametrize("mutate,msg", [
    (lambda sd: sd["state"][2].__setitem__("exp_avg", np.zeros(6, np.float32)), "shape"),
    (lambda sd: sd["state"][2].__setitem__("exp_avg", np.zeros(5, np.float64)), "float64"),
    (lambda sd: sd["state"][1].pop("exp_avg_sq"), "lacks"),
    (lambda sd: sd["param_groups"].pop(), "param groups"),
    (lambda sd: sd["param_groups"][0]["params"].pop(), "params"),
    (lambda sd: sd["param_groups"][0].__setitem__("lr", -1.0), "lr"),
    (lambda sd: sd["state"][0].__setitem__("step", 7.0), "different steps"),
    (lambda sd: [s.__setitem__("step", 2.0 ** 70) for s in sd["state"].values()], "step"),
    (lambda sd: [s.__setitem__("step", -1.0) for s in sd["state"].values()], "step"),
    (lambda sd: [s.__setitem__("step", 1.5) for s in sd["state"].values()], "step"),
    (lambda sd: [s.__setitem__("step", float("nan")) for s in sd["state"].values()], "step"),
    (lambda sd: sd["state"].__setitem__(0, [1, 2]), "must be a dict"),
    (lambda sd: sd["param_groups"].__setitem__(0, "x"), "list of dicts")])
def test_bad_state_dict_is_refused_whole(mutate, msg):
    opt, p = _two_group_opt("Adam")
    sd = opt.state_dict()
    opt.step([np.ones_like(x) for x in p])
    before_sd = opt.state_dict()
    mutate(sd)
    snap = _snapshot(opt, p)
    with pytest.raises(ValueError, match=msg):
        opt.load_state_dict(sd)
    _assert_unchanged(snap)
    after = opt.state_dict()
    assert after["param_groups"] == before_sd["param_groups"]
    for k, s in before_sd["state"].items():
        for n, v in s.items():
            np.testing.assert_array_equal(after["state"][k][n], v)


def test_add_param_group_and_lr_schedule_edit():
    a, b = np.ones(3, np.float32), np.ones(2, np.float32)
    opt = fo.SGD([a], lr=0.1)
    opt.add_param_group({"params": [b], "lr": 1.0})
    opt.step([np.ones(3, np.float32), np.ones(2, np.float32)])
    np.testing.assert_allclose(a, 0.9, rtol=1e-6)
    np.testing.assert_allclose(b, 0.0, atol=1e-7)
    opt.param_groups[0]["lr"] = 0.5
    opt.step([np.ones(3, np.float32), np.ones(2, np.float32)])
    np.testing.assert_allclose(a, 0.4, rtol=1e-6)


# ---------------------------------------------------------- properties

from hypothesis import given, settings, strategies as st  # noqa: E402

_hyper = st.fixed_dictionaries({
    "lr": st.floats(1e-4, 0.5), "weight_decay": st.sampled_from([0.0, 0.01, 0.3]),
    "l1": st.sampled_from([0.0, 0.001]), "maximize": st.booleans(),
})


@settings(max_examples=60, deadline=None)
@given(name=st.sampled_from(["SGD", "Adagrad", "RMSprop", "Adam", "AdamW"]),
       sizes=st.lists(st.integers(0, 300), min_size=1, max_size=4),
       steps=st.integers(1, 8), h=_hyper, amsgrad=st.booleans(), centered=st.booleans(),
       momentum=st.sampled_from([0.0, 0.5, 0.9]), dtype=st.sampled_from(DTYPES))
def test_random_configs_match_formula(name, sizes, steps, h, amsgrad, centered, momentum, dtype):
    cfg = dict(h)
    if name in ("Adam", "AdamW"):
        cfg["amsgrad"] = amsgrad
    if name == "RMSprop":
        cfg.update(centered=centered, momentum=momentum, lr=cfg["lr"] * 0.1)
    if name == "SGD":
        cfg["momentum"] = momentum
    shapes = [(n,) for n in sizes]
    groups = [(cfg, list(range(len(shapes))))]
    p_fo, p_ref = init_params(shapes, dtype, 7), init_params(shapes, dtype, 7)
    run_fastopt(name, groups, p_fo, steps, dtype)
    run_reference(CONFIGS[name][0], groups, p_ref, steps, dtype)
    assert_close(p_fo, p_ref, dtype)
