"""Recurrent layers (RNN, LSTM, GRU and cells) against independent references:
torch.nn modules with autograd (weights copied by name), a NumPy GRU with the
reset gate before the recurrent product written here from the formula, and
central finite differences in float64."""
import contextlib
import os
import platform
import subprocess
import sys

import numpy as np
import pytest

import fastopt as fo
from conftest import DTYPES, RTOL, central_differences
from test_c_abi import tool

# Layer outputs and gradients go through GEMMs and T steps: looser than a kernel's.
TOL = {np.float32: dict(rtol=2e-4, atol=2e-5), np.float64: dict(rtol=1e-10, atol=1e-12)}
KINDS = [("LSTM", {}), ("GRU", {}), ("RNN", {"nonlinearity": "tanh"}),
         ("RNN", {"nonlinearity": "relu"})]


def close(a, b, dtype, what):
    np.testing.assert_allclose(a, b, err_msg=what, **TOL[dtype])


def rand(rng, shape, dtype, scale=1.0):
    return (scale * rng.standard_normal(shape)).astype(dtype)


@contextlib.contextmanager
def using_blas(name):
    """fo.set_blas(name) for the block, then the default again. A provider
    that does not load skips the test, or fails it under FASTOPT_REQUIRE_BLAS=1
    (CI installs them all)."""
    try:
        try:
            fo.set_blas(name)
        except OSError as e:
            if os.environ.get("FASTOPT_REQUIRE_BLAS") == "1":
                raise
            pytest.skip(f"{name} not available: {e}")
        yield
    finally:
        fo.set_blas(os.environ.get("FASTOPT_BLAS", "auto"))


def torch_dtype(torch, dtype):
    return torch.float64 if dtype == np.float64 else torch.float32


def torch_unroll(tm, txs, th, tc, lstm):
    """torch cell tm stepped over txs from (th, tc): (every h_t, the last c)."""
    touts = []
    for tx in txs:
        if lstm:
            th, tc = tm(tx, (th, tc))
        else:
            th = tm(tx, th)
        touts.append(th)
    return touts, tc


def copy_to_fastopt(tm, m):
    m.load_state_dict({k: v.detach().numpy() for k, v in tm.state_dict().items()})


# ------------------------------------------------------------ torch parity

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind,kw", KINDS)
@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_sequence_matches_torch(torch, dtype, kind, kw, num_layers, batch_first, bidirectional):
    T, B, I, H = 7, 3, 5, 6
    D = 2 if bidirectional else 1
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    tm = getattr(torch.nn, kind)(I, H, num_layers=num_layers, batch_first=batch_first,
                                 bidirectional=bidirectional, **kw).to(torch_dtype(torch, dtype))
    m = getattr(fo, kind)(I, H, num_layers=num_layers, batch_first=batch_first,
                          bidirectional=bidirectional, dtype=dtype, **kw)
    copy_to_fastopt(tm, m)
    assert [k for k, _ in m.named_parameters()] == [k for k, _ in tm.named_parameters()]
    lstm = kind == "LSTM"
    x = rand(rng, (B, T, I) if batch_first else (T, B, I), dtype)
    h0, c0 = rand(rng, (num_layers * D, B, H), dtype), rand(rng, (num_layers * D, B, H), dtype)
    dout = rand(rng, x.shape[:2] + (D * H,), dtype)
    dh_n, dc_n = (rand(rng, (num_layers * D, B, H), dtype),
                  rand(rng, (num_layers * D, B, H), dtype))
    x_in, h0_in, c0_in = x.copy(), h0.copy(), c0.copy()

    tx = torch.from_numpy(x).requires_grad_()
    th0, tc0 = torch.from_numpy(h0).requires_grad_(), torch.from_numpy(c0).requires_grad_()
    tout, tstate = tm(tx, (th0, tc0) if lstm else th0)
    outs, grads = [tout], [torch.from_numpy(dout)]
    if lstm:
        outs += list(tstate)
        grads += [torch.from_numpy(dh_n), torch.from_numpy(dc_n)]
    else:
        outs.append(tstate)
        grads.append(torch.from_numpy(dh_n))
    torch.autograd.backward(outs, grads)

    out, state = m.forward(x, (h0, c0) if lstm else h0)
    dx, dstate = m.backward(dout, (dh_n, dc_n) if lstm else dh_n)
    close(out, tout.detach().numpy(), dtype, "out")
    if lstm:
        close(state[0], tstate[0].detach().numpy(), dtype, "h_n")
        close(state[1], tstate[1].detach().numpy(), dtype, "c_n")
        close(dstate[0], th0.grad.numpy(), dtype, "dh0")
        close(dstate[1], tc0.grad.numpy(), dtype, "dc0")
    else:
        close(state, tstate.detach().numpy(), dtype, "h_n")
        close(dstate, th0.grad.numpy(), dtype, "dh0")
    close(dx, tx.grad.numpy(), dtype, "dx")
    for (name, p), g in zip(tm.named_parameters(), m.gradients()):
        close(g, p.grad.numpy(), dtype, name)
    # inputs are read, never written
    np.testing.assert_array_equal(x, x_in)
    np.testing.assert_array_equal(h0, h0_in)
    np.testing.assert_array_equal(c0, c0_in)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_sequence_without_bias_and_state_matches_torch(torch, dtype, kind):
    T, B, I, H = 4, 2, 3, 5
    rng = np.random.default_rng(1)
    tm = getattr(torch.nn, kind)(I, H, bias=False).to(torch_dtype(torch, dtype))
    m = getattr(fo, kind)(I, H, bias=False, dtype=dtype)
    assert list(m.state_dict()) == ["weight_ih_l0", "weight_hh_l0"]
    copy_to_fastopt(tm, m)
    x = rand(rng, (T, B, I), dtype)
    dout = rand(rng, (T, B, H), dtype)
    tx = torch.from_numpy(x).requires_grad_()
    tout, _ = tm(tx)
    tout.backward(torch.from_numpy(dout))
    out, _ = m.forward(x)
    dx, _ = m.backward(dout)
    close(out, tout.detach().numpy(), dtype, "out")
    close(dx, tx.grad.numpy(), dtype, "dx")
    for (name, p), g in zip(tm.named_parameters(), m.gradients()):
        close(g, p.grad.numpy(), dtype, name)


def wide_hidden(kind, dtype):
    """The smallest hidden_size whose gate rows (G*H elements) are a multiple of
    4 KiB apart: there backward pads the rows of its gate gradients, and the
    sequence those of its transposed W_hh."""
    G = {"LSTM": 4, "GRU": 3, "RNN": 1}[kind]
    return next(h for h in range(1, 4097) if G * h * np.dtype(dtype).itemsize % 4096 == 0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_wide_gate_rows_match_torch(torch, dtype, kind):
    check_one_layer_against_torch(torch, dtype, kind, 3, 2, 3, wide_hidden(kind, dtype), 5)


@pytest.fixture(params=["packed", "blas"])
def step_products(request):
    """The steps' recurrent products of sequences of 4 steps or more through
    fastopt's packed kernel (where the CPU has AVX-512; elsewhere both
    parameters take the BLAS) and through the BLAS."""
    fo._fastopt._rnn_use_portable(request.param == "blas")
    yield request.param
    fo._fastopt._rnn_use_portable(False)


# The packed step products' edges: register blocks of 1 to 12 rows (B rows
# split evenly into blocks of at most 12) and panels of 32 float32 / 16
# float64 columns cut short by H or 4H (masked loads and stores), over one and
# two threads (whole panels per thread).
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("B,H", [(1, 1), (5, 17), (12, 33), (13, 40), (37, 70)])
@pytest.mark.parametrize("nthreads", [1, 2])
def test_packed_step_products_match_torch(torch, threads, step_products, dtype, kind, B, H,
                                          nthreads):
    fo.set_num_threads(nthreads)
    check_one_layer_against_torch(torch, dtype, kind, 5, B, 3, H, 4)


def assert_same_at_1_and_2_threads(kind, kw, x, dout):
    """A layer's output, input gradient and parameter gradients, the same bit
    for bit at 1 and 2 threads."""
    results = []
    for n in (1, 2):
        fo.set_num_threads(n)
        m = getattr(fo, kind)(x.shape[2], dout.shape[2], dtype=x.dtype, seed=3, **kw)
        out, _ = m.forward(x)
        dx, _ = m.backward(dout)
        results.append([out, dx] + list(m.gradients()))
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b, err_msg=kind)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind,kw", KINDS + [("GRU", {"reset_after": False})])
def test_packed_step_products_are_the_same_for_any_thread_count(threads, dtype, kind, kw):
    """Each thread computes whole panels of the product, each element summed in
    the same order: 1 and 2 threads agree bit for bit."""
    T, B, I, H = 6, 25, 7, 200   # 4H = 800 columns: 25 float32 panels, 50 float64
    rng = np.random.default_rng(5)
    x, dout = rand(rng, (T, B, I), dtype), rand(rng, (T, B, H), dtype)
    assert_same_at_1_and_2_threads(kind, kw, x, dout)


@pytest.mark.parametrize("blas", ["scipy", "numpy", "dnnl", "mkl"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_each_blas_gives_the_same_bits_for_any_thread_count(threads, step_products, blas,
                                                            dtype):
    """Whole layers with every provider at 1 and 2 threads, with products the
    libraries' own threads split over K (the weight gradients sum over T*B =
    1600 rows: MKL's own two threads changed a fifth of the input weights'
    gradient here) and the step products through the BLAS too."""
    T, B, I, H = 50, 32, 96, 160
    rng = np.random.default_rng(8)
    x, dout = rand(rng, (T, B, I), dtype), rand(rng, (T, B, H), dtype)
    with using_blas(blas):
        for kind in ("LSTM", "GRU"):
            assert_same_at_1_and_2_threads(kind, {}, x, dout)


# Products of at most 128 rows (a step's batch, or all steps' inputs of a short
# sequence) run on transposed copies: both sides of that bound, and the
# transposes split over two threads (H = 128: up to 512 rows of W). They
# transpose whole 64-byte blocks in registers where the CPU has AVX-512 and
# the edges (here: I = 21 inputs, 43 rows) element by element.
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("T,B", [(1, 128), (1, 129), (2, 64), (3, 43), (3, 64), (4, 32)])
@pytest.mark.parametrize("nthreads", [1, 2])
def test_products_of_few_and_many_rows_match_torch(torch, threads, step_products, dtype, kind,
                                                   T, B, nthreads):
    fo.set_num_threads(nthreads)
    check_one_layer_against_torch(torch, dtype, kind, T, B, 21, 128, 6)


def check_one_layer_against_torch(torch, dtype, kind, T, B, I, H, seed):
    rng = np.random.default_rng(seed)
    tm = getattr(torch.nn, kind)(I, H).to(torch_dtype(torch, dtype))
    m = getattr(fo, kind)(I, H, dtype=dtype)
    copy_to_fastopt(tm, m)
    lstm = kind == "LSTM"
    x, dout = rand(rng, (T, B, I), dtype), rand(rng, (T, B, H), dtype)
    h0, c0 = rand(rng, (1, B, H), dtype), rand(rng, (1, B, H), dtype)
    tx = torch.from_numpy(x).requires_grad_()
    th0, tc0 = torch.from_numpy(h0).requires_grad_(), torch.from_numpy(c0).requires_grad_()
    tout, _ = tm(tx, (th0, tc0) if lstm else th0)
    tout.backward(torch.from_numpy(dout))
    out, _ = m.forward(x, (h0, c0) if lstm else h0)
    dx, dstate = m.backward(dout)
    close(out, tout.detach().numpy(), dtype, "out")
    close(dx, tx.grad.numpy(), dtype, "dx")
    close(dstate[0] if lstm else dstate, th0.grad.numpy(), dtype, "dh0")
    for (name, p), g in zip(tm.named_parameters(), m.gradients()):
        close(g, p.grad.numpy(), dtype, name)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind,kw", [("LSTMCell", {}), ("GRUCell", {}),
                                     ("RNNCell", {"nonlinearity": "tanh"}),
                                     ("RNNCell", {"nonlinearity": "relu"})])
def test_cell_stepped_then_backpropagated_matches_torch(torch, dtype, kind, kw):
    """Step T times, then backward T times newest first, as a user unrolls time."""
    T, B, I, H = 5, 4, 3, 6
    rng = np.random.default_rng(2)
    tm = getattr(torch.nn, kind)(I, H, **kw).to(torch_dtype(torch, dtype))
    m = getattr(fo, kind)(I, H, dtype=dtype, **kw)
    copy_to_fastopt(tm, m)
    lstm = kind == "LSTMCell"
    xs = [rand(rng, (B, I), dtype) for _ in range(T)]
    dhs = [rand(rng, (B, H), dtype) for _ in range(T)]   # loss gradient at each h_t
    h0, c0 = rand(rng, (B, H), dtype), rand(rng, (B, H), dtype)

    txs = [torch.from_numpy(x).requires_grad_() for x in xs]
    th0, tc0 = torch.from_numpy(h0).requires_grad_(), torch.from_numpy(c0).requires_grad_()
    touts, tc = torch_unroll(tm, txs, th0, tc0, lstm)
    torch.autograd.backward(touts, [torch.from_numpy(d) for d in dhs])

    h, c, outs = h0, c0, []
    for x in xs:
        if lstm:
            h, c = m.forward(x, (h, c))
        else:
            h = m.forward(x, h)
        outs.append(h)
    for t in range(T):
        close(outs[t], touts[t].detach().numpy(), dtype, f"h{t + 1}")
    dh_next, dc_next, dxs = np.zeros((B, H), dtype), np.zeros((B, H), dtype), []
    for t in reversed(range(T)):
        if lstm:
            dx, (dh_next, dc_next) = m.backward(dhs[t] + dh_next, dc_next)
        else:
            dx, dh_next = m.backward(dhs[t] + dh_next)
        dxs.append(dx)
    dxs.reverse()
    for t in range(T):
        close(dxs[t], txs[t].grad.numpy(), dtype, f"dx{t}")
    close(dh_next, th0.grad.numpy(), dtype, "dh0")
    if lstm:
        close(dc_next, tc0.grad.numpy(), dtype, "dc0")
    for (name, p), g in zip(tm.named_parameters(), m.gradients()):
        close(g, p.grad.numpy(), dtype, name)
    with pytest.raises(ValueError, match="forward"):
        m.backward(dhs[0])          # every step has been backpropagated


@pytest.mark.parametrize("blas", ["scipy", "numpy", "dnnl", "mkl", "auto"])
@pytest.mark.parametrize("nthreads", [1, 2])
def test_each_blas_matches_torch(torch, threads, blas, nthreads):
    fo.set_num_threads(nthreads)
    with using_blas(blas):
        assert fo.get_blas() == blas or blas == "auto"
        test_sequence_matches_torch(torch, np.float32, "LSTM", {}, 2, False, False)
        test_sequence_matches_torch(torch, np.float64, "GRU", {}, 1, True, True)
        test_cell_stepped_then_backpropagated_matches_torch(torch, np.float32, "LSTMCell", {})


@pytest.mark.parametrize("blas", ["scipy", "numpy", "dnnl", "auto"])
@pytest.mark.parametrize("nthreads", [1, 2])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_layer_calls_leave_the_blas_thread_counts_as_they_were(threads, blas, nthreads, dtype):
    """Layers hold the BLAS's thread count at 1 for their own products (which
    fastopt's threads split) and put it back after, also with two of
    fastopt's threads calling the BLAS at once."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    with using_blas(blas):
        fo.set_num_threads(nthreads)
        m = fo.GRU(40, 64, dtype=dtype)     # products large enough to be split
        x = np.zeros((8, 16, 40), dtype)
        m.forward(x)                       # loads the providers
        for limit in (2, 1):
            with threadpoolctl.threadpool_limits(limit, user_api="blas"):
                before = [d["num_threads"] for d in threadpoolctl.threadpool_info()]
                for _ in range(5):
                    out, _ = m.forward(x)
                    m.backward(out)
                    assert [d["num_threads"] for d in threadpoolctl.threadpool_info()] == before


@pytest.mark.parametrize("blas", ["scipy", "numpy", "dnnl", "mkl"])
def test_layers_in_python_threads_leave_the_blas_thread_counts_as_they_were(threads, blas):
    """Layers called from several Python threads at once (the GIL is released)
    give what each call gives alone, and the BLAS thread counts are the user's
    again after: OpenBLAS's count is process-wide, so the calls in flight share
    one lowered count instead of each saving and restoring it."""
    import threading
    threadpoolctl = pytest.importorskip("threadpoolctl")
    with using_blas(blas):
        fo.set_num_threads(2)
        layers = [fo.LSTM(40, 64, seed=s) for s in range(4)]
        x = np.random.default_rng(3).standard_normal((8, 16, 40)).astype(np.float32)

        def run(m):
            out, _ = m.forward(x)
            return out, m.backward(out)[0]

        alone = [run(m) for m in layers]
        before = [d["num_threads"] for d in threadpoolctl.threadpool_info()]
        results, errors = [[] for _ in layers], []

        def worker(i):
            try:
                for _ in range(30):
                    results[i].append(run(layers[i]))
            except Exception as e:   # pragma: no cover - reported below
                errors.append(e)

        workers = [threading.Thread(target=worker, args=(i,)) for i in range(len(layers))]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        assert not errors
        assert [d["num_threads"] for d in threadpoolctl.threadpool_info()] == before
        for i, got in enumerate(results):
            for out, dx in got:
                np.testing.assert_array_equal(out, alone[i][0])
                np.testing.assert_array_equal(dx, alone[i][1])


def gemm_at_thread_counts(a, b, ta, tb, c0, beta, counts):
    """op(a) op(b) + beta*c0 through fastopt's BLAS, once at each thread count."""
    from fastopt import _fastopt
    got = []
    for nt in counts:
        fo.set_num_threads(nt)
        c = c0.copy()
        _fastopt.gemm(c, a, b, ta, tb, beta)
        got.append(c)
    return got


@pytest.mark.parametrize("blas", ["scipy", "numpy", "dnnl", "mkl"])
@pytest.mark.parametrize("nthreads", [1, 2])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_products_split_over_threads(threads, blas, nthreads, dtype):
    """Large products split their rows or columns into pieces that fastopt's
    threads share: every row and column, ragged ends included, in every
    transpose, close to the product and the same bit for bit at 1 and 2
    threads. Left to their own threads, oneDNN and MKL gave different bits at
    1 and 2 threads for the last two shapes (MKL: 22 of 240 random shapes)."""
    with using_blas(blas):
        rng = np.random.default_rng(6)
        # (m, n, k): in 2 pieces by rows and by columns, in 4 (256 rows or
        # columns each at least), too small to split, long K
        for m, n, k in [(1000, 130, 40), (129, 1001, 33), (1101, 70, 40), (70, 1030, 33),
                        (300, 300, 300), (64, 100, 7), (137, 1332, 778), (574, 149, 926)]:
            for ta in (False, True):
                for tb in (False, True):
                    a = rand(rng, (k, m) if ta else (m, k), dtype)
                    b = rand(rng, (n, k) if tb else (k, n), dtype)
                    c0 = rand(rng, (m, n), dtype)
                    A, B = (a.T if ta else a), (b.T if tb else b)
                    want = A.astype(np.float64) @ B.astype(np.float64) + 2.0 * c0
                    one, many = gemm_at_thread_counts(a, b, ta, tb, c0, 2.0, (1, nthreads))
                    tol = 1e-4 if dtype == np.float32 else 1e-12
                    np.testing.assert_allclose(many, want, rtol=tol, atol=tol * k)
                    np.testing.assert_array_equal(many, one)


def test_mkl_gives_the_same_bits_for_any_thread_count_without_dynamic_threads(threads):
    """With MKL's dynamic threads off (MKL_DYNAMIC=FALSE), MKL called on a worker
    thread of fastopt's used its global count inside a piece and split K: each
    thread that runs pieces sets MKL's count (per thread) to 1."""
    import ctypes
    from fastopt import blas
    with using_blas("mkl"):
        mkl = ctypes.CDLL(blas.find_mkl())
        dynamic = mkl.MKL_Get_Dynamic()
        mkl.MKL_Set_Dynamic(0)
        try:
            rng = np.random.default_rng(9)
            for m, n, k, ta, tb in [(164, 365, 902, 1, 1), (413, 175, 1412, 1, 1),
                                    (328, 147, 1440, 1, 0)]:
                a = rand(rng, (k, m) if ta else (m, k), np.float32)
                b = rand(rng, (n, k) if tb else (k, n), np.float32)
                one, two = gemm_at_thread_counts(a, b, ta, tb, np.zeros((m, n), np.float32),
                                                 0.0, (1, 2))
                np.testing.assert_array_equal(one, two, err_msg=f"{m}x{n}x{k}")
        finally:
            mkl.MKL_Set_Dynamic(dynamic)


# The same on a CPU without AVX-512, for every provider: run under
# qemu-x86_64 as a Haswell (AVX2). There OpenBLAS's and oneDNN's kernels round
# a row at a piece's edge differently (pieces cut per thread made 1 and 2
# threads differ in the last bit), and MKL's own threads split K.
QSPLIT = """
import sys, numpy as np, fastopt as fo
sys.path.insert(0, sys.argv[1])
import test_rnn as t
rng = np.random.default_rng(6)
for blas in sys.argv[2:]:
    fo.set_blas(blas)
    # just large enough to split (m*n*k >= 2^21), in 2 pieces by rows and by
    # columns, and in 4
    for m, n, k, ta, tb in [(300, 130, 60, 0, 0), (130, 300, 60, 0, 1), (140, 270, 70, 1, 1),
                            (1030, 40, 52, 0, 0)]:
        a = rng.standard_normal((k, m) if ta else (m, k)).astype(np.float32)
        b = rng.standard_normal((n, k) if tb else (k, n)).astype(np.float32)
        one, two = t.gemm_at_thread_counts(a, b, ta, tb, np.zeros((m, n), np.float32), 0.0,
                                           (1, 2))
        want = (a.T if ta else a).astype(np.float64) @ (b.T if tb else b)
        np.testing.assert_allclose(one, want, rtol=1e-4, atol=1e-4 * k)
        np.testing.assert_array_equal(one, two, err_msg=f"{blas} {m}x{n}x{k}")
    x = rng.standard_normal((6, 25, 7)).astype(np.float32)
    dout = rng.standard_normal((6, 25, 200)).astype(np.float32)
    t.assert_same_at_1_and_2_threads("LSTM", {}, x, dout)
print("ok")
"""


def test_products_are_the_same_for_any_thread_count_on_an_avx2_cpu():
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("an x86-64 build")
    qemu = tool("qemu-x86_64", "FASTOPT_REQUIRE_CROSS")
    names = []
    for name in ("scipy", "numpy", "dnnl", "mkl"):
        with contextlib.suppress(pytest.skip.Exception), using_blas(name):
            names.append(name)
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(fo.__file__)))
    r = subprocess.run([qemu, "-cpu", "Haswell-v4", sys.executable, "-c", QSPLIT,
                        os.path.dirname(__file__)] + names,
                       env=env, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stdout + r.stderr[-3000:]


# --------------------------------------- GRU with the reset gate before W_hn

def numpy_gru_reset_before(x, h0, w_ih, w_hh, b_ih, b_hh):
    """Cho et al.: r, z = sig(W_i{r,z} x + b_i + W_h{r,z} h + b_h);
    n = tanh(W_in x + b_in + W_hn (r*h) + b_hn); h' = (1-z)*n + z*h."""
    H = w_hh.shape[1]
    sig = lambda v: 1 / (1 + np.exp(-v))  # noqa: E731
    h, outs = h0, []
    for xt in x:
        gi = xt @ w_ih.T + b_ih
        r = sig(gi[:, :H] + h @ w_hh[:H].T + b_hh[:H])
        z = sig(gi[:, H:2 * H] + h @ w_hh[H:2 * H].T + b_hh[H:2 * H])
        n = np.tanh(gi[:, 2 * H:] + (r * h) @ w_hh[2 * H:].T + b_hh[2 * H:])
        h = (1 - z) * n + z * h
        outs.append(h)
    return np.stack(outs)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,B", [(6, 3), (2, 3), (2, 130)])   # products of few and many rows
def test_gru_reset_before_matches_numpy_formula(step_products, dtype, T, B):
    I, H = 4, 5
    rng = np.random.default_rng(3)
    m = fo.GRU(I, H, reset_after=False, dtype=dtype, seed=7)
    x, h0 = rand(rng, (T, B, I), dtype), rand(rng, (1, B, H), dtype)
    out, h_n = m.forward(x, h0)
    ref = numpy_gru_reset_before(x.astype(np.float64), h0[0].astype(np.float64),
                                 *[p.astype(np.float64) for p in m.parameters()])
    close(out, ref, dtype, "out")
    close(h_n[0], ref[-1], dtype, "h_n")
    cell = fo.GRUCell(I, H, reset_after=False, dtype=dtype)
    cell.load_state_dict({k[:-3]: v for k, v in m.state_dict().items()})
    close(cell.forward(x[0], h0[0]), ref[0], dtype, "cell h1")


# ------------------------------------------------------ finite differences

FD_LAYERS = [("LSTM", {}), ("GRU", {}), ("GRU", {"reset_after": False}),
             ("RNN", {"nonlinearity": "tanh"}), ("RNN", {"nonlinearity": "relu"}),
             ("LSTM", {"bidirectional": True}), ("GRU", {"bidirectional": True})]


@pytest.mark.parametrize("kind,kw", FD_LAYERS)
def test_gradients_match_finite_differences(kind, kw):
    """loss = sum(out*dout) + sum(h_n*dh_n) (+ sum(c_n*dc_n)); central
    differences in float64 for every input, initial state and parameter entry."""
    T, B, I, H, L = 3, 2, 3, 4, 2
    D = 2 if kw.get("bidirectional") else 1
    rng = np.random.default_rng(4)
    m = getattr(fo, kind)(I, H, num_layers=L, dtype=np.float64, seed=5, **kw)
    lstm = kind == "LSTM"
    x = rng.standard_normal((T, B, I))
    h0, c0 = rng.standard_normal((L * D, B, H)), rng.standard_normal((L * D, B, H))
    dout, dh_n, dc_n = (rng.standard_normal(s)
                        for s in [(T, B, D * H), (L * D, B, H), (L * D, B, H)])

    def loss():
        out, st = m.forward(x, (h0, c0) if lstm else h0)
        val = np.sum(out * dout)
        if lstm:
            return val + np.sum(st[0] * dh_n) + np.sum(st[1] * dc_n)
        return val + np.sum(st * dh_n)

    loss()
    m.zero_grad()
    dx, dst = m.backward(dout, (dh_n, dc_n) if lstm else dh_n)
    checks = [(x, dx, "x"), (h0, dst[0] if lstm else dst, "h0")]
    if lstm:
        checks.append((c0, dst[1], "c0"))
    checks += [(p, g, name) for (name, p), g in zip(m.named_parameters(), m.gradients())]
    for arr, grad, name in checks:
        np.testing.assert_allclose(grad, central_differences(loss, arr), rtol=1e-6, atol=1e-8,
                                   err_msg=name)


@pytest.mark.parametrize("kind,kw", [("LSTMCell", {}), ("GRUCell", {}),
                                     ("GRUCell", {"reset_after": False}), ("RNNCell", {})])
def test_cell_gradients_match_finite_differences(kind, kw):
    B, I, H = 3, 4, 5
    rng = np.random.default_rng(6)
    m = getattr(fo, kind)(I, H, dtype=np.float64, seed=1, **kw)
    lstm = kind == "LSTMCell"
    x, h0, c0 = (rng.standard_normal(s) for s in [(B, I), (B, H), (B, H)])
    dh1, dc1 = rng.standard_normal((B, H)), rng.standard_normal((B, H))

    def loss(save=False):
        if lstm:
            h1, c1 = m.forward(x, (h0, c0))
            val = np.sum(h1 * dh1) + np.sum(c1 * dc1)
        else:
            val = np.sum(m.forward(x, h0) * dh1)
        if not save:
            m.reset()
        return val

    loss(save=True)
    if lstm:
        dx, (dh0, dc0) = m.backward(dh1, dc1)
        checks = [(x, dx), (h0, dh0), (c0, dc0)]
    else:
        dx, dh0 = m.backward(dh1)
        checks = [(x, dx), (h0, dh0)]
    checks += list(zip(m.parameters(), m.gradients()))
    for arr, grad in checks:
        np.testing.assert_allclose(grad, central_differences(loss, arr), rtol=1e-6, atol=1e-8)


def _arrays(obj):
    """The arrays in a nest of tuples (a cell's outputs and gradients)."""
    if isinstance(obj, tuple):
        return [a for o in obj for a in _arrays(o)]
    return [obj]


@pytest.mark.parametrize("kind", ["LSTMCell", "GRUCell", "RNNCell"])
def test_cell_reset_recycles_gate_buffers_safely(kind):
    """reset() hands the forgotten steps' gate buffers to later forwards: steps
    taken after a reset (with two batch sizes, so that buffers of the other
    shape wait on the free list) run and backpropagate exactly as on a fresh
    cell, and what the forgotten steps returned stays the caller's."""
    I, H = 6, 5
    rng = np.random.default_rng(11)
    lstm = kind == "LSTMCell"
    used, fresh = (getattr(fo, kind)(I, H, dtype=np.float64, seed=2) for _ in range(2))

    def step(m, x, h):
        return m.forward(x, (h, h)) if lstm else m.forward(x, h)

    forgotten = [step(used, rng.standard_normal((B, I)), np.ones((B, H))) for B in (3, 4, 3, 4)]
    snapshot = [a.copy() for a in _arrays(tuple(forgotten))]
    used.reset()
    xs = [rng.standard_normal((B, I)) for B in (3, 4, 4)]
    dhs = [rng.standard_normal((x.shape[0], H)) for x in xs]
    runs = []
    for m in (used, fresh):
        m.zero_grad()
        outs = [step(m, x, np.full((x.shape[0], H), 0.5)) for x in xs]
        grads = [m.backward(dh, dh) if lstm else m.backward(dh) for dh in dhs[::-1]]
        runs.append(_arrays((tuple(outs), tuple(grads))) + m.gradients())
    assert len(runs[0]) == len(runs[1])
    for a, b in zip(*runs):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(_arrays(tuple(forgotten)), snapshot):
        np.testing.assert_array_equal(a, b)


# ------------------------------------------------- cell vs sequence layer

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind,kw", [("LSTM", {}), ("GRU", {}), ("GRU", {"reset_after": False}),
                                     ("RNN", {"nonlinearity": "relu"})])
@pytest.mark.parametrize("wide", [False, True])
def test_cell_unrolled_equals_sequence_layer(dtype, kind, kw, wide):
    T, B, I, H = 6, 3, 4, 5
    if wide:
        H = wide_hidden(kind, dtype)
    rng = np.random.default_rng(8)
    seq = getattr(fo, kind)(I, H, dtype=dtype, seed=3, **kw)
    cell = getattr(fo, kind + "Cell")(I, H, dtype=dtype, **kw)
    cell.load_state_dict({k[:-3]: v for k, v in seq.state_dict().items()})
    lstm = kind == "LSTM"
    x, dout = rand(rng, (T, B, I), dtype), rand(rng, (T, B, H), dtype)
    h0, c0 = rand(rng, (1, B, H), dtype), rand(rng, (1, B, H), dtype)
    out, _ = seq.forward(x, (h0, c0) if lstm else h0)
    dx, dst = seq.backward(dout)
    h, c, hs = h0[0], c0[0], []
    for t in range(T):
        if lstm:
            h, c = cell.forward(x[t], (h, c))
        else:
            h = cell.forward(x[t], h)
        hs.append(h)
    close(np.stack(hs), out, dtype, "out")
    dh, dc, dxs = np.zeros((B, H), dtype), np.zeros((B, H), dtype), []
    for t in reversed(range(T)):
        if lstm:
            dxt, (dh, dc) = cell.backward(dout[t] + dh, dc)
        else:
            dxt, dh = cell.backward(dout[t] + dh)
        dxs.append(dxt)
    close(np.stack(dxs[::-1]), dx, dtype, "dx")
    close(dh, dst[0][0] if lstm else dst[0], dtype, "dh0")
    for g_seq, g_cell in zip(seq.gradients(), cell.gradients()):
        close(g_cell, g_seq, dtype, "param grad")


# ------------------------------------------------------ long and extreme

@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_long_sequence_matches_torch_without_overflow(torch, kind):
    T, B, I, H = 1000, 2, 3, 4
    rng = np.random.default_rng(9)
    tm = getattr(torch.nn, kind)(I, H).double()
    m = getattr(fo, kind)(I, H, dtype=np.float64)
    copy_to_fastopt(tm, m)
    x = rng.standard_normal((T, B, I)) * 30      # saturates every gate
    dout = rng.standard_normal((T, B, H))
    tx = torch.from_numpy(x).requires_grad_()
    tout, _ = tm(tx)
    tout.backward(torch.from_numpy(dout))
    with np.errstate(all="raise"):
        out, _ = m.forward(x)
        dx, _ = m.backward(dout)
    assert np.isfinite(out).all() and np.isfinite(dx).all()
    close(out, tout.detach().numpy(), np.float64, "out")
    close(dx, tx.grad.numpy(), np.float64, "dx")
    for (name, p), g in zip(tm.named_parameters(), m.gradients()):
        np.testing.assert_allclose(g, p.grad.numpy(), rtol=1e-9, atol=1e-9, err_msg=name)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_huge_inputs_saturate_and_nan_propagates(torch, dtype, kind):
    T, B, I, H = 3, 2, 2, 3
    tm = getattr(torch.nn, kind)(I, H).to(torch_dtype(torch, dtype))
    m = getattr(fo, kind)(I, H, dtype=dtype)
    copy_to_fastopt(tm, m)
    x = np.array([1e30, -1e30, 1e4, -1e4, 88.7, -89.5, 0.0, -0.0, 709.8, -745.2, 1e-30, 3.0],
                 dtype)[:T * B * I].reshape(T, B, I)
    out, _ = m.forward(x)
    with torch.no_grad():
        ref, _ = tm(torch.from_numpy(x))
    assert np.isfinite(out).all()
    close(out, ref.numpy(), dtype, "out")
    x[1, 0, 0] = np.nan
    out, _ = m.forward(x)
    assert np.isnan(out[1:, 0]).all() and np.isfinite(out[0]).all() and np.isfinite(out[:, 1]).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_saturated_sigmoid_gates_are_exactly_zero(dtype):
    """1/(1 + e^(1e30)) is 0 in IEEE arithmetic (and in torch): gates i, f, o
    of pre-activation -1e30 are 0, so are h1, c1 and every weight gradient
    (through sigmoid' = s(1 - s) = 0 and tanh' = 1 - 1 = 0). A clamped exp
    left them at 6e-39 (float32), and dW_ih = dpre*x at 5e-9."""
    cell = fo.LSTMCell(1, 1, dtype=dtype, seed=0)
    cell.load_state_dict({k: np.abs(v) + 0.5 for k, v in cell.state_dict().items()})
    x, state = np.array([[-1e30]], dtype), (np.zeros((1, 1), dtype), np.ones((1, 1), dtype))
    h1, c1 = cell.forward(x, state)
    assert h1[0, 0] == 0 and c1[0, 0] == 0
    cell.backward(np.ones((1, 1), dtype), np.ones((1, 1), dtype))
    dw_ih = cell.gradients()[0]
    assert (dw_ih == 0).all(), dw_ih


@pytest.mark.parametrize("dtype", DTYPES)
def test_relu_passes_the_gradient_of_a_nan_unit(dtype):
    """torch's relu backward stops the gradient where h <= 0 only, so a NaN
    unit passes it (its NaN then shows in the gradients, as a guard expects);
    h > 0 stopped it there too. Reference: the formula in NumPy."""
    cell = fo.RNNCell(2, 2, nonlinearity="relu", dtype=dtype, seed=3)
    w_ih = cell.state_dict()["weight_ih"]
    x = np.array([[1.0, 2.0], [0.5, -1.0]], dtype)
    h0 = np.array([[np.nan, 0.0], [0.0, 0.0]], dtype)
    h1 = cell.forward(x, h0)
    dh1 = np.ones((2, 2), dtype)
    dx, _ = cell.backward(dh1)
    dpre = np.where(h1 <= 0, 0, dh1)            # NaN rows pass dh1 through
    assert np.isnan(h1[0]).all()
    np.testing.assert_allclose(dx, dpre @ w_ih, rtol=RTOL[dtype])
    assert (dx[0] != 0).all()


# ------------------------------------------------------------- API, sizes

@pytest.mark.parametrize("T,B,H", [(1, 1, 1), (2, 1, 7), (3, 0, 4), (0, 2, 3)])
def test_odd_sizes_match_torch(torch, T, B, H):
    I = 3
    rng = np.random.default_rng(10)
    tm = torch.nn.LSTM(I, H, num_layers=2).double()
    m = fo.LSTM(I, H, num_layers=2, dtype=np.float64)
    copy_to_fastopt(tm, m)
    x = rng.standard_normal((T, B, I))
    h0, c0 = rng.standard_normal((2, B, H)), rng.standard_normal((2, B, H))
    out, (h_n, c_n) = m.forward(x, (h0, c0))
    assert out.shape == (T, B, H) and h_n.shape == (2, B, H)
    dout = rng.standard_normal((T, B, H))
    dx, (dh0, dc0) = m.backward(dout, (np.ones_like(h_n), np.ones_like(c_n)))
    assert dx.shape == x.shape and dh0.shape == h0.shape
    if T == 0:
        np.testing.assert_array_equal(h_n, h0)
        np.testing.assert_array_equal(dh0, np.ones_like(h0))
        return
    if B == 0:
        return
    tx = torch.from_numpy(x).requires_grad_()
    th0 = torch.from_numpy(h0).requires_grad_()
    tout, (th, tc) = tm(tx, (th0, torch.from_numpy(c0)))
    torch.autograd.backward([tout, th, tc], [torch.from_numpy(dout), torch.ones_like(th),
                                             torch.ones_like(tc)])
    close(out, tout.detach().numpy(), np.float64, "out")
    close(dx, tx.grad.numpy(), np.float64, "dx")
    close(dh0, th0.grad.numpy(), np.float64, "dh0")


def test_gradients_accumulate_and_zero_grad():
    m = fo.GRU(3, 4, num_layers=2, dtype=np.float64, seed=0)
    x = np.random.default_rng(0).standard_normal((5, 2, 3))
    out, _ = m.forward(x)
    m.backward(np.ones_like(out))
    once = [g.copy() for g in m.gradients()]
    m.forward(x)                           # each forward is backpropagated once
    m.backward(np.ones_like(out))
    for g, g1 in zip(m.gradients(), once):
        np.testing.assert_allclose(g, 2 * g1, rtol=1e-14)
    grads = m.gradients()
    m.zero_grad()
    assert all((g == 0).all() for g in m.gradients())
    assert all(a is b for a, b in zip(grads, m.gradients()))   # zeroed in place
    assert [p.shape for p in m.parameters()] == [g.shape for g in m.gradients()]


def test_init_is_seeded_uniform_in_torch_bound():
    H = 16
    a, b = fo.LSTM(8, H, num_layers=2, seed=3), fo.LSTM(8, H, num_layers=2, seed=3)
    for p, q in zip(a.parameters(), b.parameters()):
        np.testing.assert_array_equal(p, q)
        assert p.dtype == np.float32 and np.abs(p).max() <= 1 / np.sqrt(H)
    c = fo.LSTM(8, H, num_layers=2, seed=4)
    assert not np.array_equal(a.parameters()[0], c.parameters()[0])


def test_state_dict_round_trips_into_torch(torch):
    m = fo.GRU(3, 5, num_layers=2, dtype=np.float64, seed=1)
    tm = torch.nn.GRU(3, 5, num_layers=2).double()
    tm.load_state_dict({k: torch.from_numpy(v) for k, v in m.state_dict().items()})
    x = np.random.default_rng(1).standard_normal((4, 2, 3))
    with torch.no_grad():
        ref, _ = tm(torch.from_numpy(x))
    close(m.forward(x)[0], ref.numpy(), np.float64, "out")


def test_optimizer_drives_the_layer():
    m = fo.LSTM(3, 4, dtype=np.float64, seed=0)
    x = np.random.default_rng(0).standard_normal((5, 2, 3))
    opt = fo.SGD(m.parameters(), lr=0.1)
    losses = []
    for _ in range(20):
        out, _ = m.forward(x)
        losses.append(0.5 * np.sum(out ** 2))
        m.zero_grad()
        m.backward(out)
        opt.step(m.gradients())
    assert losses[-1] < 0.5 * losses[0]


# -------------------------------------------------------------- bad input

def test_bad_input_raises_and_writes_nothing():
    m = fo.LSTM(3, 4, num_layers=2, dtype=np.float32, seed=0)
    x = np.zeros((5, 2, 3), np.float32)
    with pytest.raises(ValueError, match="forward"):
        m.backward(np.zeros((5, 2, 4), np.float32))
    with pytest.raises(TypeError, match="x must have dtype float32"):
        m.forward(x.astype(np.float64))
    with pytest.raises(ValueError, match="x has shape"):
        m.forward(np.zeros((5, 2, 4), np.float32))
    with pytest.raises(ValueError, match="x must be 3-D"):
        m.forward(np.zeros((5, 2, 1, 3), np.float32))
    with pytest.raises(ValueError, match="x must be C-contiguous"):
        m.forward(np.zeros((3, 2, 5), np.float32).transpose(2, 1, 0))
    with pytest.raises(ValueError, match="h0 has shape"):
        m.forward(x, (np.zeros((1, 2, 4), np.float32), np.zeros((2, 2, 4), np.float32)))
    with pytest.raises(TypeError, match="state must be a tuple"):
        m.forward(x, np.zeros((2, 2, 4), np.float32))
    out, _ = m.forward(x)
    before = [g.copy() for g in m.gradients()]
    with pytest.raises(TypeError, match="dout must have dtype float32"):
        m.backward(out.astype(np.float64))
    with pytest.raises(ValueError, match="dout has shape"):
        m.backward(out[:, :1])
    with pytest.raises(ValueError, match="dh_n has shape"):
        m.backward(out, (np.zeros((2, 1, 4), np.float32), np.zeros((2, 2, 4), np.float32)))
    for g, g0 in zip(m.gradients(), before):
        np.testing.assert_array_equal(g, g0)


def test_bad_cell_input_and_constructor_arguments():
    cell = fo.GRUCell(3, 4)
    with pytest.raises(ValueError, match="forward"):
        cell.backward(np.zeros((2, 4), np.float32))
    with pytest.raises(TypeError, match="x must have dtype float32"):
        cell.forward(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="h0 has shape"):
        cell.forward(np.zeros((2, 3), np.float32), np.zeros((3, 4), np.float32))
    cell.forward(np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match="dh1 has shape"):
        cell.backward(np.zeros((3, 4), np.float32))
    cell.backward(np.zeros((2, 4), np.float32))       # the failed call kept the step
    with pytest.raises(TypeError, match="state must be a tuple"):
        fo.LSTMCell(3, 4).forward(np.zeros((2, 3), np.float32), np.zeros((2, 4), np.float32))
    with pytest.raises(ValueError, match="hidden_size"):
        fo.LSTM(3, 0)
    with pytest.raises(ValueError, match="num_layers"):
        fo.GRU(3, 4, num_layers=0)
    with pytest.raises(ValueError, match="nonlinearity"):
        fo.RNN(3, 4, nonlinearity="sigmoid")
    with pytest.raises(TypeError, match="dtype"):
        fo.RNNCell(3, 4, dtype=np.int32)
    with pytest.raises(ValueError, match="dropout"):
        fo.LSTM(3, 4, num_layers=2, dropout=1.5)
    with pytest.raises(TypeError, match="dropout"):
        fo.GRU(3, 4, num_layers=2, dropout="0.5")
    m = fo.LSTM(3, 4, bidirectional=True)
    with pytest.raises(ValueError, match="h0 has shape"):   # (num_layers*2, B, H) when bidirectional
        m.forward(np.zeros((2, 5, 3), np.float32),
                  (np.zeros((1, 5, 4), np.float32), np.zeros((1, 5, 4), np.float32)))
    m.forward(np.zeros((2, 5, 3), np.float32))
    with pytest.raises(ValueError, match="dout has shape"):
        m.backward(np.zeros((2, 5, 4), np.float32))


@pytest.mark.parametrize("kind,bidirectional", [("LSTM", True), ("GRU", False), ("RNN", True)])
def test_unbatched_input_matches_torch(torch, kind, bidirectional):
    """2-D input (T, I) with 2-D states, as torch takes it (batch_first ignored)."""
    T, I, H, L = 5, 3, 4, 2
    D = 2 if bidirectional else 1
    rng = np.random.default_rng(6)
    tm = getattr(torch.nn, kind)(I, H, num_layers=L, bidirectional=bidirectional,
                                 batch_first=True).double()
    m = getattr(fo, kind)(I, H, num_layers=L, bidirectional=bidirectional, batch_first=True,
                          dtype=np.float64)
    copy_to_fastopt(tm, m)
    lstm = kind == "LSTM"
    x, h0, c0 = (rand(rng, s, np.float64) for s in [(T, I), (L * D, H), (L * D, H)])
    dout, dh_n = rand(rng, (T, D * H), np.float64), rand(rng, (L * D, H), np.float64)
    tx, th0, tc0 = (torch.from_numpy(a.copy()).requires_grad_() for a in (x, h0, c0))
    tout, tst = tm(tx, (th0, tc0) if lstm else th0)
    th_n = tst[0] if lstm else tst
    torch.autograd.backward([tout, th_n], [torch.from_numpy(dout), torch.from_numpy(dh_n)])
    out, st = m.forward(x, (h0, c0) if lstm else h0)
    assert out.shape == (T, D * H)
    close(out, tout.detach().numpy(), np.float64, "out")
    close(st[0] if lstm else st, th_n.detach().numpy(), np.float64, "h_n")
    dx, dst = m.backward(dout, (dh_n, np.zeros_like(dh_n)) if lstm else dh_n)
    close(dx, tx.grad.numpy(), np.float64, "dx")
    close(dst[0] if lstm else dst, th0.grad.numpy(), np.float64, "dh0")
    if lstm:
        close(dst[1], tc0.grad.numpy(), np.float64, "dc0")
    for (name, p), g in zip(tm.named_parameters(), m.gradients()):
        close(g, p.grad.numpy(), np.float64, name)
    m.forward(x)          # the backward above consumed the first forward
    with pytest.raises(ValueError, match="h0 has shape"):   # a failed call keeps the forward
        m.forward(x, (h0[:, None], c0[:, None]) if lstm else h0[:, None])
    m.backward(dout)


CELLS = [("LSTMCell", {}), ("GRUCell", {}), ("GRUCell", {"reset_after": False}),
         ("RNNCell", {"nonlinearity": "tanh"}), ("RNNCell", {"nonlinearity": "relu"})]


@pytest.mark.parametrize("kind,kw", CELLS)
def test_unbatched_cell_matches_torch_and_a_batch_of_one(torch, kind, kw):
    """x (I,) with states (H,), as torch takes it: stepped T times and then
    backpropagated newest first, against torch's cell with autograd and
    against the same cell fed a batch of one."""
    T, I, H = 4, 3, 5
    rng = np.random.default_rng(7)
    lstm = kind == "LSTMCell"
    m = getattr(fo, kind)(I, H, dtype=np.float64, seed=0, **kw)
    ones = getattr(fo, kind)(I, H, dtype=np.float64, seed=0, **kw)   # the batch-of-one twin
    xs = [rand(rng, (I,), np.float64) for _ in range(T)]
    dhs = [rand(rng, (H,), np.float64) for _ in range(T)]
    dc_T = rand(rng, (H,), np.float64)
    h0, c0 = rand(rng, (H,), np.float64), rand(rng, (H,), np.float64)

    def unroll(cell, batch):
        """outs, dxs, dh0, dc0 of T steps; batch: every array with a leading axis of one."""
        up = (lambda a: a[None]) if batch else (lambda a: a)
        h, c, outs = up(h0), up(c0), []
        for x in xs:
            if lstm:
                h, c = cell.forward(up(x), (h, c))
                outs.append((h, c))
            else:
                h = cell.forward(up(x), h)
                outs.append((h,))
        dh, dc, dxs = np.zeros_like(up(h0)), up(dc_T), []
        for t in reversed(range(T)):
            if lstm:
                dx, (dh, dc) = cell.backward(dh + up(dhs[t]), dc)
            else:
                dx, dh = cell.backward(dh + up(dhs[t]))
            dxs.append(dx)
        return outs, dxs[::-1], dh, dc

    outs, dxs, dh0, dc0 = unroll(m, False)
    for t in range(T):
        assert all(o.shape == (H,) for o in outs[t]) and dxs[t].shape == (I,)
    assert dh0.shape == (H,) and (not lstm or dc0.shape == (H,))
    b_outs, b_dxs, b_dh0, b_dc0 = unroll(ones, True)
    for t in range(T):      # the same numbers as a batch of one, bit for bit
        for o, bo in zip(outs[t], b_outs[t]):
            np.testing.assert_array_equal(o, bo[0])
        np.testing.assert_array_equal(dxs[t], b_dxs[t][0])
    np.testing.assert_array_equal(dh0, b_dh0[0])
    if lstm:
        np.testing.assert_array_equal(dc0, b_dc0[0])
    for g, bg in zip(m.gradients(), ones.gradients()):
        np.testing.assert_array_equal(g, bg)

    if "reset_after" in kw:             # torch has no GRU with the reset gate before
        return
    tm = getattr(torch.nn, kind)(I, H, **kw).double()
    copy_to_fastopt(tm, m)
    m.zero_grad()
    outs, dxs, dh0, dc0 = unroll(m, False)
    txs = [torch.from_numpy(x.copy()).requires_grad_() for x in xs]
    th0, tc0 = (torch.from_numpy(a.copy()).requires_grad_() for a in (h0, c0))
    touts, tc = torch_unroll(tm, txs, th0, tc0, lstm)
    assert all(th.shape == (H,) for th in touts)
    grads = [torch.from_numpy(d) for d in dhs]
    torch.autograd.backward(touts + ([tc] if lstm else []),
                            grads + ([torch.from_numpy(dc_T)] if lstm else []))
    for t in range(T):
        close(outs[t][0], touts[t].detach().numpy(), np.float64, f"h{t + 1}")
        close(dxs[t], txs[t].grad.numpy(), np.float64, f"dx{t}")
    if lstm:
        close(outs[-1][1], tc.detach().numpy(), np.float64, "c_T")
        close(dc0, tc0.grad.numpy(), np.float64, "dc0")
    close(dh0, th0.grad.numpy(), np.float64, "dh0")
    for (name, p), g in zip(tm.named_parameters(), m.gradients()):
        close(g, p.grad.numpy(), np.float64, name)


@pytest.mark.parametrize("kind", ["LSTMCell", "GRUCell", "RNNCell"])
def test_cell_refuses_mixed_unbatched_and_batched_states(torch, kind):
    """x 1-D with a 2-D state, or the reverse: ValueError naming the state (torch
    refuses both too), before anything is written; each step's backward takes
    the form of its own forward."""
    I, H = 3, 4
    lstm = kind == "LSTMCell"
    m = getattr(fo, kind)(I, H, dtype=np.float64, seed=0)
    tm = getattr(torch.nn, kind)(I, H).double()
    x1, x2 = np.zeros(I), np.zeros((2, I))
    h1, h2 = np.zeros(H), np.zeros((2, H))
    state = (lambda h, c: (h, c)) if lstm else (lambda h, c: h)
    t = torch.from_numpy
    for x, h, c, name in [(x1, h2, h1, "h0"), (x2, h1, h2, "h0"), (x1, h1, h2, "c0"),
                          (x2, h2, h1, "c0")]:
        if name == "c0" and not lstm:
            continue
        with pytest.raises((ValueError, RuntimeError)):      # torch refuses it too
            tm(t(x), state(t(h), t(c)))
        with pytest.raises(ValueError, match=f"{name} must be {x.ndim}-D"):
            m.forward(x, state(h, c))
        assert not m._steps                      # nothing saved
    with pytest.raises(ValueError, match="x must be 2-D .* or 1-D"):
        m.forward(np.zeros((1, 2, I)))
    m.forward(x2, state(h2, h2))                 # batched, then unbatched, steps
    m.forward(x1, state(h1, h1))
    with pytest.raises(ValueError, match="dh1 has shape"):   # the newest step is unbatched
        m.backward(h2)
    dx, dst = m.backward(h1, h1) if lstm else m.backward(h1)
    assert dx.shape == (I,) and (dst[0] if lstm else dst).shape == (H,)
    with pytest.raises(ValueError, match="dh1 has shape"):   # the next one is batched
        m.backward(h1)
    dx, dst = m.backward(h2, h2) if lstm else m.backward(h2)
    assert dx.shape == (2, I) and (dst[0] if lstm else dst).shape == (2, H)
    if lstm:
        m.forward(x1)
        with pytest.raises(ValueError, match="dc1 has shape"):
            m.backward(h1, h2)
        m.backward(h1, h1)


# ------------------------------------------------------- dropout between layers

@pytest.mark.parametrize("kind,bidirectional", [("LSTM", False), ("GRU", True),
                                                ("RNN", False)])
def test_dropout_between_layers_is_the_composition_of_its_parts(kind, bidirectional):
    """A 3-layer model with dropout equals, in training, layer 0, dropout with
    the layer's seed, layer 1, dropout, layer 2, each run on its own: outputs,
    final states, input and parameter gradients. Eval is the dropout-free
    model; each training forward draws a fresh mask."""
    T, B, I, H, L, p = 5, 4, 3, 6, 3, 0.4
    D = 2 if bidirectional else 1
    rng = np.random.default_rng(11)
    m = getattr(fo, kind)(I, H, num_layers=L, dropout=p, bidirectional=bidirectional,
                          dtype=np.float64, seed=3)
    parts = [getattr(fo, kind)(I if k == 0 else D * H, H, bidirectional=bidirectional,
                               dtype=np.float64) for k in range(L)]
    sd = m.state_dict()
    for k, part in enumerate(parts):
        part.load_state_dict({n.replace(f"_l{k}", "_l0"): v for n, v in sd.items()
                              if f"_l{k}" in n})
    x, dout = rand(rng, (T, B, I), np.float64), rand(rng, (T, B, D * H), np.float64)
    seeds = [d.seed for d in m._dropouts]
    assert len(seeds) == L - 1 and len(set(seeds)) == L - 1

    out, state = m.forward(x)
    dx, _ = m.backward(dout)
    y, masks, finals = x, [], []
    for k, part in enumerate(parts):
        y, st = part.forward(y)
        finals.append(st[0] if kind == "LSTM" else st)
        if k < L - 1:
            y, mask = fo.functional.dropout(y, p, seeds[k], offset=0)
            masks.append(mask)
            kept = np.unpackbits(mask, count=y.size, bitorder="little").mean()
            assert 0.35 < 1 - kept < 0.45          # the layer output really went through p
    np.testing.assert_allclose(out, y, rtol=1e-13, atol=1e-14)
    np.testing.assert_allclose(state[0] if kind == "LSTM" else state,
                               np.concatenate(finals), rtol=1e-13, atol=1e-14)
    d = dout
    for k in reversed(range(L)):
        if k < L - 1:
            d = fo.functional.dropout_backward(d, masks[k], p)
        d, _ = parts[k].backward(d)
    np.testing.assert_allclose(dx, d, rtol=1e-12, atol=1e-13)
    grads = [g for part in parts for g in part.gradients()]
    for g, ref in zip(m.gradients(), grads):
        np.testing.assert_allclose(g, ref, rtol=1e-12, atol=1e-13)

    out2, _ = m.forward(x)                       # a fresh mask per training forward
    assert not np.allclose(out2, out)
    m.eval()
    ref = getattr(fo, kind)(I, H, num_layers=L, bidirectional=bidirectional, dtype=np.float64)
    ref.load_state_dict(sd)
    np.testing.assert_array_equal(m.forward(x)[0], ref.forward(x)[0])


def test_dropout_eval_matches_torch(torch):
    tm = torch.nn.LSTM(3, 5, num_layers=2, dropout=0.5, bidirectional=True).double().eval()
    m = fo.LSTM(3, 5, num_layers=2, dropout=0.5, bidirectional=True, dtype=np.float64).eval()
    copy_to_fastopt(tm, m)
    x = rand(np.random.default_rng(2), (4, 2, 3), np.float64)
    with torch.no_grad():
        tout, _ = tm(torch.from_numpy(x))
    close(m.forward(x)[0], tout.numpy(), np.float64, "out")


def test_load_state_dict_that_does_not_fit_is_refused_whole():
    m = fo.LSTM(3, 4, num_layers=2, seed=0)
    before = m.state_dict()
    sd = {k: np.ones_like(v) for k, v in before.items()}
    bad_shape = dict(sd, weight_hh_l1=np.ones((16, 5), np.float32))
    with pytest.raises(ValueError, match="weight_hh_l1"):
        m.load_state_dict(bad_shape)
    missing = dict(sd)
    del missing["bias_ih_l1"]
    with pytest.raises(ValueError, match="bias_ih_l1"):
        m.load_state_dict(missing)
    with pytest.raises(ValueError, match="unexpected"):
        m.load_state_dict(dict(sd, weight_ih_l2=np.ones((16, 4), np.float32)))
    for k, v in m.state_dict().items():
        np.testing.assert_array_equal(v, before[k])
    params = m.parameters()
    m.load_state_dict(sd)
    assert all(a is b for a, b in zip(params, m.parameters()))   # loaded in place
    assert all((p == 1).all() for p in m.parameters())


def test_changing_returned_outputs_in_place_does_not_change_gradients():
    rng = np.random.default_rng(11)
    x, dout = rng.standard_normal((4, 2, 3)), rng.standard_normal((4, 2, 5))
    ref, changed = (fo.RNN(3, 5, dtype=np.float64, seed=0) for _ in range(2))
    out, _ = ref.forward(x)
    dx_ref, _ = ref.backward(dout)
    out, h_n = changed.forward(x)
    out *= 3.0
    h_n[:] = 0
    dx, _ = changed.backward(dout)
    np.testing.assert_array_equal(dx, dx_ref)
    cell = fo.LSTMCell(3, 5, dtype=np.float64, seed=0)
    h1, c1 = cell.forward(x[0])
    d_ref = cell.backward(dout[0], dout[1])
    h1, c1 = cell.forward(x[0])
    h1[:] = 7
    c1[:] = 7
    d = cell.backward(dout[0], dout[1])
    np.testing.assert_array_equal(d[0], d_ref[0])
    np.testing.assert_array_equal(d[1][0], d_ref[1][0])


def test_repr_names_sizes_and_non_default_options():
    assert repr(fo.LSTM(3, 4)) == "LSTM(3, 4)"
    assert repr(fo.LSTM(3, 4, num_layers=2, dropout=0.2, bidirectional=True)) == \
        "LSTM(3, 4, num_layers=2, dropout=0.2, bidirectional=True)"
    assert repr(fo.RNN(3, 4, nonlinearity="relu", dtype=np.float64)) == \
        "RNN(3, 4, nonlinearity='relu', dtype=float64)"
    assert repr(fo.GRUCell(3, 4, reset_after=False, bias=False)) == \
        "GRUCell(3, 4, bias=False, reset_after=False)"


# ------------------------------------------------------ variable lengths

LENGTHS = [3, 7, 1, 5, 3]    # unsorted, with a tie, one full-length, one of 1


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind,kw", [("LSTM", {}), ("GRU", {}), ("RNN", {"nonlinearity": "relu"}),
                                     ("GRU", {"reset_after": False})])
@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_lengths_equal_each_sequence_alone(dtype, kind, kw, num_layers, batch_first,
                                           bidirectional):
    """With lengths, sequence b gives what the layer gives for x[:len_b, b]
    alone (out zero past its length, state after its own last step), and
    backward the gradients of that sequence alone, summed over the batch for
    the parameters (no torch needed: the reference is the layer without
    lengths, tested against torch above)."""
    T, B, I, H = 7, len(LENGTHS), 4, 5
    D = 2 if bidirectional else 1
    rng = np.random.default_rng(1)
    m = getattr(fo, kind)(I, H, num_layers=num_layers, batch_first=batch_first,
                          bidirectional=bidirectional, dtype=dtype, seed=2, **kw)
    lstm = kind == "LSTM"
    x = rand(rng, (T, B, I), dtype)
    h0, c0 = rand(rng, (num_layers * D, B, H), dtype), rand(rng, (num_layers * D, B, H), dtype)
    dout = rand(rng, (T, B, D * H), dtype)
    dh_n, dc_n = (rand(rng, (num_layers * D, B, H), dtype),
                  rand(rng, (num_layers * D, B, H), dtype))
    bf = (lambda a: np.ascontiguousarray(a.transpose(1, 0, 2))) if batch_first else (lambda a: a)
    st = lambda h, c: (h, c) if lstm else h  # noqa: E731

    m.zero_grad()
    out, state = m.forward(bf(x), st(h0, c0), lengths=np.array(LENGTHS))
    dx, dstate = m.backward(bf(dout), st(dh_n, dc_n))
    grads = [g.copy() for g in m.gradients()]
    out, dx = bf(out), bf(dx)
    h_n, dh0 = (state[0], dstate[0]) if lstm else (state, dstate)

    want_grads = [np.zeros_like(g) for g in grads]
    for b, n in enumerate(LENGTHS):
        m.zero_grad()
        sl = lambda a: np.ascontiguousarray(a[:, b:b + 1])  # noqa: E731
        o, s = m.forward(bf(np.ascontiguousarray(x[:n, b:b + 1])), st(sl(h0), sl(c0)))
        d, ds = m.backward(bf(np.ascontiguousarray(dout[:n, b:b + 1])), st(sl(dh_n), sl(dc_n)))
        close(out[:n, b], bf(o)[:, 0], dtype, f"out of sequence {b}")
        assert not out[n:, b].any(), "out past the length is zero"
        close(dx[:n, b], bf(d)[:, 0], dtype, f"dx of sequence {b}")
        assert not dx[n:, b].any(), "dx past the length is zero"
        if lstm:
            close(state[1][:, b], s[1][:, 0], dtype, "c_n")
            close(dstate[1][:, b], ds[1][:, 0], dtype, "dc0")
            s, ds = s[0], ds[0]
        close(h_n[:, b], s[:, 0], dtype, f"h_n of sequence {b}")
        close(dh0[:, b], ds[:, 0], dtype, f"dh0 of sequence {b}")
        for w, g in zip(want_grads, m.gradients()):
            w += g
    for (name, _), g, w in zip(m.named_parameters(), grads, want_grads):
        close(g, w, dtype, name)


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_lengths_match_torch_packed_sequence(torch, kind, bidirectional):
    """Against torch's PackedSequence (enforce_sorted=False), padded back to T:
    out, state, dx, the initial-state and parameter gradients."""
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
    T, B, I, H, L = 7, len(LENGTHS), 4, 5, 2
    D = 2 if bidirectional else 1
    dtype = np.float64
    rng = np.random.default_rng(3)
    torch.manual_seed(0)
    tm = getattr(torch.nn, kind)(I, H, num_layers=L, bidirectional=bidirectional).double()
    m = getattr(fo, kind)(I, H, num_layers=L, bidirectional=bidirectional, dtype=dtype)
    copy_to_fastopt(tm, m)
    lstm = kind == "LSTM"
    x = rand(rng, (T, B, I), dtype)
    h0, c0 = rand(rng, (L * D, B, H), dtype), rand(rng, (L * D, B, H), dtype)
    dout = rand(rng, (T, B, D * H), dtype)
    dh_n, dc_n = rand(rng, (L * D, B, H), dtype), rand(rng, (L * D, B, H), dtype)

    tx = torch.from_numpy(x).requires_grad_()
    th0, tc0 = torch.from_numpy(h0).requires_grad_(), torch.from_numpy(c0).requires_grad_()
    packed = pack_padded_sequence(tx, torch.tensor(LENGTHS), enforce_sorted=False)
    tpacked, tstate = tm(packed, (th0, tc0) if lstm else th0)
    tout, _ = pad_packed_sequence(tpacked, total_length=T)
    outs = [tout] + (list(tstate) if lstm else [tstate])
    grads = [torch.from_numpy(dout), torch.from_numpy(dh_n)] + (
        [torch.from_numpy(dc_n)] if lstm else [])
    torch.autograd.backward(outs, grads)

    out, state = m.forward(x, (h0, c0) if lstm else h0, lengths=LENGTHS)
    dx, dstate = m.backward(dout, (dh_n, dc_n) if lstm else dh_n)
    close(out, tout.detach().numpy(), dtype, "out")
    close(dx, tx.grad.numpy(), dtype, "dx")
    if lstm:
        close(state[1], tstate[1].detach().numpy(), dtype, "c_n")
        close(dstate[1], tc0.grad.numpy(), dtype, "dc0")
        state, dstate, tstate = state[0], dstate[0], tstate[0]
    close(state, tstate.detach().numpy(), dtype, "h_n")
    close(dstate, th0.grad.numpy(), dtype, "dh0")
    for (name, p), g in zip(tm.named_parameters(), m.gradients()):
        close(g, p.grad.numpy(), dtype, name)


def test_full_lengths_equal_no_lengths_and_bad_lengths_are_refused():
    T, B = 4, 3
    m = fo.LSTM(2, 3, bidirectional=True, seed=0)
    x = np.random.default_rng(0).standard_normal((T, B, 2)).astype(np.float32)
    out, (h, c) = m.forward(x)
    out2, (h2, c2) = m.forward(x, lengths=[T] * B)
    np.testing.assert_array_equal(out, out2)
    np.testing.assert_array_equal(h, h2)
    np.testing.assert_array_equal(c, c2)
    for bad, err in [([0, 1, 2], ValueError), ([1, 2, 5], ValueError), ([1, 2], ValueError),
                     ([1.0, 2.0, 3.0], TypeError)]:
        with pytest.raises(err, match="lengths"):
            m.forward(x, lengths=bad)
    with pytest.raises(ValueError, match="lengths"):
        m.forward(x[:, 0], lengths=[T])
    out, _ = m.forward(x[:, :0], lengths=np.zeros(0, np.int64))   # an empty batch
    assert out.shape == (T, 0, 6)
    dx, _ = m.backward(np.zeros((T, 0, 6), np.float32))
    assert dx.shape == (T, 0, 2)


# ------------------------------------------------------- LSTM projections

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("lengths", [None, LENGTHS])
@pytest.mark.filterwarnings("ignore:LSTM with projections")
def test_lstm_proj_size_matches_torch(torch, step_products, dtype, num_layers, batch_first,
                                      bidirectional, lengths):
    """LSTM(proj_size=P): h = W_hr (o*tanh(c)), out and h of width P, c of
    width H; every output and gradient (weight_hr's included) against torch,
    also with sequences of different lengths (a PackedSequence in torch)."""
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
    T, B, I, H, P = 7, len(LENGTHS), 4, 6, 3
    D, L = (2 if bidirectional else 1), num_layers
    rng = np.random.default_rng(6)
    torch.manual_seed(1)
    tm = torch.nn.LSTM(I, H, num_layers=L, batch_first=batch_first, bidirectional=bidirectional,
                       proj_size=P).to(torch_dtype(torch, dtype))
    m = fo.LSTM(I, H, num_layers=L, batch_first=batch_first, bidirectional=bidirectional,
                proj_size=P, dtype=dtype)
    assert [(k, p.shape) for k, p in m.named_parameters()] == \
        [(k, tuple(p.shape)) for k, p in tm.named_parameters()]
    copy_to_fastopt(tm, m)
    x = rand(rng, (B, T, I) if batch_first else (T, B, I), dtype)
    h0, c0 = rand(rng, (L * D, B, P), dtype), rand(rng, (L * D, B, H), dtype)
    dout = rand(rng, x.shape[:2] + (D * P,), dtype)
    dh_n, dc_n = rand(rng, (L * D, B, P), dtype), rand(rng, (L * D, B, H), dtype)

    tx = torch.from_numpy(x).requires_grad_()
    th0, tc0 = torch.from_numpy(h0).requires_grad_(), torch.from_numpy(c0).requires_grad_()
    if lengths is None:
        tout, (th_n, tc_n) = tm(tx, (th0, tc0))
    else:
        packed = pack_padded_sequence(tx, torch.tensor(lengths), batch_first=batch_first,
                                      enforce_sorted=False)
        tpacked, (th_n, tc_n) = tm(packed, (th0, tc0))
        tout, _ = pad_packed_sequence(tpacked, batch_first=batch_first, total_length=T)
    torch.autograd.backward([tout, th_n, tc_n], [torch.from_numpy(a) for a in (dout, dh_n, dc_n)])

    out, (h_n, c_n) = m.forward(x, (h0, c0), lengths=lengths)
    dx, (dh0, dc0) = m.backward(dout, (dh_n, dc_n))
    close(out, tout.detach().numpy(), dtype, "out")
    close(h_n, th_n.detach().numpy(), dtype, "h_n")
    close(c_n, tc_n.detach().numpy(), dtype, "c_n")
    close(dx, tx.grad.numpy(), dtype, "dx")
    close(dh0, th0.grad.numpy(), dtype, "dh0")
    close(dc0, tc0.grad.numpy(), dtype, "dc0")
    for (name, p), g in zip(tm.named_parameters(), m.gradients()):
        close(g, p.grad.numpy(), dtype, name)


def test_lstm_proj_size_gradients_match_finite_differences():
    T, B, I, H, P, L = 3, 2, 3, 4, 2, 2
    rng = np.random.default_rng(7)
    m = fo.LSTM(I, H, num_layers=L, bidirectional=True, proj_size=P, dtype=np.float64, seed=8)
    x = rng.standard_normal((T, B, I))
    h0, c0 = rng.standard_normal((2 * L, B, P)), rng.standard_normal((2 * L, B, H))
    dout, dh_n, dc_n = (rng.standard_normal(s)
                        for s in [(T, B, 2 * P), (2 * L, B, P), (2 * L, B, H)])

    def loss():
        out, (h, c) = m.forward(x, (h0, c0))
        return np.sum(out * dout) + np.sum(h * dh_n) + np.sum(c * dc_n)

    loss()
    m.zero_grad()
    dx, (dh0, dc0) = m.backward(dout, (dh_n, dc_n))
    checks = [(x, dx, "x"), (h0, dh0, "h0"), (c0, dc0, "c0")]
    checks += [(p, g, name) for (name, p), g in zip(m.named_parameters(), m.gradients())]
    for arr, grad, name in checks:
        np.testing.assert_allclose(grad, central_differences(loss, arr), rtol=1e-6, atol=1e-8,
                                   err_msg=name)


def test_bad_proj_size_is_refused():
    for bad in (4, 5, -1):
        with pytest.raises(ValueError, match="proj_size"):
            fo.LSTM(3, 4, proj_size=bad)
    with pytest.raises(TypeError):
        fo.GRU(3, 4, proj_size=2)
    m = fo.LSTM(3, 4, proj_size=2)
    assert "proj_size=2" in repr(m)
    x = np.zeros((2, 1, 3), np.float32)
    with pytest.raises(ValueError, match="h0"):
        m.forward(x, (np.zeros((1, 1, 4), np.float32), np.zeros((1, 1, 4), np.float32)))


# ---------------------------------------------- bad input: the audit's defects

def _binding_buffers(T, B, I, H, dtype=np.float32):
    """Weights and forward buffers of a one-gate (rnn_tanh) RnnLayerCall."""
    rng = np.random.default_rng(0)
    return dict(w_ih=rand(rng, (H, I), dtype), w_hh=rand(rng, (H, H), dtype),
                x=rand(rng, (T, B, I), dtype), out=np.zeros((T, B, H), dtype),
                gates=np.zeros((T, B, H), dtype))


def _call(T, B, I, H, b):
    return fo._fastopt.RnnLayerCall("rnn_tanh", T, B, I, H, b["w_ih"], b["w_hh"], None, None,
                                    b["x"], None, None, b["out"], None, b["gates"], None)


def test_binding_refuses_negative_and_overflowing_sizes():
    """seq_len*batch = 2^32*2^32 wraps to 0 in int64: empty buffers passed the
    size checks and forward wrote out of bounds (a segfault)."""
    z = lambda n: np.zeros(n, np.float32)
    cases = [((2 ** 32, 2 ** 32, 1, 1), ValueError, "seq_len"),
             ((1, -1, 1, 1), ValueError, "batch"),
             ((-1, 1, 1, 1), ValueError, "seq_len"),
             ((2 ** 16, 2 ** 16, 1, 1), ValueError, r"seq_len \* batch"),
             ((1, 1, 2 ** 31, 1), ValueError, "input_size"),
             ((1, 1, 1, 2 ** 63), ValueError, "hidden_size"),
             ((1.0, 1, 1, 1), TypeError, "seq_len")]
    for (T, B, I, H), exc, name in cases:
        with pytest.raises(exc, match=name):
            fo._fastopt.RnnLayerCall("rnn_tanh", T, B, I, H, z(1), z(1), None, None, z(0),
                                     None, None, z(0), None, z(0), None)
    with pytest.raises(ValueError, match="hidden_size"):   # 4 gates * 2^30 rows
        fo._fastopt.RnnLayerCall("lstm", 1, 1, 1, 2 ** 30, z(1), z(1), None, None, z(0),
                                 None, None, z(0), z(0), z(0), None)


def test_binding_refuses_overlaps_and_backward_before_forward():
    T, B, I, H = 3, 2, 4, 4
    b = _binding_buffers(T, B, I, H)
    x0 = b["x"].copy()
    with pytest.raises(ValueError, match="out shares memory with x"):
        _call(T, B, I, H, dict(b, out=b["x"]))
    with pytest.raises(ValueError, match="out and gates share memory"):
        _call(T, B, I, H, dict(b, gates=b["out"]))
    buf = np.zeros(H * H + T * B * H, np.float32)   # gates' first element is w_hh's last
    w_hh, gates = buf[:H * H].reshape(H, H), buf[H * H - 1:-1].reshape(T, B, H)
    w_hh[...] = b["w_hh"]
    with pytest.raises(ValueError, match="gates shares memory with w_hh"):
        _call(T, B, I, H, dict(b, w_hh=w_hh, gates=gates))
    np.testing.assert_array_equal(w_hh, b["w_hh"])
    grads = [np.zeros((H, I), np.float32), np.zeros((H, H), np.float32)]
    dgates = np.zeros((T, B, H), np.float32)
    call = _call(T, B, I, H, b)
    dout = np.ones((T, B, H), np.float32)
    with pytest.raises(ValueError, match="forward"):   # the saved buffers are not filled yet
        call.backward(dout, None, None, None, None, None, *grads, None, None, dgates, None)
    assert all((g == 0).all() for g in grads)
    call.forward()
    with pytest.raises(ValueError, match="dx shares memory with x"):
        call.backward(dout, None, None, b["x"], None, None, *grads, None, None, dgates, None)
    with pytest.raises(ValueError, match="dgates shares memory with gates"):
        call.backward(dout, None, None, None, None, None, *grads, None, None, b["gates"], None)
    with pytest.raises(ValueError, match="dw_ih shares memory with dout"):
        call.backward(dout, None, None, None, None, None, dout.reshape(-1)[:H * I].reshape(H, I),
                      grads[1], None, None, dgates, None)
    np.testing.assert_array_equal(b["x"], x0)
    assert all((g == 0).all() for g in grads)
    call.backward(dout, None, None, None, None, None, *grads, None, None, dgates, None)
    assert any((g != 0).any() for g in grads)


@pytest.mark.parametrize("mode", ["rnn_relu", "lstm", "gru", "gru_reset_before"])
def test_binding_takes_gate_gradient_rows_wider_than_the_gates(mode):
    """backward's dgates (and GRU's dgates_hh) may have rows wider than G*H,
    as the layers allocate them where G*H rows would be 4 KiB apart: the same
    gradients as with rows of G*H; narrower rows, or dgates_hh rows of another
    width, are refused."""
    T, B, I, H = 3, 2, 4, 5
    G = {"rnn_relu": 1, "lstm": 4, "gru": 3, "gru_reset_before": 3}[mode]
    rng = np.random.default_rng(6)
    w_ih, w_hh = rand(rng, (G * H, I), np.float64), rand(rng, (G * H, H), np.float64)
    b_ih, b_hh = rand(rng, G * H, np.float64), rand(rng, G * H, np.float64)
    x, h0, c0 = (rand(rng, s, np.float64) for s in ((T, B, I), (B, H), (B, H)))
    dout, dh_n = rand(rng, (T, B, H), np.float64), rand(rng, (B, H), np.float64)

    def gradients(width, hh_width=None):
        lstm, gru = mode == "lstm", G == 3
        buf = lambda *s: np.zeros(s, np.float64)
        call = fo._fastopt.RnnLayerCall(
            mode, T, B, I, H, w_ih, w_hh, b_ih, b_hh, x, h0, c0 if lstm else None,
            buf(T, B, H), buf(T, B, H) if lstm else None, buf(T, B, G * H),
            buf(T, B, H) if gru else None)
        call.forward()
        grads = [buf(T, B, I), buf(B, H), buf(B, H) if lstm else None,
                 buf(G * H, I), buf(G * H, H), buf(G * H), buf(G * H)]
        dgates = np.full((T, B, width), np.nan)
        dgates_hh = np.full((T, B, hh_width or width), np.nan) if mode == "gru" else None
        call.backward(dout, dh_n, None, *grads, dgates, dgates_hh)
        return [g for g in grads if g is not None]

    tight = gradients(G * H)
    for got, want in zip(gradients(G * H + 5), tight):
        close(got, want, np.float64, "wide rows")
    with pytest.raises(ValueError, match="dgates must have rows of at least"):
        gradients(G * H - 1)
    if mode == "gru":
        with pytest.raises(ValueError, match="dgates_hh must have dgates' row width"):
            gradients(G * H + 5, G * H)


@pytest.mark.parametrize("make", [lambda: fo.GRU(4, 4, num_layers=2, seed=0),
                                  lambda: fo.LSTM(4, 4, seed=0), lambda: fo.GRUCell(4, 4, seed=0),
                                  lambda: fo.LSTMCell(4, 4, seed=0)])
def test_load_state_dict_takes_values_that_alias_the_params(make):
    """Values that are the layer's own params, swapped: each must land whole
    (a one-by-one copy overwrote weight_ih before it was read into weight_hh)."""
    m = make()
    params = dict(m.named_parameters())
    before = {k: v.copy() for k, v in params.items()}
    ih, hh = [k for k in params if k.startswith("weight_ih")][0], \
        [k for k in params if k.startswith("weight_hh")][0]
    bi, bh = [k for k in params if k.startswith("bias_ih")][0], \
        [k for k in params if k.startswith("bias_hh")][0]
    sd = dict(params)
    sd[ih], sd[hh] = params[hh], params[ih]
    sd[bi], sd[bh] = params[bh][::-1], params[bi]     # a reversed view, too
    m.load_state_dict(sd)
    np.testing.assert_array_equal(params[ih], before[hh])
    np.testing.assert_array_equal(params[hh], before[ih])
    np.testing.assert_array_equal(params[bi], before[bh][::-1])
    np.testing.assert_array_equal(params[bh], before[bi])
    assert all(a is b for a, b in zip(params.values(), m.parameters()))   # in place


@pytest.mark.parametrize("make", [lambda d: fo.GRU(2, 3, dtype=d, seed=0),
                                  lambda d: fo.LSTMCell(2, 3, dtype=d, seed=0)])
def test_load_state_dict_refuses_another_dtype_whole(make):
    """No silent casts: float64 values into a float32 layer (and the reverse)
    are refused by key, before anything is written."""
    for dtype, other in [(np.float32, np.float64), (np.float64, np.float32)]:
        m = make(dtype)
        before = m.state_dict()
        sd = {k: np.ones_like(v) for k, v in before.items()}
        last = list(sd)[-1]
        sd[last] = sd[last].astype(other)        # only the last entry is wrong
        with pytest.raises(TypeError, match=f"{last}.*{np.dtype(other).name}"):
            m.load_state_dict(sd)
        for k, v in m.state_dict().items():
            np.testing.assert_array_equal(v, before[k])
        m.load_state_dict({k: np.ones_like(v) for k, v in before.items()})
        assert all((p == 1).all() for p in m.parameters())


def test_load_state_dict_takes_a_float32_torch_state_dict(torch):
    tm = torch.nn.LSTM(3, 4)                     # torch's default dtype: float32
    m = fo.LSTM(3, 4)
    m.load_state_dict(tm.state_dict())
    for (k, p), (tk, tp) in zip(m.named_parameters(), tm.named_parameters()):
        assert k == tk
        np.testing.assert_array_equal(p, tp.detach().numpy())


def test_torch_tensor_requiring_grad_is_refused_by_name(torch):
    """torch's .numpy() raises RuntimeError for such a tensor: a TypeError
    naming the argument instead (detaching silently would hide the cut)."""
    t = lambda *shape: torch.zeros(*shape, requires_grad=True)
    m = fo.LSTM(3, 4, seed=0)
    before = [p.copy() for p in m.parameters()]
    with pytest.raises(TypeError, match=r"x .*x\.detach\(\)"):
        m.forward(t(2, 1, 3))
    with pytest.raises(TypeError, match=r"x .*x\.detach\(\)"):
        m.forward(t(2, 3))                       # unbatched
    with pytest.raises(TypeError, match=r"h0 .*h0\.detach\(\)"):
        m.forward(np.zeros((2, 1, 3), np.float32), (t(1, 1, 4), np.zeros((1, 1, 4), np.float32)))
    out, _ = m.forward(t(2, 1, 3).detach().numpy())
    with pytest.raises(TypeError, match=r"dout .*detach"):
        m.backward(t(2, 1, 4))
    m.backward(out)                              # the refused call kept the forward
    for p, p0 in zip(m.parameters(), before):
        np.testing.assert_array_equal(p, p0)
    cell = fo.GRUCell(3, 4)
    with pytest.raises(TypeError, match=r"x .*x\.detach\(\)"):
        cell.forward(t(2, 3))
    with pytest.raises(TypeError, match=r"h0 .*h0\.detach\(\)"):
        cell.forward(np.zeros((2, 3), np.float32), t(2, 4))
    cell.forward(np.zeros((2, 3), np.float32))
    with pytest.raises(TypeError, match=r"dh1 .*detach"):
        cell.backward(t(2, 4))
    cell.backward(np.zeros((2, 4), np.float32))
    # without requires_grad a CPU tensor is read through its buffer, as before
    y = m.forward(torch.zeros(2, 1, 3))[0]
    assert y.shape == (2, 1, 4)


def test_huge_negative_and_non_integer_sizes_are_refused():
    """RNN(4, 2**40) raised MemoryError; sizes beyond the BLAS's 32-bit limit
    or that cannot be allocated are a ValueError naming the size."""
    for args, exc, name in [((4, 2 ** 40), ValueError, "hidden_size"),
                            ((4, -1), ValueError, "hidden_size"),
                            ((2 ** 31, 4), ValueError, "input_size"),
                            ((4, 4.0), TypeError, "hidden_size"),
                            ((4, "4"), TypeError, "hidden_size"),
                            ((2 ** 30, 2 ** 29), ValueError, "hidden_size")]:
        for cls in (fo.RNN, fo.LSTM, fo.GRUCell):
            with pytest.raises(exc, match=name):
                cls(*args)
    with pytest.raises(ValueError, match="hidden_size"):    # 4 gates * 2^29 >= 2^31
        fo.LSTM(4, 2 ** 29)


def test_backward_messages_name_dstate():
    m = fo.LSTM(3, 4, num_layers=2, seed=0)
    out, _ = m.forward(np.zeros((5, 2, 3), np.float32))
    before = [g.copy() for g in m.gradients()]
    good = np.zeros((2, 2, 4), np.float32)
    with pytest.raises(ValueError, match="dh_n has shape"):
        m.backward(out, (np.zeros((2, 1, 4), np.float32), good))
    with pytest.raises(ValueError, match="dc_n has shape"):
        m.backward(out, (good, np.zeros((2, 1, 4), np.float32)))
    with pytest.raises(TypeError, match="dc_n must have dtype"):
        m.backward(out, (good, good.astype(np.float64)))
    with pytest.raises(TypeError, match=r"dstate must be a tuple \(dh_n, dc_n\)"):
        m.backward(out, good)
    for g, g0 in zip(m.gradients(), before):
        np.testing.assert_array_equal(g, g0)
    m.backward(out, (good, good))                # the refused calls kept the forward
    gru = fo.GRU(3, 4)
    out, _ = gru.forward(np.zeros((5, 3), np.float32))    # unbatched
    with pytest.raises(ValueError, match="dh_n has shape"):
        gru.backward(out, np.zeros((1, 5), np.float32))
    gru.backward(out, np.zeros((1, 4), np.float32))
    for layer in (m, fo.RNNCell(3, 4)):
        with pytest.raises(TypeError, match="state_dict must be a mapping"):
            layer.load_state_dict(None)
        with pytest.raises(TypeError, match="state_dict must be a mapping"):
            layer.load_state_dict(list(layer.state_dict().items()))


@pytest.mark.parametrize("kind,kw", KINDS)
@pytest.mark.parametrize("unbatched", [False, True])
def test_second_backward_of_one_forward_is_refused(kind, kw, unbatched):
    """As torch without retain_graph: each forward is backpropagated once (a
    second backward added the parameter gradients again)."""
    m = getattr(fo, kind)(3, 4, num_layers=2, bidirectional=True, dtype=np.float64, seed=0, **kw)
    x = np.random.default_rng(0).standard_normal((5, 3) if unbatched else (5, 2, 3))
    out, _ = m.forward(x)
    with pytest.raises(ValueError, match="dout has shape"):   # refused: not consumed
        m.backward(out[:1])
    dx, _ = m.backward(np.ones_like(out))
    once = [g.copy() for g in m.gradients()]
    with pytest.raises(ValueError, match="forward"):
        m.backward(np.ones_like(out))
    for g, g1 in zip(m.gradients(), once):
        np.testing.assert_array_equal(g, g1)
    m.forward(x)
    dx2, _ = m.backward(np.ones_like(out))       # a new forward: backward again
    np.testing.assert_array_equal(dx2, dx)
    for g, g1 in zip(m.gradients(), once):
        np.testing.assert_allclose(g, 2 * g1, rtol=1e-14)


@pytest.mark.parametrize("cls", [fo.LSTM, fo.GRUCell])
def test_train_mode_must_be_a_bool(cls):
    m = cls(3, 4)
    with pytest.raises(TypeError, match="mode must be a bool"):
        m.train("no")
    assert m.training is True
    assert m.train(np.bool_(False)).training is False


@pytest.mark.parametrize("cls,kw", [(fo.LSTM, {"batch_first": "no"}), (fo.GRU, {"bias": "no"}),
                                    (fo.RNN, {"bidirectional": 1}),
                                    (fo.GRUCell, {"reset_after": "x"})])
def test_flags_must_be_bools(cls, kw):
    # "no" is truthy: bool() would have turned it into True
    name = next(iter(kw))
    with pytest.raises(TypeError, match=f"{name} must be a bool"):
        cls(3, 4, **kw)


# ------------------------------------------------- bad input: audit 3's defects

def _twins(make):
    """Two layers built alike: one to misuse, one as the reference."""
    return make(), make()


def _assert_same_backward(m, ref, dout):
    """m's saved forward backpropagates as ref's (the same forward) does."""
    np.testing.assert_array_equal(m.backward(dout)[0], ref.backward(dout)[0])   # dx
    for g, rg in zip(m.gradients(), ref.gradients()):
        np.testing.assert_array_equal(g, rg)


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_edited_dropout_is_read_at_each_forward(kind):
    """torch reads .dropout at every forward; fastopt built its Dropouts once,
    so 0 -> 0.5 raised IndexError mid-forward (after discarding the last
    forward), 0.2 -> 0.9 kept 0.2, and "0.5" gave an unnamed TypeError."""
    x = np.random.default_rng(0).standard_normal((6, 3, 5)).astype(np.float32)
    make = lambda p: getattr(fo, kind)(5, 40, num_layers=3, dropout=p, seed=0)
    for built, edited in [(0.0, 0.5), (0.2, 0.9), (0.5, 0.0)]:
        m, ref = make(built), make(edited)
        m.dropout = edited
        out, _ = m.forward(x)
        np.testing.assert_array_equal(out, ref.forward(x)[0])   # as if built with it
        if edited:
            assert [d.p for d in m._dropouts] == [edited, edited]
        _assert_same_backward(m, ref, np.ones_like(out))
    m, ref = _twins(lambda: make(0.2))
    out, _ = m.forward(x)
    ref.forward(x)
    offsets = [d.offset for d in m._dropouts]
    for bad, exc in [("0.5", TypeError), (None, TypeError), (1.5, ValueError),
                     (float("nan"), ValueError)]:
        m.dropout = bad
        with pytest.raises(exc, match="^dropout must be"):
            m.forward(x)
        assert [d.offset for d in m._dropouts] == offsets
    m.dropout = 0.2
    _assert_same_backward(m, ref, np.ones_like(out))   # the refused calls kept the forward
    np.testing.assert_array_equal(m.eval().forward(x)[0], ref.eval().forward(x)[0])


@pytest.mark.parametrize("make,attr,value,exc", [
    (lambda: fo.LSTM(4, 5, num_layers=2, dropout=0.5, seed=0), "training", "no", TypeError),
    (lambda: fo.GRU(4, 5, seed=0), "batch_first", "no", TypeError),
    (lambda: fo.GRU(4, 5, seed=0), "batch_first", 1, TypeError),
    (lambda: fo.RNN(4, 5, seed=0), "bidirectional", "no", TypeError),
    (lambda: fo.RNN(4, 5, seed=0), "bidirectional", True, ValueError),
    (lambda: fo.LSTM(4, 5, seed=0), "bias", False, ValueError),
    (lambda: fo.GRU(4, 5, seed=0), "reset_after", False, ValueError),
    (lambda: fo.RNN(4, 5, seed=0), "nonlinearity", "relu", ValueError),
    (lambda: fo.GRUCell(4, 5, seed=0), "training", "no", TypeError),
    (lambda: fo.LSTMCell(4, 5, seed=0), "bias", "no", TypeError),
    (lambda: fo.GRUCell(4, 5, seed=0), "reset_after", False, ValueError),
    (lambda: fo.RNNCell(4, 5, seed=0), "nonlinearity", "relu", ValueError)])
def test_edited_flags_are_checked_at_forward(make, attr, value, exc):
    """A flag edited after __init__ was read with bool() ("no" is truthy:
    dropout on, batch-first layout) or not at all (bias, bidirectional,
    reset_after, nonlinearity: the weights stayed as built). Each must be a
    real bool, and those the weights are built for unchanged."""
    m, ref = _twins(make)
    cell = type(m).__name__.endswith("Cell")
    x = np.random.default_rng(0).standard_normal((2, 4) if cell else (3, 2, 4))
    x = x.astype(np.float32)
    first = m.forward(x)
    ref.forward(x)
    setattr(m, attr, value)
    with pytest.raises(exc, match=f"^{attr} (must be a bool|cannot be changed)"):
        m.forward(x)
    setattr(m, attr, getattr(ref, attr))
    dout = np.ones((2, 5), np.float32) if cell else np.ones_like(first[0])
    _assert_same_backward(m, ref, dout)          # the refused call kept (or saved) nothing
    if cell:
        assert not m._steps


def test_backward_takes_the_layout_of_its_forward():
    """batch_first edited between forward and backward: backward reads dout
    in the layout its forward produced."""
    m, ref = _twins(lambda: fo.LSTM(4, 5, num_layers=2, seed=0))
    x = np.random.default_rng(0).standard_normal((3, 2, 4)).astype(np.float32)
    out, _ = m.forward(x)
    ref.forward(x)
    m.batch_first = True
    _assert_same_backward(m, ref, np.ones_like(out))


def test_refused_forward_leaves_the_layer_as_it_was():
    """A sequence forward cleared its saved context (and advanced the dropout
    offsets) before a later layer's C call refused its arguments: every
    layer is now checked before the first one writes."""
    x = np.random.default_rng(0).standard_normal((4, 3, 5)).astype(np.float32)
    m, ref = _twins(lambda: fo.LSTM(5, 6, num_layers=3, dropout=0.5, bidirectional=True,
                                    seed=0))
    out, _ = m.forward(x)
    ref.forward(x)
    offsets = [d.offset for d in m._dropouts]
    w = m._params
    for target, name, value, msg in [
            (m.__dict__, "hidden_size", 7, "hidden_size cannot be changed"),
            (m.__dict__, "num_layers", 2, "num_layers cannot be changed"),
            (w, "weight_ih_l1", w["weight_ih_l1"][:, :6], "w_ih must be C-contiguous"),
            (w, "weight_hh_l2_reverse", w["weight_hh_l2_reverse"].astype(np.float64),
             "w_hh must have dtype float32"),
            (w, "bias_hh_l1", None, "b_ih and b_hh must both be given")]:
        kept, target[name] = target[name], value
        with pytest.raises((TypeError, ValueError), match=msg):
            m.forward(x)
        target[name] = kept
        assert [d.offset for d in m._dropouts] == offsets
    unaligned = np.frombuffer(bytearray(x.nbytes + 1), np.uint8)[1:].view(np.float32)
    unaligned = unaligned.reshape(x.shape)
    unaligned[...] = x
    with pytest.raises(ValueError, match="x must be aligned"):
        m.forward(unaligned)
    _assert_same_backward(m, ref, np.ones_like(out))


def test_conversion_errors_name_the_argument(torch):
    """np.asarray's own errors escaped: RuntimeError for a conjugated tensor,
    NotImplementedError for a meta tensor, messages naming no argument for
    bfloat16 tensors and ragged lists."""
    gru = fo.GRU(3, 2, seed=0)
    x = np.ones((2, 1, 3), np.float32)
    out, _ = gru.forward(x)
    cell = fo.GRUCell(3, 2)
    cell.forward(np.ones((1, 3), np.float32))
    bf16 = lambda *shape: torch.ones(*shape, dtype=torch.bfloat16)
    for name, call in [
            ("x", lambda: gru.forward(bf16(2, 1, 3))),
            ("x", lambda: gru.forward([[[1.0, 2.0, 3.0]], [[1.0]]])),
            ("h0", lambda: gru.forward(x, torch.ones(1, 1, 2, dtype=torch.complex64).conj())),
            ("lengths", lambda: gru.forward(x, lengths=torch.ones(1, dtype=torch.int64,
                                                                  device="meta"))),
            ("lengths", lambda: gru.forward(x, lengths=[[1], [1, 2]])),
            ("dout", lambda: gru.backward(bf16(2, 1, 2))),
            ("dh_n", lambda: gru.backward(out, bf16(1, 1, 2))),
            ("x", lambda: cell.forward(bf16(1, 3))),
            ("dh1", lambda: cell.backward(bf16(1, 2)))]:
        with pytest.raises(TypeError, match=f"^{name} cannot be read as an array"):
            call()
    gru.backward(out)                            # the refused calls kept the forward
    cell.backward(np.ones((1, 2), np.float32))


def test_load_state_dict_conversion_errors_name_the_key(torch):
    """A value that cannot become an array gave torch's or NumPy's error,
    naming no key (a meta tensor: NotImplementedError)."""
    m = fo.RNN(3, 2, seed=0)
    before = m.state_dict()
    sd = torch.nn.RNN(3, 2).state_dict()
    for bad in [sd["weight_ih_l0"].bfloat16(), torch.empty(2, 3, device="meta"),
                [[1.0], [1.0, 2.0]]]:
        with pytest.raises(TypeError, match=r"^state_dict\['weight_ih_l0'\] cannot be read"):
            m.load_state_dict({**sd, "weight_ih_l0": bad})
        for k, v in m.state_dict().items():
            np.testing.assert_array_equal(v, before[k])
    m.load_state_dict({k: v.requires_grad_() for k, v in sd.items()})   # copied: allowed


def test_set_blas_takes_a_str_subclass():
    """set_blas(np.str_('scipy')) passed set_blas's own check and was then
    refused by the binding's exact-str argument."""
    previous = fo.get_blas()
    try:
        assert fo.set_blas(np.str_("scipy")) == "scipy"
        assert type(fo.get_blas()) is str
        with pytest.raises(TypeError, match="^name must be a str"):
            fo.set_blas(1)
        with pytest.raises(ValueError, match="^blas must be"):
            fo.set_blas("cublas")
    finally:
        fo.set_blas(previous)


def run_in_fresh_process(code, blas):
    """Run `code` in a new Python (scipy's BLAS not loaded yet, no thread
    limits from the environment) once `blas` is known to load; its stdout."""
    import subprocess
    import sys
    with using_blas(blas):    # skips (or fails in CI) when the provider is missing
        pass
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    env.pop("OPENBLAS_NUM_THREADS", None)
    env.pop("OMP_NUM_THREADS", None)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.mark.parametrize("blas", ["scipy", "dnnl"])
def test_scipy_blas_is_loaded_at_the_first_product_not_at_import(blas):
    """import fastopt leaves scipy.linalg unimported (over half of 227 ms here);
    the first layer call on scipy's BLAS (or on dnnl's float64 fallback to it)
    loads it and matches a NumPy product, in a fresh process."""
    code = (
        "import sys, numpy as np, fastopt as fo\n"
        "assert 'scipy.linalg' not in sys.modules, 'imported at import'\n"
        f"fo.set_blas({blas!r})\n"
        "rng = np.random.default_rng(0)\n"
        "cell = fo.RNNCell(3, 4, dtype=np.float64)\n"
        "x, h = rng.standard_normal((2, 3)), rng.standard_normal((2, 4))\n"
        "w_ih, w_hh, b_ih, b_hh = cell.parameters()\n"
        "want = np.tanh(x @ w_ih.T + b_ih + h @ w_hh.T + b_hh)\n"
        "np.testing.assert_allclose(cell.forward(x, h), want, rtol=1e-12)\n"
        "assert 'scipy.linalg' in sys.modules\n")
    run_in_fresh_process(code, blas)


@pytest.mark.parametrize("blas", ["scipy", "dnnl"])
def test_one_thread_means_one_core_when_scipy_blas_loads_late(blas):
    """fastopt.set_num_threads(1) holds scipy's OpenBLAS at one thread too,
    though that library is loaded only at the first product (it was left at
    its own pool of every core: 2x the CPU time at 1 thread, 3-5x slower
    layers at 2). A fresh process; float64 goes to scipy for both providers.
    CPU time over wall time tells how many cores a call kept busy."""
    if (os.cpu_count() or 1) < 2:
        pytest.skip("one core: a second BLAS thread could not show")
    code = (
        "import time, numpy as np, fastopt as fo\n"
        f"fo.set_blas({blas!r})\n"
        "fo.set_num_threads(1)\n"
        "m = fo.GRU(128, 256, dtype=np.float64)\n"
        "x = np.random.default_rng(0).standard_normal((50, 32, 128))\n"
        "m.forward(x)\n"
        "time.sleep(0.5)   # OpenBLAS's pool, started at load, spins ~70 ms then sleeps\n"
        "cpu, wall = time.process_time(), time.perf_counter()\n"
        "for _ in range(4):\n"
        "    out, _ = m.forward(x)\n"
        "    m.backward(out)\n"
        "print((time.process_time() - cpu) / (time.perf_counter() - wall))\n")
    cores = float(run_in_fresh_process(code, blas))
    assert cores < 1.4, f"{cores:.2f} cores busy at 1 thread"


# ------------------------------------------------- the GEMM behind the layers

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("trans_a", [False, True])
@pytest.mark.parametrize("trans_b", [False, True])
def test_gemm_takes_matrices_with_a_row_stride(dtype, trans_a, trans_b):
    """_fastopt.gemm (the benchmarks' GEMM-only limit) reads and writes
    matrices whose rows are further apart than their length, as BLAS does."""
    from fastopt import _fastopt
    rng = np.random.default_rng(3)
    m, k, n = 5, 7, 6
    A, B = rand(rng, (m, k), dtype), rand(rng, (k, n), dtype)

    def strided(mat):   # the same values, rows 9 elements further apart
        buf = np.full((mat.shape[0], mat.shape[1] + 9), np.nan, dtype)
        buf[:, :mat.shape[1]] = mat
        return buf[:, :mat.shape[1]]

    a = strided(A.T if trans_a else A)
    b = strided(B.T if trans_b else B)
    c = strided(np.ones((m, n), dtype))
    _fastopt.gemm(c, a, b, trans_a, trans_b, 0.5)
    close(c, A @ B + 0.5, dtype, "c")
    assert np.isnan(c.base[:, n:]).all()          # the gaps between rows untouched
    before = c.copy()
    with pytest.raises(ValueError, match="c must be a 2-D matrix with contiguous rows"):
        _fastopt.gemm(c.base[:, ::2], a, b, trans_a, trans_b)   # columns apart: refused
    with pytest.raises(TypeError, match="a must be a numpy.ndarray"):
        _fastopt.gemm(c, None, b, trans_a, trans_b)
    np.testing.assert_array_equal(c, before)


@pytest.mark.parametrize("blas", ["dnnl", "auto"])
@pytest.mark.parametrize("nthreads", [1, 2])
def test_gemm_nt_split_over_threads(threads, blas, nthreads):
    """Batch-row "NT" products (a cell's x W^T) split their columns over
    fastopt's threads with oneDNN: every column, ragged ends included."""
    from fastopt import _fastopt
    fo.set_num_threads(nthreads)
    with using_blas(blas):
        rng = np.random.default_rng(5)
        for m, n, k in [(64, 1000, 40), (3, 257, 5), (512, 300, 7), (513, 300, 7)]:
            a, b = rand(rng, (m, k), np.float32), rand(rng, (n, k), np.float32)
            c = rand(rng, (m, n), np.float32)
            want = a.astype(np.float64) @ b.T.astype(np.float64) + 2.0 * c
            _fastopt.gemm(c, a, b, False, True, 2.0)
            np.testing.assert_allclose(c, want, rtol=1e-5, atol=1e-5)


# ------------------------------------------------- a user's probe (session 27)

@pytest.mark.parametrize("kind", ["LSTMCell", "GRUCell"])
@pytest.mark.parametrize("forget", ["backward", "reset"])
def test_cell_memory_stays_at_its_peak_when_the_batch_size_changes(kind, forget):
    """Epochs whose last batch is smaller: the gate buffers of the old batch
    size piled up on the free list, T more at every change, without limit."""
    import tracemalloc
    T, I, H = 10, 32, 64
    m = getattr(fo, kind)(I, H, seed=0)

    def epoch():
        for B in (4, 4, 3):
            state = None
            for _ in range(T):
                state = m.forward(np.ones((B, I), np.float32), state)
            if forget == "reset":
                m.reset()
            else:
                for _ in range(T):
                    m.backward(np.ones((B, H), np.float32))

    tracemalloc.start()
    try:
        epoch()
        first = tracemalloc.get_traced_memory()[0]
        for _ in range(4):
            epoch()
        growth = tracemalloc.get_traced_memory()[0] - first
    finally:
        tracemalloc.stop()
    gates = 4 * (4 if kind == "LSTMCell" else 3) * H * 4   # one step's gate buffer, B=4
    assert growth < 2 * gates, growth   # it grew by about 4 * T of them before


@pytest.mark.parametrize("what", ["x", "h0", "dh_n"])
def test_backward_refused_for_a_lower_layer_leaves_every_layer_as_it_was(what):
    """The C calls check each layer's arrays when its turn comes: an array
    that a lower layer reads sharing memory with that layer's gradient was
    refused after the layers above had added their gradients (and the
    forward was consumed, so that no retry could run)."""
    rng = np.random.default_rng(3)
    T, B, I, H = 3, 2, 4, 4
    m, ref = _twins(lambda: fo.LSTM(I, H, num_layers=2, dtype=np.float64, seed=0))
    x, dout = rng.standard_normal((T, B, I)), rng.standard_normal((T, B, H))
    h0, c0, dh_n = (rng.standard_normal((2, B, H)) for _ in range(3))
    grad = {"x": "weight_ih_l0", "h0": "weight_hh_l0", "dh_n": "weight_hh_l0"}[what]
    inside = m._grads[grad].reshape(-1)[:(x if what == "x" else h0).size]
    args = {"x": x, "h0": h0, "dh_n": dh_n}
    inside[...] = args[what].reshape(-1)
    args[what] = inside.reshape(args[what].shape)      # the same values, in the gradient
    out, _ = m.forward(args["x"], (args["h0"], c0))
    ref.forward(x, (h0, c0))
    before = [g.copy() for g in m.gradients()]
    for _ in range(2):   # the forward is kept: a retry meets the same refusal
        with pytest.raises(ValueError, match=f"^{what} shares memory with the gradient of {grad}"):
            m.backward(dout, (args["dh_n"], dh_n))
        for g, g0 in zip(m.gradients(), before):
            np.testing.assert_array_equal(g, g0)
    if what == "dh_n":   # the same values apart from the gradient: accepted, as ref
        m._grads[grad][...] = 0
        dx, (dh0, dc0) = m.backward(dout, (dh_n.copy(), dh_n))
        rdx, (rdh0, rdc0) = ref.backward(dout, (dh_n, dh_n))
        for a, b in zip((dx, dh0, dc0, *m.gradients()), (rdx, rdh0, rdc0, *ref.gradients())):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("cls", ["LSTMCell", "GRUCell"])
def test_cell_overlap_errors_name_the_callers_arguments(cls):
    """The C call's check named its own arguments ("db_ih shares memory with
    dout" for a dh1 inside a gradient)."""
    m = getattr(fo, cls)(3, 4, dtype=np.float64, seed=0)
    m.forward(np.ones((2, 3)))
    dh1 = m._grads["bias_ih"][:8].reshape(2, 4)
    with pytest.raises(ValueError, match="^dh1 shares memory with the gradient of bias_ih"):
        m.backward(dh1)
    m.backward(np.ones((2, 4)))      # the step was kept


@pytest.mark.parametrize("unbatched", [False, True])
def test_a_part_of_dstate_given_as_none_is_zeros(unbatched):
    """(dh_n, None) was refused as "dc_n must have dtype float64, got object"."""
    rng = np.random.default_rng(4)
    m = fo.LSTM(3, 4, num_layers=2, dtype=np.float64, seed=0)
    x = rng.standard_normal((5, 3) if unbatched else (5, 2, 3))
    out, (h, c) = m.forward(x)
    dout, dh, dc = (rng.standard_normal(a.shape) for a in (out, h, c))
    results = []
    for dstate in [(dh, None), (dh, np.zeros_like(c)), (None, dc), (np.zeros_like(h), dc)]:
        m.zero_grad()
        m.forward(x)
        dx, (dh0, dc0) = m.backward(dout, dstate)
        results.append([dx, dh0, dc0] + [g.copy() for g in m.gradients()])
    for a, b in zip(results[0], results[1]):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(results[2], results[3]):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(TypeError, match="^c0 must be an array, got None"):
        m.forward(x, (h, None))      # forward's state, as torch's, takes both


def test_sizes_of_another_integer_type_with_the_same_value_are_unchanged():
    m = fo.GRU(3, 4, num_layers=2, seed=0)
    m.num_layers, m.hidden_size = np.int64(2), np.int32(4)
    m.forward(np.ones((2, 1, 3), np.float32))
    m.num_layers = np.int64(3)
    with pytest.raises(ValueError, match="num_layers cannot be changed"):
        m.forward(np.ones((2, 1, 3), np.float32))


def test_empty_lengths_are_refused_for_their_shape():
    gru = fo.GRU(3, 4, seed=0)
    with pytest.raises(ValueError, match=r"lengths must have shape \(2,\)"):
        gru.forward(np.ones((3, 2, 3), np.float32), lengths=[])
    out, _ = gru.forward(np.ones((3, 0, 3), np.float32), lengths=[])   # B = 0: fits
    assert out.shape == (3, 0, 4)


def test_missing_scipy_is_named_when_a_recurrent_layer_first_multiplies():
    """Without SciPy (a dependency, but a --no-deps install lacks it) the
    recurrent layers raised a bare "No module named 'scipy'" from inside the
    binding; optimizers and batch norm need no SciPy and keep working."""
    import subprocess
    import sys
    code = ("import sys; sys.modules['scipy'] = None\n"
            "import numpy as np, fastopt as fo\n"
            "p = np.ones(3, np.float32); fo.Adam([p]).step([p.copy()])\n"
            "try:\n"
            "    fo.LSTM(2, 3, seed=0).forward(np.ones((2, 1, 2), np.float32))\n"
            "except ImportError as e:\n"
            "    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("the recurrent layers need SciPy"), out.stdout
