"""Dropout and Gaussian noise: the mask against a NumPy Philox4x32-10 written
here from the published algorithm (checked on its known-answer vectors) and
the element layout documented in src_c/rng.h and dropout.c; keep-rate
statistics; backward from the mask and from (seed, offset); torch parity of
the scaling and gradients; thread determinism; bad input."""
import numpy as np
import pytest

import fastopt as fo
from fastopt import functional as F
from conftest import DTYPES

SIZES = [0, 1, 7, 1023, 2**20 + 3]
M32 = np.uint64(0xFFFFFFFF)


def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Vectorized Philox4x32-10 (Salmon et al. 2011) on uint64 arrays holding
    32-bit words."""
    c = [np.asarray(v, np.uint64) & M32 for v in (c0, c1, c2, c3)]
    k0, k1 = np.uint64(k0), np.uint64(k1)
    for _ in range(10):
        p0 = np.uint64(0xD2511F53) * c[0]
        p1 = np.uint64(0xCD9E8D57) * c[2]
        c = [((p1 >> np.uint64(32)) ^ c[1] ^ k0) & M32, p1 & M32,
             ((p0 >> np.uint64(32)) ^ c[3] ^ k1) & M32, p0 & M32]
        k0 = (k0 + np.uint64(0x9E3779B9)) & M32
        k1 = (k1 + np.uint64(0xBB67AE85)) & M32
    return c


def test_philox_reference_known_answers():
    """Random123's known-answer vectors for philox4x32-10."""
    cases = [((0, 0, 0, 0), (0, 0), (0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8)),
             ((0xffffffff,) * 4, (0xffffffff,) * 2,
              (0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd)),
             ((0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344), (0xa4093822, 0x299f31d0),
              (0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1))]
    for ctr, key, want in cases:
        assert [int(v) for v in philox4x32_10(*ctr, *key)] == list(want)


def uniform32(n, seed, offset):
    """The 32-bit uniforms U of elements 0..n-1 per the documented layout:
    element i = 256*g + e takes byte e % 4 (little-endian) of word q = e // 4 of
    group g, that is word q // 16 of the block with counter (16*g + q % 16,
    offset), key seed, as U's top 8 bits; U's low 24 bits are the low 24 bits of
    word 0 of the block with counter (i | 2^63, offset) (the kernel draws them
    only on a tie of the top 8 bits with the threshold's)."""
    i = np.arange(n, dtype=np.uint64)
    g, e = i // np.uint64(256), i % np.uint64(256)
    q = e // np.uint64(4)
    block = g * np.uint64(16) + q % np.uint64(16)
    off_lo, off_hi = offset & 0xFFFFFFFF, offset >> 32
    words = philox4x32_10(block & M32, block >> np.uint64(32), off_lo, off_hi,
                          seed & 0xFFFFFFFF, seed >> 32)
    word = np.choose((q // np.uint64(16)).astype(np.int64), words)
    top8 = (word >> (np.uint64(8) * (e % np.uint64(4)))) & np.uint64(0xFF)
    extra = philox4x32_10(i & M32, (i >> np.uint64(32)) | np.uint64(0x80000000),
                          off_lo, off_hi, seed & 0xFFFFFFFF, seed >> 32)[0]
    return (top8 << np.uint64(24)) | (extra & np.uint64(0xFFFFFF))


def reference_keep(n, p, seed, offset):
    """Kept elements: U >= round(p * 2^32)."""
    t = min(int(round(p * 2**32)), 2**32 - 1)
    return uniform32(n, seed, offset) >= np.uint64(t)


def unpack(mask, n):
    return np.unpackbits(mask, count=n, bitorder="little").astype(bool)


@pytest.fixture(params=["dispatched", "portable"])
def code_path(request):
    """Both the run-time chosen code (AVX-512 where the CPU has it) and the
    portable code."""
    from fastopt import _fastopt
    _fastopt._dropout_use_portable(request.param == "portable")
    yield request.param
    _fastopt._dropout_use_portable(False)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("p,seed,offset", [(0.3, 123, 0), (0.5, 2**64 - 1, 2**40 + 5),
                                           (0.9, 7, 3)])
def test_mask_matches_reference_philox(code_path, n, p, seed, offset):
    x = np.ones(n, np.float32)
    y, mask = F.dropout(x, p, seed, offset=offset)
    assert mask.dtype == np.uint8 and mask.size == (n + 7) // 8
    np.testing.assert_array_equal(unpack(mask, n), reference_keep(n, p, seed, offset))
    # the bits past the end are 0
    assert not np.unpackbits(mask, bitorder="little")[n:].any()


@pytest.mark.parametrize("i", [0, 77, 299])   # 299: in the partial last group
def test_exact_tie_with_the_threshold_keeps(code_path, i):
    # U == round(p * 2^32) exactly (probability 2^-32 per element, so random
    # masks never test it): kept, as U >= threshold; one more is dropped
    n, seed, offset = 300, 123, 5
    u = int(uniform32(n, seed, offset)[i])
    for t, kept in ((u, True), (u + 1, False)):
        y, mask = F.dropout(np.ones(n, np.float32), t / 2**32, seed, offset=offset)
        assert unpack(mask, n)[i] == kept
        np.testing.assert_array_equal(unpack(mask, n), reference_keep(n, t / 2**32, seed, offset))


def test_many_ties_in_one_word(code_path):
    # Ties of the top 8 bits are settled from extra draws, word by word: pick
    # the 64-element word and threshold byte with the most ties (at least 3)
    # and check every bit, with the threshold's low 24 bits at, above and
    # below those elements' draws.
    n, seed, offset = 1 << 16, 9, 1
    top8 = (uniform32(n, seed, offset) >> np.uint64(24)).astype(np.int64).reshape(-1, 64)
    counts = np.stack([(top8 == v).sum(axis=1) for v in range(256)])   # (byte, word)
    byte, word = np.unravel_index(np.argmax(counts), counts.shape)
    assert counts[byte, word] >= 3
    tied = np.flatnonzero(top8[word] == byte) + 64 * word
    low = uniform32(n, seed, offset)[tied] & np.uint64(0xFFFFFF)
    for t_lo in (1, int(np.median(low)), int(low.max()), 0xFFFFFF):
        p = ((int(byte) << 24) + t_lo) / 2**32
        y, mask = F.dropout(np.ones(n, np.float32), p, seed, offset=offset)
        keep = reference_keep(n, p, seed, offset)
        assert 0 < keep[tied].sum() < len(tied) or t_lo in (1, 0xFFFFFF)
        np.testing.assert_array_equal(unpack(mask, n), keep)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES)
def test_forward_backward_values(code_path, dtype, n):
    p = 0.25
    rng = np.random.default_rng(n)
    x, dy = rng.standard_normal(n).astype(dtype), rng.standard_normal(n).astype(dtype)
    x0 = x.copy()
    y, mask = F.dropout(x, p, 99, offset=4)
    keep = unpack(mask, n)
    scale = dtype(1 / (1 - p))
    np.testing.assert_allclose(y, np.where(keep, x * scale, 0), rtol=1e-7 if dtype == np.float32 else 1e-15)
    np.testing.assert_array_equal(x, x0)
    dx = F.dropout_backward(dy, mask, p)
    np.testing.assert_allclose(dx, np.where(keep, dy * scale, 0), rtol=1e-7 if dtype == np.float32 else 1e-15)
    # without a mask: regenerated from (seed, offset), bitwise the same
    dx2 = F.dropout_backward(dy, None, p, seed=99, offset=4)
    np.testing.assert_array_equal(dx2, dx)
    y2, none = F.dropout(x, p, 99, offset=4, store_mask=False)
    assert none is None
    np.testing.assert_array_equal(y2, y)


@pytest.mark.parametrize("p", [0.01, 0.1, 0.5, 0.9, 0.999])
def test_keep_rate_is_binomial(p):
    n = 2**22
    _, mask = F.dropout(np.ones(n, np.float32), p, seed=2024)
    k = int(np.unpackbits(mask).sum())
    mean, sd = n * (1 - p), np.sqrt(n * p * (1 - p))
    assert abs(k - mean) < 5 * sd
    # independence across offsets: two masks agree at rate p^2 + (1-p)^2
    _, mask2 = F.dropout(np.ones(n, np.float32), p, seed=2024, offset=1)
    agree = n - int(np.unpackbits(mask ^ mask2).sum())
    q = p * p + (1 - p) ** 2
    assert abs(agree - n * q) < 5 * np.sqrt(n * q * (1 - q))


def test_keep_rate_of_blocks_is_uniform():
    """Chi-square of kept counts over the 256 positions of each 256-group."""
    n, p = 256 * 20000, 0.5
    _, mask = F.dropout(np.ones(n, np.float32), p, seed=5)
    keep = unpack(mask, n).reshape(-1, 256).sum(0)
    expect = 20000 * (1 - p)
    chi2 = ((keep - expect) ** 2 / (expect * p)).sum()
    assert chi2 < 360     # 255 degrees of freedom: mean 255, sd 22.6


@pytest.mark.parametrize("dtype", DTYPES)
def test_p0_identity_p1_zeros(dtype):
    x = np.random.default_rng(0).standard_normal(1001).astype(dtype)
    y, mask = F.dropout(x, 0.0, 1)
    np.testing.assert_array_equal(y, x)
    assert unpack(mask, x.size).all()
    y, mask = F.dropout(x, 1.0, 1)
    np.testing.assert_array_equal(y, np.zeros_like(x))
    assert not mask.any()
    np.testing.assert_array_equal(F.dropout_backward(x, mask, 1.0), np.zeros_like(x))


def test_nan_propagates_like_torch_multiply():
    x = np.array([np.nan, np.inf, 1.0] * 100, np.float32)
    y, mask = F.dropout(x, 0.5, 3)
    keep = unpack(mask, x.size)
    assert np.isnan(y[0::3]).all()                       # NaN * anything
    assert np.isnan(y[1::3][~keep[1::3]]).all()          # inf * 0
    assert np.isinf(y[1::3][keep[1::3]]).all()


def test_threads_and_in_place(threads):
    x = np.random.default_rng(0).standard_normal(3 * 10**6 + 5).astype(np.float32)
    outs = []
    for nt in (1, 2, 3):
        fo.set_num_threads(nt)
        outs.append(F.dropout(x, 0.4, 11, offset=2))
    for y, m in outs[1:]:
        np.testing.assert_array_equal(y, outs[0][0])
        np.testing.assert_array_equal(m, outs[0][1])
    z = x.copy()
    y, _ = F.dropout(z, 0.4, 11, out=z, offset=2)
    assert y is z
    np.testing.assert_array_equal(z, outs[0][0])
    noisy = [None, None]
    for k, nt in enumerate((1, 2)):
        fo.set_num_threads(nt)
        noisy[k] = F.gaussian_noise(x, 0.3, seed=8)
    np.testing.assert_array_equal(noisy[0], noisy[1])


def test_torch_parity(torch):
    """torch.nn.Dropout scales kept units by 1/(1-p) like us (compared on the
    elements both keep), its eval is the identity, and autograd through
    x * mask / (1-p) with our mask gives our backward."""
    p = 0.3
    x = np.random.default_rng(1).standard_normal(10000).astype(np.float32)
    y, mask = F.dropout(x, p, 5)
    ty = torch.nn.Dropout(p).train()(torch.tensor(x)).numpy()
    both = unpack(mask, x.size) & (ty != 0)
    np.testing.assert_allclose(y[both], ty[both], rtol=1e-6)
    tkeep = (ty != 0).mean()
    assert abs(tkeep - (1 - p)) < 0.02 and abs(unpack(mask, x.size).mean() - (1 - p)) < 0.02
    layer = fo.Dropout(p, seed=5).eval()
    np.testing.assert_array_equal(layer.forward(x), torch.nn.Dropout(p).eval()(torch.tensor(x)).numpy())
    tx = torch.tensor(x, requires_grad=True)
    tm = torch.tensor(unpack(mask, x.size).astype(np.float32))
    (tx * tm / (1 - p)).backward(torch.tensor(np.arange(x.size, dtype=np.float32)))
    dx = F.dropout_backward(np.arange(x.size, dtype=np.float32), mask, p)
    np.testing.assert_allclose(dx, tx.grad.numpy(), rtol=1e-6)


def test_layer_offsets_modes_and_store_mask():
    x = np.random.default_rng(0).standard_normal((64, 33)).astype(np.float32)
    a, b = fo.Dropout(0.5, seed=42), fo.Dropout(0.5, seed=42, store_mask=False)
    assert a.parameters() == [] and a.gradients() == []
    ya1, yb1 = a.forward(x), b.forward(x)
    np.testing.assert_array_equal(ya1, yb1)
    ya2 = a.forward(x)
    assert not np.array_equal(ya1, ya2)           # a new mask every step
    dy = np.ones_like(x)
    da, db = a.backward(dy), b.forward(x) is not None and b.backward(dy)
    np.testing.assert_array_equal(da, np.where(ya2 != 0, 2.0, 0.0).astype(np.float32))
    np.testing.assert_array_equal(db, da)         # b's 2nd forward used the same offset
    ref, _ = F.dropout(x, 0.5, 42, offset=1)
    np.testing.assert_array_equal(ya2, ref)
    x64 = x.astype(np.float64)                    # any float dtype, as torch
    ref64, _ = F.dropout(x64, 0.5, 42, offset=2)
    np.testing.assert_array_equal(a.forward(x64), ref64)
    a.eval()
    assert a.forward(x) is x and a.backward(dy) is dy
    assert not a.training
    a.train()
    assert a.training


@pytest.mark.parametrize("dtype", DTYPES)
def test_gaussian_noise(dtype):
    n = 2**20 + 3
    x = np.linspace(-1, 1, n).astype(dtype)
    y = F.gaussian_noise(x, 0.5, seed=1)
    z = (y.astype(np.float64) - x) / 0.5
    assert abs(z.mean()) < 5 / np.sqrt(n)
    assert abs(z.var() - 1) < 5 * np.sqrt(2 / n)
    assert abs(((z ** 4).mean()) - 3) < 0.05        # Gaussian kurtosis
    assert abs(np.mean(z[:-1] * z[1:])) < 5 / np.sqrt(n)
    np.testing.assert_array_equal(F.gaussian_noise(x, 0.5, seed=1), y)
    assert not np.array_equal(F.gaussian_noise(x, 0.5, seed=1, offset=1), y)
    np.testing.assert_array_equal(F.gaussian_noise(x, 0.0, seed=1), x)
    x2 = x.copy()
    assert F.gaussian_noise(x2, 0.5, seed=1, out=x2) is x2
    np.testing.assert_array_equal(x2, y)


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("case", ["p_high", "p_nan", "mask_size", "mask_shape", "mask_dtype", "readonly",
                                  "out_dtype", "overlap", "seed", "not_array", "byte_order", "unaligned",
                                  "out_byte_order"])
def test_bad_input_leaves_arrays_unchanged(case):
    x = np.random.default_rng(0).standard_normal(100).astype(np.float32)
    out = np.full_like(x, 7.0)
    mask = np.full(13, 0xAA, np.uint8)
    kw = dict(p=0.5, seed=1, out=out, mask=mask)
    if case == "p_high":
        kw["p"] = 1.5
    elif case == "p_nan":
        kw["p"] = float("nan")
    elif case == "mask_size":
        kw["mask"] = mask = np.full(12, 0xAA, np.uint8)
    elif case == "mask_shape":   # the right bytes, not the packed 1-D form
        kw["mask"] = mask = np.full((1, 13), 0xAA, np.uint8)
    elif case == "mask_dtype":
        kw["mask"] = mask = np.full(13, 3, np.int32)
    elif case == "readonly":
        out.setflags(write=False)
    elif case == "out_dtype":
        kw["out"] = out = np.full(100, 7.0)
    elif case == "overlap":
        big = np.zeros(150, np.float32)
        x = big[:100]
        x[:] = 1
        kw["out"] = out = big[50:]
    elif case == "seed":
        kw["seed"] = -1
    elif case == "not_array":
        x = x.tolist()
    elif case == "byte_order":   # the kernel would read garbage
        x = x.astype(x.dtype.newbyteorder())
    elif case == "unaligned":   # C reads whole elements
        buf = np.frombuffer(bytearray(x.nbytes + 1), np.uint8)[1:]
        x2 = buf.view(x.dtype)
        x2[...] = x
        x = x2
    elif case == "out_byte_order":
        kw["out"] = out = out.astype(out.dtype.newbyteorder())
    before = (np.array(x).copy(), out.copy(), mask.copy())
    with pytest.raises((TypeError, ValueError)):
        F.dropout(x, **kw)
    np.testing.assert_array_equal(np.array(x), before[0])
    np.testing.assert_array_equal(out, before[1])
    np.testing.assert_array_equal(mask, before[2])


def test_backward_bad_input():
    dy = np.ones(100, np.float32)
    with pytest.raises(ValueError, match="mask"):
        F.dropout_backward(dy, None, 0.5)              # neither mask nor seed
    with pytest.raises(ValueError, match="mask"):
        F.dropout_backward(dy, np.zeros(3, np.uint8), 0.5)
    with pytest.raises(ValueError, match="p"):
        F.dropout_backward(dy, np.zeros(13, np.uint8), -0.1)
    layer = fo.Dropout(0.5, seed=0)
    with pytest.raises(ValueError, match="without a matching forward"):
        layer.backward(dy)
    layer.forward(dy)
    with pytest.raises(ValueError, match="shape"):
        layer.backward(dy[:50].copy())
    with pytest.raises(TypeError, match="dtype"):
        layer.backward(dy.astype(np.float64))
    with pytest.raises(ValueError):
        fo.Dropout(1.5)
    with pytest.raises(ValueError, match="std"):
        F.gaussian_noise(dy, -1.0)


def _drop_state(layer):
    """What a failed call must leave as it was: offset, saved context, mask bytes."""
    mask = None if layer._mask is None else layer._mask.copy()
    return layer.offset, layer._ctx, mask


def _assert_drop_unchanged(layer, state):
    offset, ctx, mask = state
    assert layer.offset == offset and layer._ctx is ctx
    if mask is not None:
        np.testing.assert_array_equal(layer._mask, mask)


@pytest.mark.parametrize("bad", ["out_size", "out_dtype", "out_list", "x_int", "eval_out"])
def test_failed_forward_keeps_the_last_forward(bad):
    """A failed forward replaced the saved mask before the binding refused
    `out`, so the last good forward's backward then failed."""
    x = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)
    layer = fo.Dropout(0.5, seed=1)
    y = layer.forward(x)
    state = _drop_state(layer)
    big = np.ones((100, 8), np.float32)
    out = np.full((3,), 7.0, np.float32)
    with pytest.raises((TypeError, ValueError), match="out|x"):
        if bad == "out_size":
            layer.forward(big, out=out)
        elif bad == "out_dtype":
            layer.forward(big, out=(out := np.full(big.shape, 7.0)))
        elif bad == "out_list":
            layer.forward(big, out=[0])
        elif bad == "x_int":
            layer.forward(np.ones((100, 8), np.int32))
        else:
            layer.eval().forward(big, out=out)
    assert (out == 7.0).all()
    _assert_drop_unchanged(layer, state)
    dx = layer.train().backward(np.ones_like(x))
    np.testing.assert_array_equal(dx, np.where(y != 0, 2.0, 0.0).astype(np.float32))


@pytest.mark.parametrize("value", ["no", 1, None])
def test_bool_options_must_be_bools(value):
    """store_mask / training are real bools (bool or numpy.bool_): a string is
    truthy and was taken as True."""
    x = np.ones(100, np.float32)
    out, mask = np.full_like(x, 7.0), np.full(13, 0xAA, np.uint8)
    with pytest.raises(TypeError, match="^store_mask must be a bool"):
        F.dropout(x, 0.5, 1, out=out, mask=mask, store_mask=value)
    assert (out == 7.0).all() and (mask == 0xAA).all()
    with pytest.raises(TypeError, match="^store_mask must be a bool"):
        fo.Dropout(0.5, seed=1, store_mask=value)
    layer = fo.Dropout(0.5, seed=1, store_mask=np.bool_(True))
    layer.forward(x)
    state = _drop_state(layer)
    with pytest.raises(TypeError, match="^mode must be a bool"):
        layer.train(value)
    assert layer.training is True
    layer.training = value
    with pytest.raises(TypeError, match="^training must be a bool"):
        layer.forward(x, out=out)
    assert (out == 7.0).all()
    _assert_drop_unchanged(layer, state)


def test_mask_buffer_with_store_mask_false_is_refused():
    """mask=buf with store_mask=False returned None and left buf unwritten."""
    x = np.ones(16, np.float32)
    out, buf = np.full_like(x, 7.0), np.full(2, 7, np.uint8)
    with pytest.raises(ValueError, match="^mask must be None with store_mask=False"):
        F.dropout(x, 0.5, 1, out=out, mask=buf, store_mask=False)
    assert (out == 7.0).all() and (buf == 7).all()


def test_functional_calls_without_a_seed_draw_fresh_masks_and_noise():
    """seed defaulted to 0, so a loop of F.dropout(x, p) calls trained one fixed
    sub-network; seed=None now draws a new seed per call, as Dropout(seed=None)."""
    x = np.ones(4096, np.float32)
    (y1, m1), (y2, m2) = F.dropout(x, 0.5), F.dropout(x, 0.5)
    assert (m1 != m2).any() and (y1 != y2).any()
    dx = F.dropout_backward(np.ones_like(x), m2, 0.5)
    np.testing.assert_array_equal(dx, y2)        # the mask returned is the one used
    assert (F.gaussian_noise(x, 0.1) != F.gaussian_noise(x, 0.1)).any()
    np.testing.assert_array_equal(F.dropout(x, 0.5, 7)[1], F.dropout(x, 0.5, seed=7)[1])


def test_store_mask_false_without_a_seed_is_refused():
    """Backward regenerates the mask from the seed: one drawn inside the call
    would be lost."""
    x = np.ones(16, np.float32)
    out = np.full_like(x, 7.0)
    with pytest.raises(ValueError, match="^store_mask=False needs a seed"):
        F.dropout(x, 0.5, out=out, store_mask=False)
    assert (out == 7.0).all()


@pytest.mark.parametrize("attr,value,exc", [("seed", -1, ValueError), ("seed", 2**64, ValueError),
                                            ("seed", 1.5, TypeError), ("offset", -1, ValueError),
                                            ("p", "a", TypeError), ("p", 1.5, ValueError),
                                            ("p", float("nan"), ValueError)])
def test_edited_attributes_are_checked_and_named(attr, value, exc):
    """Dropout.seed = -1 then forward gave OverflowError; Dropout.p = "a" gave
    "could not convert string to float"."""
    x = np.random.default_rng(0).standard_normal(100).astype(np.float32)
    layer = fo.Dropout(0.5, seed=1)
    y = layer.forward(x)
    setattr(layer, attr, value)
    state = _drop_state(layer)
    out = np.full_like(x, 7.0)
    with pytest.raises(exc, match=f"^{attr} must be"):
        layer.forward(x, out=out)
    assert (out == 7.0).all()
    _assert_drop_unchanged(layer, state)
    # backward uses the forward's own p and seed, not the edited ones
    np.testing.assert_array_equal(layer.backward(np.ones_like(x)),
                                  np.where(y != 0, 2.0, 0.0).astype(np.float32))


@pytest.mark.parametrize("call", ["dropout", "gaussian_noise", "dropout_backward", "layer",
                                  "layer_backward"])
def test_out_not_an_array_names_out(call):
    """out=[0] gave Cython's "Argument 'y' has incorrect type"."""
    x = np.ones(100, np.float32)
    mask = np.full(13, 0xAA, np.uint8)
    layer = fo.Dropout(0.5, seed=1, store_mask=False)
    with pytest.raises(TypeError, match=r"^out \(list\) would be copied"):
        if call == "dropout":
            F.dropout(x, 0.5, 1, out=[0], mask=mask)
        elif call == "gaussian_noise":
            F.gaussian_noise(x, 1.0, out=[0])
        elif call == "dropout_backward":
            F.dropout_backward(x, mask, 0.5, out=[0])
        elif call == "layer":
            layer.forward(x, out=[0])
        else:
            layer.forward(x)
            state = _drop_state(layer)
            layer.backward(x, out=[0])
    assert (mask == 0xAA).all() and (x == 1).all()
    if call == "layer":
        assert layer.offset == 0 and layer._ctx is None
    if call == "layer_backward":
        _assert_drop_unchanged(layer, state)   # the failed backward used nothing up


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("store_mask", [True, False])
def test_backward_once_per_forward(training, store_mask):
    """A second backward for one forward was accepted; now refused, as torch
    without retain_graph (the recurrent cells already refuse it)."""
    x = np.random.default_rng(0).standard_normal(100).astype(np.float32)
    layer = fo.Dropout(0.5, seed=1, store_mask=store_mask).train(training)
    layer.forward(x)
    dy = np.ones_like(x)
    with pytest.raises(ValueError, match="shape"):
        layer.backward(dy[:50].copy())
    dx = layer.backward(dy).copy()
    out = np.full_like(x, 7.0)
    with pytest.raises(ValueError, match="forward first"):
        layer.backward(dy, out=out)
    assert (out == 7.0).all()
    layer.forward(x)
    assert layer.backward(dy).shape == dx.shape


@pytest.mark.parametrize("dtype,n", [(np.float32, 2**22 + 37), (np.float64, 2**21 + 5)])
@pytest.mark.parametrize("align", [64, 16, 32, 48, "element"])
@pytest.mark.parametrize("nthreads", [1, 2])
def test_large_outputs_streaming_stores(threads, dtype, n, align, nthreads):
    """Outputs over 16 MB take the streaming-store path (64-byte stores when
    64-byte aligned, 16-byte ones when 16-, 32- or 48-byte aligned; an output
    aligned only to its element size falls back to ordinary stores), on 1 and
    2 threads: values against the mask, and bitwise equal to the portable code."""
    from fastopt import _fastopt
    fo.set_num_threads(nthreads)   # the fixture restores the count
    rng = np.random.default_rng(0)
    x = rng.standard_normal(n).astype(dtype)
    if align == "element":
        align = x.itemsize
    raw = np.full(n * x.itemsize + 128, 0xAB, np.uint8)
    start = (-raw.ctypes.data) % 64 + (align if align < 64 else 0)
    out = raw[start:start + n * x.itemsize].view(dtype)
    assert out.ctypes.data % 64 == (0 if align == 64 else align)
    y, mask = F.dropout(x, 0.3, 17, out=out)
    # the realigned 64-byte lines and the masked partial ones at the ends
    # (and at the threads' boundaries) stay inside out
    assert (raw[:start] == 0xAB).all() and (raw[start + n * x.itemsize:] == 0xAB).all()
    keep = unpack(mask, n)
    np.testing.assert_array_equal(y, np.where(keep, x * dtype(1 / 0.7), 0))
    dx = F.dropout_backward(x, mask, 0.3, out=np.empty_like(x))
    np.testing.assert_array_equal(dx, y)
    _fastopt._dropout_use_portable(True)
    try:
        y2, mask2 = F.dropout(x, 0.3, 17)
    finally:
        _fastopt._dropout_use_portable(False)
    np.testing.assert_array_equal(mask2, mask)
    np.testing.assert_array_equal(y2, y)


def test_eval_backward_with_out_names_dy():
    """The eval-mode backward's checked copy was the forward's binding, whose
    errors named x (an argument of forward, not of backward)."""
    layer = fo.Dropout(0.5, seed=0).eval()
    layer.forward(np.ones((4, 6), np.float32))
    out = np.full((4, 6), 7.0, np.float32)
    with pytest.raises(ValueError, match="^dy must be C-contiguous"):
        layer.backward(np.ones((6, 4), np.float32).T, out=out)
    with pytest.raises(ValueError, match="^out must have dy's shape"):
        layer.backward(np.ones((4, 6), np.float32), out=out[:2])
    assert (out == 7.0).all()
    dy = np.arange(24, dtype=np.float32).reshape(4, 6)
    assert layer.backward(dy, out=out) is out
    np.testing.assert_array_equal(out, dy)
