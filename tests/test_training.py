"""A whole training loop, fastopt against torch: the same model, data and
optimizer, trained step by step in both, ends with the same parameters.

What a user swapping torch (or their NumPy loop) for fastopt relies on: the
layers' forwards, their backwards (accumulated into gradients()), zero_grad,
the dropout mask, the running statistics and an optimizer's step compose
exactly as torch's autograd and torch.optim compose them."""
import numpy as np
import pytest

import fastopt as fo
from fastopt import functional as F

T, B, I, H, OUT = 6, 8, 5, 7, 3
P_DROP = 0.25


def _make_models(torch, kind, seed=0):
    """fastopt's layers, and torch modules holding the same weights (float64)."""
    rnn = getattr(fo, kind)(I, H, num_layers=2, seed=seed, dtype=np.float64)
    bn = fo.BatchNorm(H, dtype=np.float64)
    rng = np.random.default_rng(seed + 1)
    head_w = rng.standard_normal((OUT, H)) / np.sqrt(H)
    head_b = rng.standard_normal(OUT) * 0.1
    t_rnn = getattr(torch.nn, kind)(I, H, num_layers=2).double()
    t_rnn.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in rnn.state_dict().items()})
    t_bn = torch.nn.BatchNorm1d(H).double()
    t_head = torch.nn.Linear(H, OUT).double()
    with torch.no_grad():
        t_head.weight.copy_(torch.from_numpy(head_w))
        t_head.bias.copy_(torch.from_numpy(head_b))
    return (rnn, bn, head_w, head_b), (t_rnn, t_bn, t_head)


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
@pytest.mark.parametrize("opt_name,kw", [("AdamW", dict(lr=1e-2, weight_decay=0.1)),
                                         ("SGD", dict(lr=0.1, momentum=0.9, nesterov=True)),
                                         ("RMSprop", dict(lr=1e-3, centered=True))])
def test_training_loop_matches_torch(torch, kind, opt_name, kw):
    """20 steps of: 2-layer LSTM/GRU over the sequence, BatchNorm on its last
    output, dropout (fastopt's mask applied to torch too), a linear head (its
    gradient written here in NumPy), squared error; then one optimizer step
    over every parameter. All parameters and the running statistics end equal
    to torch's to float64 rounding."""
    (rnn, bn, head_w, head_b), (t_rnn, t_bn, t_head) = _make_models(torch, kind)
    params = rnn.parameters() + bn.parameters() + [head_w, head_b]
    opt = getattr(fo, opt_name)(params, **kw)
    t_params = list(t_rnn.parameters()) + list(t_bn.parameters()) + list(t_head.parameters())
    t_opt = getattr(torch.optim, opt_name)(t_params, foreach=False, **kw)
    rng = np.random.default_rng(7)
    losses = []
    for step in range(20):
        x = rng.standard_normal((T, B, I))
        target = rng.standard_normal((B, OUT))

        # fastopt: forward, loss, backward by hand through the head
        out, _ = rnn.forward(x)
        z = bn.forward(out[-1])
        d, mask = F.dropout(z, P_DROP, seed=step)
        y = d @ head_w.T + head_b
        losses.append(float(((y - target) ** 2).mean()))
        dy = 2 * (y - target) / y.size
        for a in (rnn, bn):
            a.zero_grad()
        g_w, g_b = dy.T @ d, dy.sum(0)
        dz = F.dropout_backward(dy @ head_w, mask, P_DROP)
        dout = np.zeros_like(out)
        dout[-1] = bn.backward(dz)
        rnn.backward(dout)
        opt.step(rnn.gradients() + bn.gradients() + [g_w, g_b])

        # torch: the same step through autograd, with fastopt's mask
        keep = np.unpackbits(mask, count=z.size, bitorder="little").reshape(z.shape)
        t_opt.zero_grad()
        t_out, _ = t_rnn(torch.from_numpy(x))
        t_d = t_bn(t_out[-1]) * torch.from_numpy(keep.astype(np.float64)) / (1 - P_DROP)
        t_loss = ((t_head(t_d) - torch.from_numpy(target)) ** 2).mean()
        t_loss.backward()
        t_opt.step()
        assert losses[-1] == pytest.approx(t_loss.item(), rel=1e-9)

    for p, tp in zip(params, t_params):
        np.testing.assert_allclose(p, tp.detach().numpy(), rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(bn.running_mean, t_bn.running_mean.numpy(), rtol=1e-9)
    np.testing.assert_allclose(bn.running_var, t_bn.running_var.numpy(), rtol=1e-9)
    assert 0 < keep.mean() < 1        # the mask did drop some and keep some


# ------------------------------------------------- one object, two threads

def _in_two_threads(work):
    import threading
    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def test_one_optimizer_stepped_from_two_threads_loses_no_update():
    """Its steps reuse one state: two at once lost elements' updates (Adam's
    step count said 40 while params lay between 0.58 and 0.62, not 0.6)."""
    p, serial = np.ones(1 << 21, np.float32), np.ones(1 << 21, np.float32)
    g = np.full_like(p, 0.5)
    opt, ref = fo.Adam([p], lr=0.01), fo.Adam([serial], lr=0.01)

    def work(_):
        for _ in range(15):
            opt.step([g])

    _in_two_threads(work)
    for _ in range(30):       # the same gradient every step: any order gives this
        ref.step([g])
    np.testing.assert_array_equal(p, serial)
    assert opt.state_dict()["state"][0]["step"] == 30


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "BatchNorm", "LSTMCell"])
def test_one_layer_called_from_two_threads_gives_each_its_own_result(kind):
    """The layers reuse their scratch from call to call: a shared LSTM in eval
    gave 380 wrong outputs of 400 when two threads ran forward at once."""
    rng = np.random.default_rng(0)
    if kind == "BatchNorm":
        m = fo.BatchNorm(16)
        xs = [rng.standard_normal((64, 16, 8, 8)).astype(np.float32) for _ in range(2)]
        run = lambda x: m.forward(x)                                  # noqa: E731
    elif kind == "LSTMCell":
        m = fo.LSTMCell(16, 64, seed=0)
        xs = [rng.standard_normal((20, 16)).astype(np.float32) for _ in range(2)]
        run = lambda x: (m.forward(x), m.reset())[0][0]              # noqa: E731
    else:
        m = getattr(fo, kind)(16, 64, seed=0)
        xs = [rng.standard_normal((30, 20, 16)).astype(np.float32) for _ in range(2)]
        run = lambda x: m.forward(x)[0]                               # noqa: E731
    m.eval()
    want = [run(x).copy() for x in xs]
    wrong = [0, 0]

    def work(i):
        for _ in range(60):
            wrong[i] += not np.array_equal(run(xs[i]), want[i])

    _in_two_threads(work)
    assert wrong == [0, 0]
