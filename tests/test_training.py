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
