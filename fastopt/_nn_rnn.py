"""Recurrent layers with the interface of ``torch.nn``: RNN, LSTM, GRU over whole
sequences (backpropagation through time) and their cells, with explicit backward.

Each layer of a sequence is one call into C for forward and one for backward
(src_c/rnn.c): the input projection of all steps is one GEMM, each step adds
only the recurrent product, and the weight gradients are a few GEMMs over the
whole sequence. Weight names, shapes and gate orders are torch's
(LSTM i, f, g, o; GRU r, z, n), so ``state_dict()`` moves between the two.

Shapes (time-major unless ``batch_first``): x (T, B, I); out (T, B, D*S);
state h (num_layers*D, B, S), LSTM also c (num_layers*D, B, H), with D = 2
directions when bidirectional, else 1, and S = H (LSTM with proj_size: S = P).
Cells: x (B, I), h (B, H), or unbatched x (I,), h (H,) (a batch of one).
"""
import math
from collections import OrderedDict

import numpy as np

from . import _fastopt
from ._layer import Layer, one_call_at_a_time
from ._functional_norm import _bool, _unit
from ._nn_norm import Dropout
from .blas import ensure_configured

__all__ = ["RNNCell", "LSTMCell", "GRUCell", "RNN", "LSTM", "GRU"]

_GATES = {"rnn_tanh": 1, "rnn_relu": 1, "lstm": 4, "gru": 3, "gru_reset_before": 3}


def _input(a, name, dtype, shape):
    """a as an ndarray of exactly `dtype` and `shape`, C-contiguous (no casts,
    no copies), else TypeError/ValueError naming it."""
    a = _fastopt.as_array(a, name)
    if a.dtype != dtype:
        raise TypeError(f"{name} must have dtype {np.dtype(dtype).name}, got {a.dtype} "
                        "(no implicit casts)")
    if a.shape != tuple(shape):
        raise ValueError(f"{name} has shape {a.shape}, expected {tuple(shape)}")
    if not a.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous (a slice such as x[:, t0:t1] is not; "
                         "np.ascontiguousarray copies it: fastopt copies nothing silently)")
    # C reads whole elements; checked here, as the C call's own check comes
    # after the layers below it have written
    if not a.flags.aligned:
        raise ValueError(f"{name} must be aligned to its element size")
    return a


def _positive_int(v, name, minimum=1):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise TypeError(f"{name} must be an integer >= {minimum}, got {v!r}")
    # the BLAS takes 32-bit sizes: the binding refuses more, so refuse it here
    if not minimum <= v < 2 ** 31:
        raise ValueError(f"{name} must be an integer in [{minimum}, 2^31-1], got {v!r}")
    return int(v)


def _runs(lengths, T, B):
    """The runs of time steps (t0, t1, nb) over which the first nb sequences of
    a batch sorted by decreasing length are the live ones; without lengths one
    run of all T steps and B sequences."""
    if lengths is None or len(lengths) == 0:
        return [(0, T, B)]
    ends = sorted(set(int(v) for v in lengths))
    return [(t0, t1, int(np.count_nonzero(lengths >= t1)))
            for t0, t1 in zip([0] + ends[:-1], ends)]


def _batch_order(a, order):
    """a (., B, .) with its batch axis in `order`, C-contiguous (None: a as is)."""
    if a is None or order is None:
        return a
    return np.ascontiguousarray(np.take(a, order, axis=1))


def _lead_axis(a):
    """a[:, None]: an unbatched state as a batch of one (None stays None)."""
    return None if a is None else a[:, None]


def _lead(a, shape):
    """The leading shape + (width,) entries of scratch a (T, B, width), as one
    contiguous array (None stays None)."""
    if a is None:
        return None
    return a.reshape(-1)[:int(np.prod(shape)) * a.shape[-1]].reshape(shape + (a.shape[-1],))


def _flip(a, lengths, out):
    """out[t, b] = a[len_b - 1 - t, b] for t < len_b, else 0: each sequence in
    reverse time order (its own inverse); without lengths, a[::-1]."""
    if lengths is None:
        np.copyto(out, a[::-1])
        return out
    t = np.arange(a.shape[0])[:, None]
    live = t < lengths[None, :]
    idx = np.where(live, lengths[None, :] - 1 - t, t)
    np.copyto(out, np.take_along_axis(a, idx[:, :, None], axis=0))
    out[~live] = 0
    return out


class _Recurrent(Layer):
    """Parameters (torch names and layout), their gradients, state_dict and the
    train/eval flag shared by the cells and the sequence layers."""

    def _init_params(self, mode, input_size, hidden_size, num_layers, bias, dtype, seed,
                     suffixes, directions=1, proj_size=0):
        """Parameters of each layer (and direction: '_reverse' names the second),
        in torch's order; returns the generator, for any further seeded draws."""
        self.mode = mode
        self.input_size = _positive_int(input_size, "input_size")
        self.hidden_size = _positive_int(hidden_size, "hidden_size")
        self.proj_size = _positive_int(proj_size, "proj_size", 0)
        if self.proj_size and (mode != "lstm" or self.proj_size >= self.hidden_size):
            raise ValueError(f"proj_size must be 0, or less than hidden_size for an LSTM, "
                             f"got {proj_size}")
        S = self.proj_size or self.hidden_size   # the width of h
        self.num_layers = _positive_int(num_layers, "num_layers")
        self.bias = _bool(bias, "bias")
        if np.dtype(dtype) not in (np.float32, np.float64):
            raise TypeError(f"dtype must be float32 or float64, got {np.dtype(dtype)}")
        self.dtype = np.dtype(dtype).type
        self.training = True
        # the options the weights are built for (set by the subclasses before
        # this call): forward refuses them edited, as the weights cannot follow
        self._built = {n: getattr(self, n) for n in ("input_size", "hidden_size", "num_layers",
                                                     "proj_size", "bias", "bidirectional",
                                                     "reset_after", "nonlinearity")
                       if hasattr(self, n)}
        ensure_configured()
        G, H = _GATES[mode], self.hidden_size
        if G * H >= 2 ** 31:
            raise ValueError(f"hidden_size {H} is too large: the weights' {G}*hidden_size "
                             "rows exceed the BLAS's 2^31-1 limit")
        rng = np.random.default_rng(seed)
        bound = 1.0 / math.sqrt(H)     # torch: every parameter ~ U(-1/sqrt(H), 1/sqrt(H))
        self._params = OrderedDict()
        for layer, sfx in enumerate(suffixes):
            fan_in = self.input_size if layer == 0 else directions * S
            shapes = [("weight_ih", (G * H, fan_in)), ("weight_hh", (G * H, S))]
            if self.bias:
                shapes += [("bias_ih", (G * H,)), ("bias_hh", (G * H,))]
            if self.proj_size:
                shapes.append(("weight_hr", (S, H)))
            for d in range(directions):
                for name, shape in shapes:
                    try:
                        w = rng.uniform(-bound, bound, shape).astype(self.dtype)
                    except (MemoryError, ValueError):   # numpy: "array is too big"
                        raise ValueError(f"input_size {self.input_size} and hidden_size {H} "
                                         f"are too large: cannot allocate {name} of shape "
                                         f"{shape}") from None
                    self._params[name + sfx + ("_reverse" if d else "")] = w
        self._grads = OrderedDict((k, np.zeros_like(v)) for k, v in self._params.items())
        self._work = {}          # reused scratch (_scratch): name -> array
        return rng

    def _check_flags(self):
        """The training flag (returned) and the sizes and options the weights
        are built for, which may have been edited since __init__: each flag a
        real bool ("no" is truthy), each size and option unchanged."""
        training = _bool(self.training, "training")
        for name, built in self._built.items():
            value = getattr(self, name)
            if value is built:   # the very object __init__ stored: unchanged
                continue
            if isinstance(built, bool):
                same = _bool(value, name) == built
            elif isinstance(built, int):   # a size: any integer of the same value
                same = (isinstance(value, (int, np.integer))
                        and not isinstance(value, (bool, np.bool_)) and value == built)
            else:   # the nonlinearity (str)
                same = type(value) is type(built) and value == built
            if not same:
                raise ValueError(f"{name} cannot be changed after construction (the weights "
                                 f"are built for {name}={built!r}), got {value!r}: build a "
                                 "new layer")
        return training

    def __repr__(self):
        """Like torch's: the sizes, then the options that differ from the defaults."""
        opts = []
        for name, default in [("num_layers", 1), ("nonlinearity", "tanh"), ("bias", True),
                              ("batch_first", False), ("dropout", 0.0),
                              ("bidirectional", False), ("proj_size", 0), ("reset_after", True)]:
            value = getattr(self, name, default)
            if value != default:
                opts.append(f"{name}={value!r}")
        if self.dtype is not np.float32:
            opts.append(f"dtype={np.dtype(self.dtype).name}")
        return (f"{type(self).__name__}({self.input_size}, {self.hidden_size}"
                + "".join(", " + o for o in opts) + ")")

    def _layer_params(self, sfx):
        """(w_ih, w_hh, b_ih, b_hh, w_hr) and their grads of one layer (biases None
        without bias, w_hr None without proj_size)."""
        p, g = self._params, self._grads
        names = ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr")
        return ([p.get(n + sfx) for n in names], [g.get(n + sfx) for n in names])

    def _scratch(self, name, shape):
        """A reused buffer (fresh memory only when the shape changes): a
        sequence's saved gates and states, backward's gate gradients."""
        a = self._work.get(name)
        if a is None or a.shape != shape:
            a = self._work[name] = np.empty(shape, self.dtype)
        return a

    def _check_reads_apart_from_grads(self, reads):
        """Refuse, before anything is written, an array that backward reads
        ((name, array) pairs) sharing memory with a gradient, which backward
        accumulates into. The C calls check it too, but a stack's lower
        layers only when their turn comes, after the layers above have added
        to their gradients."""
        _fastopt.check_reads_apart_from_grads(list(reads), self._grads)

    def parameters(self):
        """The parameter arrays in torch's order (updated in place by optimizers)."""
        return list(self._params.values())

    def gradients(self):
        """gradients()[i] is the accumulated gradient of parameters()[i]."""
        return list(self._grads.values())

    def _named_arrays(self):
        return self._params     # weight_ih_l0, bias_hh_l1_reverse, weight_hr_l0, ...


class _Saved:
    """One layer's (and direction's) forward over one sequence, or one cell
    step: the checked C call, which keeps the buffers backward reads."""
    __slots__ = ("call", "x", "h0", "c0", "out", "c_all", "gates", "unbatched")


class _SequenceLayer(_Recurrent):
    """A stack of `num_layers` recurrent layers over whole sequences, each in one
    direction or (bidirectional) two: the second runs over the time-reversed
    input with its own weights ('_reverse'), and the layer's output is the two
    outputs side by side, (T, B, 2H). With dropout > 0, training applies
    inverted dropout (fastopt.Dropout: Philox, seeded) to the output of every
    layer but the last, as torch does."""

    def __init__(self, mode, input_size, hidden_size, num_layers=1, bias=True,
                 batch_first=False, dropout=0.0, bidirectional=False, dtype=np.float32,
                 seed=None, proj_size=0):
        self.dropout = dropout = _unit(dropout, "dropout")
        self.bidirectional = _bool(bidirectional, "bidirectional")
        self._D = 2 if self.bidirectional else 1
        L = _positive_int(num_layers, "num_layers")
        rng = self._init_params(mode, input_size, hidden_size, L, bias, dtype, seed,
                                [f"_l{k}" for k in range(L)], self._D, proj_size)
        self._S = self.proj_size or self.hidden_size   # the width of h (and out)
        self.batch_first = _bool(batch_first, "batch_first")
        # one dropout between each pair of layers, seeded from the same generator
        # (after the weights: they do not depend on dropout); made even for
        # dropout=0, since self.dropout may be edited later and is read at forward
        self._dropouts = [Dropout(dropout, seed=int(rng.integers(2 ** 63)))
                          for _ in range(L - 1)]
        self._saved = None       # per (layer, direction): the runs of the last forward
        self._dropped = []       # per layer: whether its output went through dropout
        self._unbatched = False  # the last forward's input was 2-D (T, I)
        self._batch_first = False  # the last forward's layout, which backward takes

    # the names of a state's parts in messages: forward's state, backward's dstate
    _STATE_NAMES = {"state": ("h0", "c0"), "dstate": ("dh_n", "dc_n")}

    def _state_shape(self, part, *batch):
        """(num_layers*D, *batch, width) of h (part 0: the projection's width
        with proj_size) or c (part 1)."""
        width = self.hidden_size if part else self._S
        return (self.num_layers * self._D,) + batch + (width,)

    def _map_state(self, state, fn, arg="state"):
        """fn(array, name, part) applied to h (part 0) and, LSTM, c (part 1) of
        `arg` (forward's state or backward's dstate); None stays None."""
        if state is None:
            return None
        h, c = self._STATE_NAMES[arg]
        if self.mode == "lstm":
            if not isinstance(state, (tuple, list)) or len(state) != 2:
                raise TypeError(f"{arg} must be a tuple ({h}, {c}) for an LSTM, "
                                f"got {type(state).__name__}")
            return fn(state[0], h, 0), fn(state[1], c, 1)
        return fn(state, h, 0)

    def _state_part(self, a, name, part, arg, *batch):
        """One part of a state (arg "state") or of its gradient ("dstate",
        where a part given as None stands for zeros), checked for its shape."""
        if a is None and arg == "dstate":
            return None
        return _input(a, name, self.dtype, self._state_shape(part, *batch))

    def _check_state(self, state, B, arg="state"):
        """(h, c) of `arg` checked for batch B (c None but for an LSTM)."""
        state = self._map_state(
            state, lambda a, n, part: self._state_part(a, n, part, arg, B), arg)
        if state is None or self.mode != "lstm":
            return state, None
        return state

    @one_call_at_a_time
    def forward(self, x, state=None, lengths=None):
        """out, state = forward(x, state=None, lengths=None). x (T, B, I)
        ((B, T, I) when batch_first), or unbatched (T, I); state h0
        (num_layers*D, B, S) (or (num_layers*D, S) unbatched; S = proj_size or
        H), LSTM (h0, c0) with c0 H wide; None = zeros. lengths (B integers in [1, T], any order): sequence b is
        x[:lengths[b], b], as a torch PackedSequence gives it; out is zero past
        each length and state holds each sequence's state after its own last
        step (the reverse direction reads each sequence from its own end)."""
        # the attributes may have been edited since __init__: check them again
        # (torch reads dropout at every forward, so an edited one applies)
        training = self._check_flags()
        batch_first = _bool(self.batch_first, "batch_first")
        dropout = _unit(self.dropout, "dropout")
        dropout = dropout if training else 0.0     # the p between layers
        x = _fastopt.as_array(x, "x")
        if x.ndim != 2:
            result = self._forward(x, state, batch_first, lengths, dropout)
            self._unbatched = False
            return result
        if lengths is not None:
            raise ValueError("lengths needs batched input (T, B, input_size)")
        # unbatched, as torch takes it: a batch of one, time-major whatever batch_first
        x = _input(x, "x", self.dtype, (x.shape[0], self.input_size))[:, None]
        state = self._map_state(
            state, lambda a, n, part: _input(a, n, self.dtype, self._state_shape(part))[:, None])
        out, state = self._forward(x, state, False, None, dropout)
        self._unbatched = True
        return out[:, 0], self._map_state(state, lambda a, n, part: a[:, 0])

    def _check_lengths(self, lengths, T, B):
        """(sorted lengths, order): lengths as int64 in decreasing order and the
        batch order that sorts them (stable); (None, None) without lengths."""
        if lengths is None:
            return None, None
        v = _fastopt.as_array(lengths, "lengths")
        if v.shape != (B,):
            raise ValueError(f"lengths must have shape ({B},) (one per sequence), got {v.shape}")
        if v.dtype.kind not in "iu" and v.size:   # [] reads as float64
            raise TypeError(f"lengths must be integers, got dtype {v.dtype}")
        if B and (v.min() < 1 or v.max() > T):
            raise ValueError(f"lengths must be in [1, {T}] (the time steps of x), "
                             f"got [{v.min()}, {v.max()}]")
        order = np.argsort(-v.astype(np.int64), kind="stable")
        return v.astype(np.int64)[order], order

    def _direction_forward(self, sfx, src, h0, c0, runs):
        """One layer and direction over src (T, B, I) (sorted by decreasing
        length), one C call per run: (saved runs, out (T, B, H) zero past each
        length, h_n, c_n). Each run keeps its own buffers (slices of one
        scratch per name) and initial state, which its backward reads."""
        T, B, I = src.shape
        H, S, G, lstm = self.hidden_size, self._S, _GATES[self.mode], self.mode == "lstm"
        (w_ih, w_hh, b_ih, b_hh, w_hr), _ = self._layer_params(sfx)
        whole = runs == [(0, T, B)]
        n = sum((t1 - t0) * nb for t0, t1, nb in runs)
        # extra: GRU's W_hn h + b_hn or r*h, or o*tanh(c) before the projection
        widths = {"out": S, "gates": G * H, "c": H if lstm else 0,
                  "extra": H if G == 3 or self.proj_size else 0}
        flat = {k: self._scratch(f"{k}{sfx}", (n * w,)) for k, w in widths.items() if w}
        out = flat["out"].reshape(T, B, S) if whole else self._scratch(f"pad{sfx}", (T, B, S))
        if not whole:
            out.fill(0)
            h = h0.copy() if h0 is not None else np.zeros((B, S), self.dtype)
            c = (c0.copy() if c0 is not None else np.zeros((B, H), self.dtype)) if lstm else None
        saved, pos = [], 0
        for t0, t1, nb in runs:
            m, shape = (t1 - t0) * nb, (t1 - t0, nb)
            part = {k: v[pos * widths[k]:(pos + m) * widths[k]].reshape(shape + (widths[k],))
                    for k, v in flat.items()}
            if not whole:          # each run its own copy of its initial state
                h0, c0 = h[:nb].copy(), c[:nb].copy() if lstm else None
            call = _fastopt.RnnLayerCall(
                self.mode, t1 - t0, nb, I, H, w_ih, w_hh, b_ih, b_hh,
                src if whole else np.ascontiguousarray(src[t0:t1, :nb]), h0, c0,
                part["out"], part.get("c"), part["gates"], part.get("extra"),
                self.proj_size, w_hr)
            call.forward()
            saved.append((t0, t1, nb, call))
            if not whole:
                out[t0:t1, :nb] = part["out"]
                h[:nb] = part["out"][-1]
                if lstm:
                    c[:nb] = part["c"][-1]
            pos += m
        if whole:
            c_all = part.get("c")
            if T:
                h, c = out[T - 1], c_all[T - 1] if lstm else None
            else:
                h = h0 if h0 is not None else np.zeros((B, S), self.dtype)
                c = (c0 if c0 is not None else np.zeros((B, H), self.dtype)) if lstm else None
        return saved, out, h, c

    def _forward(self, x, state, batch_first, lengths, dropout):
        """forward's work; dropout: the p between layers (0 in eval)."""
        if x.ndim != 3:
            raise ValueError(f"x must be 3-D ({'B, T' if batch_first else 'T, B'}, "
                             f"input_size) or 2-D (T, input_size), got shape {x.shape}")
        T, B = (x.shape[1], x.shape[0]) if batch_first else x.shape[:2]
        x = _input(x, "x", self.dtype, x.shape[:2] + (self.input_size,))
        h0, c0 = self._check_state(state, B)
        lengths, order = self._check_lengths(lengths, T, B)
        if batch_first:
            x = np.ascontiguousarray(x.transpose(1, 0, 2))
        if order is not None:    # the batch in decreasing length: live rows lead
            x, h0, c0 = (_batch_order(a, order) for a in (x, h0, c0))
        S, L, D = self._S, self.num_layers, self._D
        # every layer's sizes and weights as its C call will check them, before
        # the first one writes: a refused forward leaves the layer as it was
        # (the last forward's scratch, its backward, the dropout offsets)
        for layer in range(L):
            for d in range(D):
                (w_ih, w_hh, b_ih, b_hh, w_hr), _ = self._layer_params(
                    f"_l{layer}" + ("_reverse" if d else ""))
                _fastopt.check_layer(self.mode, T, B, self.input_size if layer == 0 else D * S,
                                     self.hidden_size, w_ih, w_hh, b_ih, b_hh, self.proj_size,
                                     w_hr)
        runs = _runs(lengths, T, B)
        self._saved = None       # the scratch below is about to change
        saved, dropped, h_n, c_n = [], [], [], []
        inp = x
        for layer in range(L):
            outs = []
            for d in range(D):
                sfx = f"_l{layer}" + ("_reverse" if d else "")
                # the reverse direction reads each sequence from its own end
                src = _flip(inp, lengths, self._scratch(f"in{sfx}", inp.shape)) if d else inp
                k = layer * D + d
                runs_k, out, h, c = self._direction_forward(
                    sfx, src, h0[k] if h0 is not None else None,
                    c0[k] if c0 is not None else None, runs)
                saved.append(runs_k)
                outs.append(out)
                h_n.append(h)
                c_n.append(c)
            y = outs[0]
            if D == 2:           # both directions' h at each time step, side by side
                y = self._scratch(f"cat{layer}", (T, B, 2 * S))
                y[..., :S] = outs[0]
                _flip(outs[1], lengths, y[..., S:])
            drop = layer < L - 1 and dropout > 0
            if drop:
                self._dropouts[layer].training = True
                self._dropouts[layer].p = dropout
                y = self._dropouts[layer].forward(y, out=self._scratch(f"drop{layer}", y.shape))
            dropped.append(drop)
            inp = y
        self._saved, self._dropped = saved, dropped
        self._inputs = (("x", x), ("h0", h0), ("c0", c0))   # read again by backward
        self._shape, self._lengths, self._order = (T, B), lengths, order
        self._batch_first = batch_first
        out, h_n = inp, np.stack(h_n)
        c_n = np.stack(c_n) if self.mode == "lstm" else None
        if order is not None:    # back to the caller's batch order
            out, h_n, c_n = (_batch_order(a, np.argsort(order)) for a in (out, h_n, c_n))
        # a copy: backward reads the saved out, which the caller may then change
        result_out = out.transpose(1, 0, 2).copy() if batch_first else out.copy()
        return result_out, ((h_n, c_n) if self.mode == "lstm" else h_n)

    __call__ = forward

    @one_call_at_a_time
    def backward(self, dout, dstate=None):
        """dx, dstate = backward(dout, dstate=None): the gradients of the input
        and of the initial state from those of out (None = zeros) and of the
        final state (dstate: dh_n, LSTM (dh_n, dc_n); None = zeros). Parameter
        gradients are accumulated (+=) into gradients(); each forward is
        backpropagated once. Unbatched forward: unbatched shapes here too.
        With lengths, dout past each length is not read and dx is zero there."""
        if self._saved is None:
            raise ValueError("backward() needs a matching forward() first (each forward "
                             "is backpropagated once)")
        if not self._unbatched:
            return self._backward(dout, dstate, self._batch_first)
        T = self._shape[0]
        if dout is not None:
            dout = _input(dout, "dout", self.dtype, (T, self._D * self._S))[:, None]
        dstate = self._map_state(
            dstate, lambda a, n, part: _lead_axis(self._state_part(a, n, part, "dstate")),
            "dstate")
        dx, dstate = self._backward(dout, dstate, False)
        return dx[:, 0], self._map_state(dstate, lambda a, n, part: a[:, 0])

    def _direction_backward(self, runs, sfx, d_dir, dh_n, dc_n, dx, dh0, dc0, dgates,
                            dgates_hh):
        """Backward of one layer and direction: its runs newest first, each
        run's initial-state gradient becoming the final-state gradient of the
        live rows of the run before it."""
        T, B, I = dx.shape
        _, (gw_ih, gw_hh, gb_ih, gb_hh, gw_hr) = self._layer_params(sfx)
        lstm = self.mode == "lstm"
        if runs[0][:3] == (0, T, B):   # one run: no copies
            runs[0][3].backward(d_dir, dh_n, dc_n, dx, dh0, dc0, gw_ih, gw_hh, gb_ih, gb_hh,
                                dgates, dgates_hh, gw_hr)
            return
        H, S = self.hidden_size, self._S
        dh = dh_n.copy() if dh_n is not None else np.zeros((B, S), self.dtype)
        dc = (dc_n.copy() if dc_n is not None else np.zeros((B, H), self.dtype)) if lstm else None
        dx.fill(0)
        for t0, t1, nb, call in reversed(runs):
            shape = (t1 - t0, nb)
            dx_run = np.empty(shape + (I,), self.dtype)
            dh_run = np.empty((nb, S), self.dtype)
            dc_run = np.empty((nb, H), self.dtype) if lstm else None
            call.backward(None if d_dir is None else np.ascontiguousarray(d_dir[t0:t1, :nb]),
                          dh[:nb].copy(), dc[:nb].copy() if lstm else None, dx_run, dh_run,
                          dc_run, gw_ih, gw_hh, gb_ih, gb_hh, _lead(dgates, shape),
                          _lead(dgates_hh, shape), gw_hr)
            dx[t0:t1, :nb] = dx_run
            dh[:nb] = dh_run
            if lstm:
                dc[:nb] = dc_run
        dh0[...] = dh
        if lstm:
            dc0[...] = dc

    def _backward(self, dout, dstate, batch_first):
        saved, (T, B), lengths, order = self._saved, self._shape, self._lengths, self._order
        H, S, G, L, D = self.hidden_size, self._S, _GATES[self.mode], self.num_layers, self._D
        out_shape = (B, T, D * S) if batch_first else (T, B, D * S)
        if dout is not None:
            dout = _input(dout, "dout", self.dtype, out_shape)
            if batch_first:
                dout = np.ascontiguousarray(dout.transpose(1, 0, 2))
            dout = _batch_order(dout, order)
        dh_n = dc_n = None
        if dstate is not None:
            dh_n, dc_n = self._check_state(dstate, B, "dstate")
            dh_n, dc_n = _batch_order(dh_n, order), _batch_order(dc_n, order)
        self._check_reads_apart_from_grads(
            self._inputs + (("dout", dout), ("dh_n", dh_n), ("dc_n", dc_n)))
        # every argument is checked: this forward is now consumed, so that a second
        # backward cannot add the parameter gradients again (torch without retain_graph)
        self._saved = None
        dh0 = np.empty((L * D, B, S), self.dtype)
        dc0 = np.empty((L * D, B, H), self.dtype) if self.mode == "lstm" else None
        width = _fastopt.rnn_dgates_width(self.mode, H, self.dtype)
        dgates = self._scratch("dgates", (T, B, width))
        dgates_hh = self._scratch("dgates_hh", (T, B, width)) if self.mode == "gru" else None
        d_above = dout
        for layer in reversed(range(L)):
            if d_above is not None and self._dropped[layer]:
                d_above = self._dropouts[layer].backward(
                    d_above, out=self._scratch(f"ddrop{layer}", d_above.shape))
            d_dirs = [d_above]
            if D == 2:           # each direction's share of d_above, in its own time order
                d_dirs = [None, None]
                if d_above is not None:
                    d_dirs = [self._scratch("dfwd", (T, B, S)), self._scratch("drev", (T, B, S))]
                    np.copyto(d_dirs[0], d_above[..., :S])
                    _flip(d_above[..., S:], lengths, d_dirs[1])
            I = self.input_size if layer == 0 else D * S
            dxs = []
            for d in range(D):
                k, sfx = layer * D + d, f"_l{layer}" + ("_reverse" if d else "")
                dx = (np.empty((T, B, I), self.dtype) if layer == 0 and D == 1
                      else self._scratch(f"dx{sfx}", (T, B, I)))
                self._direction_backward(
                    saved[k], sfx, d_dirs[d], dh_n[k] if dh_n is not None else None,
                    dc_n[k] if dc_n is not None else None, dx, dh0[k],
                    dc0[k] if dc0 is not None else None, dgates, dgates_hh)
                dxs.append(dx)
            d_above = dxs[0]
            if D == 2:           # the reverse direction saw each sequence from its end
                d_above = (np.empty((T, B, I), self.dtype) if layer == 0
                           else self._scratch(f"dxsum{layer}", (T, B, I)))
                np.add(dxs[0], _flip(dxs[1], lengths, self._scratch("dflip", (T, B, I))),
                       out=d_above)
        dx = d_above
        if order is not None:    # back to the caller's batch order
            dx, dh0, dc0 = (_batch_order(a, np.argsort(order)) for a in (dx, dh0, dc0))
        dx = dx.transpose(1, 0, 2).copy() if batch_first else dx
        return dx, ((dh0, dc0) if self.mode == "lstm" else dh0)


class RNN(_SequenceLayer):
    """Elman RNN: h_t = act(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh), act tanh or relu."""

    def __init__(self, input_size, hidden_size, num_layers=1, nonlinearity="tanh", bias=True,
                 batch_first=False, dropout=0.0, bidirectional=False, dtype=np.float32,
                 seed=None):
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}")
        self.nonlinearity = nonlinearity
        super().__init__("rnn_" + nonlinearity, input_size, hidden_size, num_layers, bias,
                         batch_first, dropout, bidirectional, dtype, seed)


class LSTM(_SequenceLayer):
    """LSTM, gates i, f, g, o: c_t = f*c_{t-1} + i*g, h_t = o*tanh(c_t); with
    proj_size P > 0 (as torch), h_t = W_hr (o*tanh(c_t)) of width P: out and h
    are P wide, c stays hidden_size wide."""

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False,
                 dropout=0.0, bidirectional=False, proj_size=0, dtype=np.float32, seed=None):
        super().__init__("lstm", input_size, hidden_size, num_layers, bias, batch_first,
                         dropout, bidirectional, dtype, seed, proj_size)


class GRU(_SequenceLayer):
    """GRU, gates r, z, n: h_t = (1-z)*n + z*h_{t-1}; reset_after=True (torch):
    n = tanh(W_in x + b_in + r*(W_hn h + b_hn)); False (Cho et al.):
    n = tanh(W_in x + b_in + W_hn (r*h) + b_hn)."""

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False,
                 dropout=0.0, bidirectional=False, dtype=np.float32, seed=None,
                 reset_after=True):
        self.reset_after = _bool(reset_after, "reset_after")
        super().__init__("gru" if reset_after else "gru_reset_before", input_size,
                         hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
                         dtype, seed)


_SEQUENCE_ARGS = """

    Arguments as torch's (pass the options by keyword): input_size,
    hidden_size, num_layers (stacked layers), bias, batch_first (x and out are
    (B, T, *) instead of (T, B, *)), dropout (on every layer's output but the
    last, in training), bidirectional, dtype (np.float32 or np.float64) and
    seed (weights U(-1/sqrt(H), 1/sqrt(H)); None: fresh randomness).
    out, state = forward(x, state=None, lengths=None); dx, dstate =
    backward(dout, dstate=None), once per forward; parameter gradients
    accumulate (+=). state_dict()/load_state_dict() use torch's names.
    backward may read the caller's x and initial state themselves, not
    copies (torch saves them too): do not modify them between forward and
    backward."""
for _cls in (RNN, LSTM, GRU):
    _cls.__doc__ = (_cls.__doc__ or "") + _SEQUENCE_ARGS   # None under python -OO


class _Cell(_Recurrent):
    """One step: forward(x, state) may be called T times, then backward T
    times, newest step first (a stack of the saved steps). Unbatched input,
    x (I,) with states (H,), is a batch of one, as in torch: each saved step
    remembers its form, and its backward takes and returns the same."""

    def __init__(self, mode, input_size, hidden_size, bias, dtype, seed):
        self._init_params(mode, input_size, hidden_size, 1, bias, dtype, seed, [""])
        self._steps = []        # saved steps, newest last
        self._free = []         # gate buffers of popped steps, reused

    def _state_input(self, a, name, unbatched, B):
        """A state (h0, c0) checked against x: (H,) when x is unbatched, else
        (B, H); as a (B, H) array either way (None stays None). Mixing the two
        forms is refused by name, as torch does."""
        if a is None:
            return None
        a = _fastopt.as_array(a, name)
        if a.ndim != (1 if unbatched else 2):
            form = ("1-D (hidden_size,) since x is unbatched (1-D)" if unbatched
                    else "2-D (batch, hidden_size) since x is batched (2-D)")
            raise ValueError(f"{name} must be {form}, got shape {a.shape}")
        a = _input(a, name, self.dtype, (self.hidden_size,) if unbatched else (B, self.hidden_size))
        return a[None] if unbatched else a

    @one_call_at_a_time
    def _step(self, x, h0, c0):
        self._check_flags()     # the attributes may have been edited since __init__
        x = _fastopt.as_array(x, "x")
        if x.ndim not in (1, 2):
            raise ValueError(f"x must be 2-D (batch, input_size) or 1-D (input_size,), "
                             f"got shape {x.shape}")
        unbatched = x.ndim == 1
        x = _input(x, "x", self.dtype, x.shape[:-1] + (self.input_size,))
        if unbatched:            # a batch of one, as torch takes it
            x = x[None]
        B, H, G = x.shape[0], self.hidden_size, _GATES[self.mode]
        h0 = self._state_input(h0, "h0", unbatched, B)
        c0 = self._state_input(c0, "c0", unbatched, B)
        # a popped step's gate buffer, taken off the free list only once the
        # call has been accepted (the list holds buffers of one shape: see _recycle)
        reuse = bool(self._free) and self._free[-1].shape == (B, G * H)
        gates = self._free[-1] if reuse else np.empty((B, G * H), self.dtype)
        h1 = np.empty((B, H), self.dtype)
        c1 = np.empty((B, H), self.dtype) if self.mode == "lstm" else None
        extra = np.empty((B, H), self.dtype) if G == 3 else None
        (w_ih, w_hh, b_ih, b_hh, _), _ = self._layer_params("")
        s = _Saved()
        s.x, s.h0, s.c0, s.out, s.c_all = x, h0, c0, h1, c1
        s.gates, s.unbatched = gates, unbatched
        s.call = _fastopt.RnnLayerCall(self.mode, 1, B, self.input_size, H, w_ih, w_hh,
                                       b_ih, b_hh, x, h0, c0, h1, c1, gates, extra)
        s.call.forward()
        if reuse:
            self._free.pop()
        else:   # another batch size: the buffers kept for the old one would never serve
            self._free.clear()
        self._steps.append(s)
        # copies: backward reads the saved h1/c1, which the caller may then change
        if unbatched:
            h1, c1 = h1[0], (c1[0] if c1 is not None else None)
        return h1.copy(), (c1.copy() if c1 is not None else None)

    @one_call_at_a_time
    def _unstep(self, dh1, dc1):
        if not self._steps:
            raise ValueError("backward() needs a matching forward() first (every step "
                             "stepped forward is backpropagated once, newest first)")
        s = self._steps[-1]
        B, H, G = s.x.shape[0], self.hidden_size, _GATES[self.mode]
        shape = (H,) if s.unbatched else (B, H)   # the form of this step's forward
        dh1 = _input(dh1, "dh1", self.dtype, shape).reshape(B, H)
        if dc1 is not None:
            dc1 = _input(dc1, "dc1", self.dtype, shape).reshape(B, H)
        self._check_reads_apart_from_grads(
            (("x", s.x), ("h0", s.h0), ("c0", s.c0), ("dh1", dh1), ("dc1", dc1)))
        _, (gw_ih, gw_hh, gb_ih, gb_hh, _) = self._layer_params("")
        dx = np.empty((B, self.input_size), self.dtype)
        dh0 = np.empty((B, H), self.dtype)
        dc0 = np.empty((B, H), self.dtype) if self.mode == "lstm" else None
        width = _fastopt.rnn_dgates_width(self.mode, H, self.dtype)
        dgates = self._scratch("dgates", (B, width))
        dgates_hh = self._scratch("dgates_hh", (B, width)) if self.mode == "gru" else None
        s.call.backward(dh1, None, dc1, dx, dh0, dc0, gw_ih, gw_hh, gb_ih, gb_hh,
                        dgates, dgates_hh)
        self._steps.pop()
        self._recycle([s.gates])
        if s.unbatched:
            dx, dh0, dc0 = dx[0], dh0[0], (dc0[0] if dc0 is not None else None)
        return dx, dh0, dc0

    @one_call_at_a_time
    def reset(self):
        """Forget the saved steps (e.g. after truncating backpropagation). Their
        gate buffers are kept for the next steps, so memory stays at the longest
        run's peak until the batch shape changes or the cell is deleted."""
        # reused as backward's popped ones are: a forward-only loop that
        # resets then allocates none per step
        self._recycle([s.gates for s in self._steps])
        self._steps.clear()

    def _recycle(self, buffers):
        """Keep gate buffers for the next steps, of one shape only (the newest's):
        memory then stays at its peak even when the batch size changes (a
        smaller last batch), instead of growing with buffers of the old size."""
        for g in buffers:
            if self._free and self._free[-1].shape != g.shape:
                self._free.clear()
            self._free.append(g)


class _HiddenOnlyCell(_Cell):
    """A cell whose state is h alone (RNNCell, GRUCell)."""

    def forward(self, x, h0=None):
        """h1 = forward(x (B, I), h0 (B, H) or None = zeros); unbatched x (I,),
        h0 (H,) gives h1 (H,)."""
        return self._step(x, h0, None)[0]

    __call__ = forward

    def backward(self, dh1):
        """dx, dh0 = backward(dh1) for the newest step not yet backpropagated;
        shapes as that step's forward: dh1 (B, H) -> dx (B, I), dh0 (B, H), or
        unbatched dh1 (H,) -> dx (I,), dh0 (H,)."""
        dx, dh0, _ = self._unstep(dh1, None)
        return dx, dh0


class RNNCell(_HiddenOnlyCell):
    """h1 = act(W_ih x + b_ih + W_hh h0 + b_hh), act tanh or relu."""

    def __init__(self, input_size, hidden_size, bias=True, nonlinearity="tanh",
                 dtype=np.float32, seed=None):
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}")
        self.nonlinearity = nonlinearity
        super().__init__("rnn_" + nonlinearity, input_size, hidden_size, bias, dtype, seed)


class GRUCell(_HiddenOnlyCell):
    """GRU step, gates r, z, n (see GRU); h1 = (1-z)*n + z*h0."""

    def __init__(self, input_size, hidden_size, bias=True, reset_after=True,
                 dtype=np.float32, seed=None):
        self.reset_after = _bool(reset_after, "reset_after")
        super().__init__("gru" if reset_after else "gru_reset_before", input_size,
                         hidden_size, bias, dtype, seed)


class LSTMCell(_Cell):
    """LSTM step, gates i, f, g, o: c1 = f*c0 + i*g, h1 = o*tanh(c1)."""

    def __init__(self, input_size, hidden_size, bias=True, dtype=np.float32, seed=None):
        super().__init__("lstm", input_size, hidden_size, bias, dtype, seed)

    def forward(self, x, state=None):
        """h1, c1 = forward(x (B, I), (h0, c0) each (B, H), or None = zeros);
        unbatched x (I,), h0 and c0 (H,) give h1, c1 (H,)."""
        if state is None:
            h0 = c0 = None
        elif isinstance(state, (tuple, list)) and len(state) == 2:
            h0, c0 = state
        else:
            raise TypeError("state must be a tuple (h0, c0) or None")
        return self._step(x, h0, c0)

    __call__ = forward

    def backward(self, dh1, dc1=None):
        """dx, (dh0, dc0) = backward(dh1, dc1=None) for the newest step; shapes
        as that step's forward: (B, H) -> dx (B, I), or unbatched (H,) -> dx (I,)."""
        dx, dh0, dc0 = self._unstep(dh1, dc1)
        return dx, (dh0, dc0)


_CELL_ARGS = """

    Arguments as torch's: input_size, hidden_size, bias, then dtype (np.float32
    or np.float64) and seed (weights U(-1/sqrt(H), 1/sqrt(H)); None: fresh
    randomness). forward may be called T times, then backward T times, newest
    step first; parameter gradients accumulate (+=). Each step's backward
    reads the caller's x and state of that step themselves, not copies
    (torch saves them too): do not modify them until it is backpropagated.
    A step is kept for its backward (in eval() too) until backpropagated or
    forgotten by reset(): a forward-only loop (inference, generation, which
    torch would run under no_grad) calls reset() after its steps, else every
    step's buffers stay alive."""
for _cls in (RNNCell, GRUCell, LSTMCell):
    _cls.__doc__ = (_cls.__doc__ or "") + _CELL_ARGS
