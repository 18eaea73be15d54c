"""Recurrent cases: LSTM and GRU sequences (T steps, BPTT) and single cell steps,
forward+backward and forward alone, fastopt against

- numpy: the textbook NumPy form, one step at a time (each step projects its
  own input; backward adds each step's weight gradients), on NumPy's BLAS;
- numpy_careful (np-careful): the same algorithm as fastopt's written with
  NumPy (input projection of all steps in one matmul, the recurrent matmul
  per step, weight gradients in large matmuls over the sequence): the best
  plain NumPy, so fastopt/np-careful is what fusing in C adds;
- torch: torch.nn.LSTM/GRU (or the cells) with autograd (input and initial
  state require grad, as fastopt computes their gradients too); the *-fwd rows
  run torch under no_grad;
- gemm_only: exactly the GEMMs fastopt's C driver issues, alone, through the
  same BLAS (fastopt.get_blas()): the limit for this work. (Issued from
  Python, ~1 us per call more than from C: ~1% of a sequence.)
"""
import numpy as np

import fastopt as fo
from fastopt import _fastopt

from . import Case, register, torch_or_none

class Size(dict):
    """A case size whose table label is short: "T50 B32 I128 H256"."""

    def __str__(self):
        return " ".join(f"{k}{v}" for k, v in self.items())


SEQ = [Size(T=50, B=32, I=128, H=256)]
CELL = [Size(B=64, I=256, H=512)]
GATES = {"lstm": 4, "gru": 3}
# the NumPy competitors' GEMMs run on OpenBLAS's pool, which spins ~2^28
# cycles (~70 ms here) after its last call: pause that long between libraries
OPENBLAS_SETTLE = 0.1


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


# ----------------------------------------------------------- NumPy versions

def numpy_lstm_forward(x, w_ih, w_hh, b, h0, c0):
    """(out, cache): x (T, B, I); gates i, f, g, o."""
    T, B, _ = x.shape
    H = w_hh.shape[1]
    pre = (x.reshape(T * B, -1) @ w_ih.T + b).reshape(T, B, 4 * H)
    hs, cs, acts = [h0], [c0], []
    for t in range(T):
        a = pre[t] + hs[-1] @ w_hh.T
        i, f, o = _sigmoid(a[:, :H]), _sigmoid(a[:, H:2 * H]), _sigmoid(a[:, 3 * H:])
        g = np.tanh(a[:, 2 * H:3 * H])
        c = f * cs[-1] + i * g
        hs.append(o * np.tanh(c))
        cs.append(c)
        acts.append((i, f, g, o))
    return np.stack(hs[1:]), (x, hs, cs, acts)


def numpy_lstm_backward(dout, w_ih, w_hh, cache):
    x, hs, cs, acts = cache
    T, B, I = x.shape
    H = w_hh.shape[1]
    dpre = np.empty((T, B, 4 * H), x.dtype)
    dh = np.zeros((B, H), x.dtype)
    dc = np.zeros((B, H), x.dtype)
    for t in reversed(range(T)):
        i, f, g, o = acts[t]
        dh = dh + dout[t]
        tc = np.tanh(cs[t + 1])
        dc = dc + dh * o * (1 - tc * tc)
        dpre[t, :, :H] = dc * g * i * (1 - i)
        dpre[t, :, H:2 * H] = dc * cs[t] * f * (1 - f)
        dpre[t, :, 2 * H:3 * H] = dc * i * (1 - g * g)
        dpre[t, :, 3 * H:] = dh * tc * o * (1 - o)
        dc = dc * f
        dh = dpre[t] @ w_hh
    d2 = dpre.reshape(T * B, -1)
    dx = (d2 @ w_ih).reshape(T, B, I)
    dw_ih = d2.T @ x.reshape(T * B, I)
    dw_hh = d2.T @ np.concatenate(hs[:-1]).reshape(T * B, H)
    db = d2.sum(0)
    return dx, dh, dc, dw_ih, dw_hh, db


def numpy_gru_forward(x, w_ih, w_hh, b_ih, b_hh, h0):
    """torch's GRU (reset after): gates r, z, n."""
    T, B, _ = x.shape
    H = w_hh.shape[1]
    pre = (x.reshape(T * B, -1) @ w_ih.T + b_ih).reshape(T, B, 3 * H)
    hs, acts = [h0], []
    for t in range(T):
        hh = hs[-1] @ w_hh.T + b_hh
        r = _sigmoid(pre[t, :, :H] + hh[:, :H])
        z = _sigmoid(pre[t, :, H:2 * H] + hh[:, H:2 * H])
        n = np.tanh(pre[t, :, 2 * H:] + r * hh[:, 2 * H:])
        hs.append(n + z * (hs[-1] - n))
        acts.append((r, z, n, hh[:, 2 * H:]))
    return np.stack(hs[1:]), (x, hs, acts)


def numpy_gru_backward(dout, w_ih, w_hh, cache):
    x, hs, acts = cache
    T, B, I = x.shape
    H = w_hh.shape[1]
    dpi = np.empty((T, B, 3 * H), x.dtype)
    dph = np.empty((T, B, 3 * H), x.dtype)
    dh = np.zeros((B, H), x.dtype)
    for t in reversed(range(T)):
        r, z, n, hn = acts[t]
        dh = dh + dout[t]
        dn = dh * (1 - z) * (1 - n * n)
        dz = dh * (hs[t] - n) * z * (1 - z)
        dr = dn * hn * r * (1 - r)
        dpi[t, :, :H] = dph[t, :, :H] = dr
        dpi[t, :, H:2 * H] = dph[t, :, H:2 * H] = dz
        dpi[t, :, 2 * H:] = dn
        dph[t, :, 2 * H:] = dn * r
        dh = dh * z + dph[t] @ w_hh
    di, dhh = dpi.reshape(T * B, -1), dph.reshape(T * B, -1)
    dx = (di @ w_ih).reshape(T, B, I)
    dw_ih = di.T @ x.reshape(T * B, I)
    dw_hh = dhh.T @ np.concatenate(hs[:-1]).reshape(T * B, H)
    return dx, dh, dw_ih, dw_hh, di.sum(0), dhh.sum(0)


# The textbook form (as a course writes it, one step at a time): every step
# projects its own input, and backward accumulates the weight gradients one
# step at a time (T small products instead of one large one).

def textbook_lstm_step(x, h, c, w_ih, w_hh, b):
    H = h.shape[1]
    a = x @ w_ih.T + h @ w_hh.T + b
    i, f, o = _sigmoid(a[:, :H]), _sigmoid(a[:, H:2 * H]), _sigmoid(a[:, 3 * H:])
    g = np.tanh(a[:, 2 * H:3 * H])
    c1 = f * c + i * g
    h1 = o * np.tanh(c1)
    return h1, c1, (x, h, c, i, f, g, o, c1)


def textbook_lstm_step_backward(dh1, dc1, w_ih, w_hh, cache, grads):
    x, h, c, i, f, g, o, c1 = cache
    tc = np.tanh(c1)
    dc = dc1 + dh1 * o * (1 - tc * tc)
    da = np.concatenate([dc * g * i * (1 - i), dc * c * f * (1 - f),
                         dc * i * (1 - g * g), dh1 * tc * o * (1 - o)], axis=1)
    grads[0] += da.T @ x
    grads[1] += da.T @ h
    grads[2] += da.sum(0)
    return da @ w_ih, da @ w_hh, dc * f


def textbook_gru_step(x, h, w_ih, w_hh, b_ih, b_hh):
    H = h.shape[1]
    gi = x @ w_ih.T + b_ih
    gh = h @ w_hh.T + b_hh
    r = _sigmoid(gi[:, :H] + gh[:, :H])
    z = _sigmoid(gi[:, H:2 * H] + gh[:, H:2 * H])
    n = np.tanh(gi[:, 2 * H:] + r * gh[:, 2 * H:])
    return n + z * (h - n), (x, h, r, z, n, gh[:, 2 * H:])


def textbook_gru_step_backward(dh1, w_ih, w_hh, cache, grads):
    x, h, r, z, n, hn = cache
    dn = dh1 * (1 - z) * (1 - n * n)
    dz = dh1 * (h - n) * z * (1 - z)
    dr = dn * hn * r * (1 - r)
    dgi = np.concatenate([dr, dz, dn], axis=1)
    dgh = np.concatenate([dr, dz, dn * r], axis=1)
    grads[0] += dgi.T @ x
    grads[1] += dgh.T @ h
    grads[2] += dgi.sum(0)
    grads[3] += dgh.sum(0)
    return dgi @ w_ih, dh1 * z + dgh @ w_hh


def textbook_sequence(kind, x, dout, w_ih, w_hh, b_ih, b_hh, backward):
    T, B, _ = x.shape
    H = w_hh.shape[1]
    h = c = np.zeros((B, H), x.dtype)
    caches = []
    for t in range(T):
        if kind == "lstm":
            h, c, cache = textbook_lstm_step(x[t], h, c, w_ih, w_hh, b_ih + b_hh)
        else:
            h, cache = textbook_gru_step(x[t], h, w_ih, w_hh, b_ih, b_hh)
        caches.append(cache)
    if not backward:
        return
    grads = [np.zeros_like(w_ih), np.zeros_like(w_hh), np.zeros_like(b_ih), np.zeros_like(b_hh)]
    dh = dc = np.zeros((B, H), x.dtype)
    for t in reversed(range(T)):
        if kind == "lstm":
            _, dh, dc = textbook_lstm_step_backward(dout[t] + dh, dc, w_ih, w_hh, caches[t], grads)
        else:
            _, dh = textbook_gru_step_backward(dout[t] + dh, w_ih, w_hh, caches[t], grads)


# ------------------------------------------------------------------ helpers

def _data(kind, size, dtype, seq):
    rng = np.random.default_rng(0)
    G, H, I, B = GATES[kind], size["H"], size["I"], size["B"]
    shape = (size["T"], B, I) if seq else (B, I)
    x = rng.standard_normal(shape).astype(dtype)
    dout = rng.standard_normal(shape[:-1] + (H,)).astype(dtype)
    k = 1 / np.sqrt(H)
    w_ih = rng.uniform(-k, k, (G * H, I)).astype(dtype)
    w_hh = rng.uniform(-k, k, (G * H, H)).astype(dtype)
    b_ih = rng.uniform(-k, k, G * H).astype(dtype)
    b_hh = rng.uniform(-k, k, G * H).astype(dtype)
    return x, dout, w_ih, w_hh, b_ih, b_hh


def _fo_layer(kind, size, dtype, weights, seq):
    H, I = size["H"], size["I"]
    if seq:
        m = (fo.LSTM if kind == "lstm" else fo.GRU)(I, H, dtype=dtype)
        names = ["weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0"]
    else:
        m = (fo.LSTMCell if kind == "lstm" else fo.GRUCell)(I, H, dtype=dtype)
        names = ["weight_ih", "weight_hh", "bias_ih", "bias_hh"]
    m.load_state_dict(dict(zip(names, weights)))
    return m


def _torch_module(kind, size, dtype, weights, seq):
    torch = torch_or_none()
    if torch is None:
        return None, None
    H, I = size["H"], size["I"]
    tdt = torch.float64 if dtype == np.float64 else torch.float32
    if seq:
        m = (torch.nn.LSTM if kind == "lstm" else torch.nn.GRU)(I, H).to(tdt)
    else:
        m = (torch.nn.LSTMCell if kind == "lstm" else torch.nn.GRUCell)(I, H).to(tdt)
    with torch.no_grad():
        for p, w in zip(m.parameters(), weights):
            p.copy_(torch.from_numpy(w))
    return torch, m


FEW_ROWS = 128   # src_c/rnn_impl.h FO_RNN_FEW_ROWS


def _gemm_plan(kind, size, dtype, seq, backward):
    """(run, flops): the GEMM calls of fastopt's driver for this case, on
    preallocated arrays, and their floating-point operations (2*M*N*K each)."""
    G, H, I, B = GATES[kind], size["H"], size["I"], size["B"]
    T = size["T"] if seq else 1
    GH, TB = G * H, T * B
    z = lambda *s: np.zeros(s, dtype)  # noqa: E731
    x, w_ih, w_hh = z(TB, I), z(GH, I), z(GH, H)
    gates, out, hh, dh = z(TB, GH), z(TB, H), z(B, GH), z(B, H)
    dx, dw_ih, dw_hh = z(TB, I), z(GH, I), z(GH, H)
    gemm = _fastopt.gemm
    h0_given = not seq       # the cell benches pass a state, the sequence benches none
    # the driver multiplies products A W^T of at most FEW_ROWS rows as W A^T on
    # transposed copies ("NN"), by a transposed copy of W_hh ("NN") from 4
    # steps on, and its backward takes the gate gradients; rows of these are 64
    # bytes further apart when G*H elements make a multiple of 4 KiB
    def nt(c, a, w, beta):
        if a.shape[0] > FEW_ROWS:
            return (c, a, w, False, True, beta)
        return (z(w.shape[0], a.shape[0]), w, z(a.shape[1], a.shape[0]), False, False, 0.0)
    calls = [nt(gates, x, w_ih, 0.0)]
    ld = _fastopt.rnn_dgates_width(kind, H, dtype)
    w_hh_t = np.zeros((H, ld), dtype)[:, :GH]
    dgates = z(TB, ld)[:, :GH]
    for t in range(T):
        if t or h0_given:
            h, c = out[t * B:(t + 1) * B], (gates[t * B:(t + 1) * B] if kind == "lstm" else hh)
            beta = 1.0 if kind == "lstm" else 0.0
            calls.append((c, h, w_hh_t, False, False, beta) if T >= 4 else nt(c, h, w_hh, beta))
    if backward:
        for t in range(T):
            calls.append((dh, dgates[t * B:(t + 1) * B], w_hh, False, False, 0.0))
        calls.append((dx, dgates, w_ih, False, False, 0.0))
        calls.append((dw_ih, dgates, x, True, False, 1.0))
        if T > 1:
            calls.append((dw_hh, dgates[B:], out[:TB - B], True, False, 1.0))
        if h0_given:
            calls.append((dw_hh, dgates[:B], out[:B], True, False, 1.0))

    def run():
        for c, a, b, ta, tb, beta in calls:
            gemm(c, a, b, ta, tb, beta)
    flops = sum(2 * c.shape[0] * c.shape[1] * (a.shape[0] if ta else a.shape[1])
                for c, a, b, ta, tb, beta in calls)
    return run, flops


# -------------------------------------------------------------------- cases

def _seq_case(kind, size, dtype, backward):
    x, dout, w_ih, w_hh, b_ih, b_hh = _data(kind, size, dtype, True)
    weights = (w_ih, w_hh, b_ih, b_hh)
    m = _fo_layer(kind, size, dtype, weights, True)
    B, H = size["B"], size["H"]
    h0 = np.zeros((B, H), dtype)

    def fastopt_run():
        out, _ = m.forward(x)
        if backward:
            m.backward(dout)

    if kind == "lstm":
        def numpy_run():
            out, cache = numpy_lstm_forward(x, w_ih, w_hh, b_ih + b_hh, h0, h0)
            if backward:
                numpy_lstm_backward(dout, w_ih, w_hh, cache)
    else:
        def numpy_run():
            out, cache = numpy_gru_forward(x, w_ih, w_hh, b_ih, b_hh, h0)
            if backward:
                numpy_gru_backward(dout, w_ih, w_hh, cache)

    gemm_run, flops = _gemm_plan(kind, size, dtype, True, backward)
    fns = {"fastopt": fastopt_run,
           "numpy": lambda: textbook_sequence(kind, x, dout, w_ih, w_hh, b_ih, b_hh, backward),
           "numpy_careful": numpy_run, "gemm_only": gemm_run}
    torch, tm = _torch_module(kind, size, dtype, weights, True)
    if tm is not None:
        tx = torch.from_numpy(x).requires_grad_(backward)
        tdout = torch.from_numpy(dout)

        def torch_run():
            if backward:
                out, _ = tm(tx)
                out.backward(tdout)
            else:
                with torch.no_grad():
                    tm(tx)
        fns["torch"] = torch_run
    return Case(fns, flops=flops, settle=OPENBLAS_SETTLE)


def _cell_case(kind, size, dtype, backward):
    x, dh1, w_ih, w_hh, b_ih, b_hh = _data(kind, size, dtype, False)
    weights = (w_ih, w_hh, b_ih, b_hh)
    m = _fo_layer(kind, size, dtype, weights, False)
    rng = np.random.default_rng(1)
    B, H = size["B"], size["H"]
    h0 = rng.standard_normal((B, H)).astype(dtype)
    c0 = rng.standard_normal((B, H)).astype(dtype)
    dc1 = rng.standard_normal((B, H)).astype(dtype)

    if kind == "lstm":
        def fastopt_run():
            m.forward(x, (h0, c0))
            if backward:
                m.backward(dh1, dc1)
            else:
                m.reset()       # forget the saved step (a forward-only loop)

        def numpy_run():
            out, cache = numpy_lstm_forward(x[None], w_ih, w_hh, b_ih + b_hh, h0, c0)
            if backward:
                numpy_lstm_backward(dh1[None], w_ih, w_hh, cache)
    else:
        def fastopt_run():
            m.forward(x, h0)
            if backward:
                m.backward(dh1)
            else:
                m.reset()

        def numpy_run():
            out, cache = numpy_gru_forward(x[None], w_ih, w_hh, b_ih, b_hh, h0)
            if backward:
                numpy_gru_backward(dh1[None], w_ih, w_hh, cache)

    def textbook_run():
        grads = [np.zeros_like(w_ih), np.zeros_like(w_hh), np.zeros_like(b_ih),
                 np.zeros_like(b_hh)]
        if kind == "lstm":
            h1, c1, cache = textbook_lstm_step(x, h0, c0, w_ih, w_hh, b_ih + b_hh)
            if backward:
                textbook_lstm_step_backward(dh1, dc1, w_ih, w_hh, cache, grads)
        else:
            h1, cache = textbook_gru_step(x, h0, w_ih, w_hh, b_ih, b_hh)
            if backward:
                textbook_gru_step_backward(dh1, w_ih, w_hh, cache, grads)

    gemm_run, flops = _gemm_plan(kind, size, dtype, False, backward)
    fns = {"fastopt": fastopt_run, "numpy": textbook_run, "numpy_careful": numpy_run,
           "gemm_only": gemm_run}
    torch, tm = _torch_module(kind, size, dtype, weights, False)
    if tm is not None:
        tx = torch.from_numpy(x).requires_grad_(backward)
        th0 = torch.from_numpy(h0).requires_grad_(backward)
        tc0 = torch.from_numpy(c0).requires_grad_(backward)
        tdh, tdc = torch.from_numpy(dh1), torch.from_numpy(dc1)

        def torch_run():
            if not backward:
                with torch.no_grad():
                    tm(tx, (th0, tc0) if kind == "lstm" else th0)
            elif kind == "lstm":
                h1, c1 = tm(tx, (th0, tc0))
                torch.autograd.backward([h1, c1], [tdh, tdc])
            else:
                tm(tx, th0).backward(tdh)
        fns["torch"] = torch_run
    return Case(fns, flops=flops, settle=OPENBLAS_SETTLE)


for _kind in ("lstm", "gru"):
    register("rnn", f"{_kind}-seq", SEQ)(
        lambda size, dtype, k=_kind: _seq_case(k, size, dtype, True))
    register("rnn", f"{_kind}-seq-fwd", SEQ)(
        lambda size, dtype, k=_kind: _seq_case(k, size, dtype, False))
    register("rnn", f"{_kind}-cell", CELL)(
        lambda size, dtype, k=_kind: _cell_case(k, size, dtype, True))
    register("rnn", f"{_kind}-cell-fwd", CELL)(
        lambda size, dtype, k=_kind: _cell_case(k, size, dtype, False))
