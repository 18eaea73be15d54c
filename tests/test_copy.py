"""pickle and copy.deepcopy of every layer, also between a forward and its
backward: the copy has its own parameters, buffers and saved forward, and
continues exactly as the original does. (Optimizers: test_optim.py.)"""
import copy
import pickle

import numpy as np
import pytest

import fastopt as fo

RNG = np.random.default_rng(0)
X_SEQ = RNG.standard_normal((5, 3, 8)).astype(np.float32)
X_FLAT = RNG.standard_normal((15, 8)).astype(np.float32)


LAYERS = {   # name: (make, forward -> list of arrays, backward(m, dy) -> list of arrays)
    "LSTM": (lambda: fo.LSTM(8, 16, num_layers=2, bidirectional=True, seed=0),
             lambda m: [m.forward(X_SEQ)[0]], lambda m, dy: [m.backward(dy)[0]]),
    "LSTM-proj": (lambda: fo.LSTM(8, 16, proj_size=4, seed=0),
                  lambda m: [m.forward(X_SEQ)[0]], lambda m, dy: [m.backward(dy)[0]]),
    "GRU": (lambda: fo.GRU(8, 16, seed=0, dtype=np.float64),
            lambda m: [m.forward(X_SEQ.astype(np.float64))[0]],
            lambda m, dy: [m.backward(dy)[0]]),
    "RNNCell": (lambda: fo.RNNCell(8, 16, seed=0),
                lambda m: [m.forward(X_SEQ[0])], lambda m, dy: list(m.backward(dy))),
    "LSTMCell": (lambda: fo.LSTMCell(8, 16, seed=0),
                 lambda m: [m.forward(X_SEQ[0])[0]], lambda m, dy: [m.backward(dy)[0]]),
    "GRUCell": (lambda: fo.GRUCell(8, 16, seed=0, reset_after=False),
                lambda m: [m.forward(X_SEQ[0])], lambda m, dy: list(m.backward(dy))),
    "BatchNorm": (lambda: fo.BatchNorm(8),
                  lambda m: [m.forward(X_FLAT), m.running_mean.copy(), m.running_var.copy()],
                  lambda m, dy: [m.backward(dy)]),
    "Dropout": (lambda: fo.Dropout(0.3, seed=4),
                lambda m: [m.forward(X_SEQ)], lambda m, dy: [m.backward(dy)]),
}


@pytest.mark.parametrize("how", ["pickle", "deepcopy"])
@pytest.mark.parametrize("name", list(LAYERS))
def test_copied_layer_continues_exactly_and_alone(name, how):
    make, forward, backward = LAYERS[name]
    m = make()
    y = forward(m)[0]                        # its backward is still to come
    dy = np.cos(np.arange(y.size, dtype=y.dtype)).reshape(y.shape)
    clone = pickle.loads(pickle.dumps(m)) if how == "pickle" else copy.deepcopy(m)
    assert not any(np.shares_memory(a, b) for a in m.parameters() for b in clone.parameters())
    assert not any(np.shares_memory(a, b) for a in m.gradients() for b in clone.gradients())
    for step in (lambda l: backward(l, dy), forward, lambda l: backward(l, dy)):
        for a, b in zip(step(m), step(clone)):   # the pending backward, then a whole round
            np.testing.assert_array_equal(a, b)
        for a, b in zip(m.gradients(), clone.gradients()):
            np.testing.assert_array_equal(a, b)
    before = [p.copy() for p in m.parameters()]
    for p in clone.parameters():
        p += 1
    for a, b in zip(m.parameters(), before):
        np.testing.assert_array_equal(a, b)
