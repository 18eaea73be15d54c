"""Kinds of input that every family refuses alike, by name and before
writing anything: masked arrays (the kernels would use the masked entries),
and ints beyond float64's range as real-valued settings."""
import numpy as np
import pytest

import fastopt as fo
from fastopt import functional as F


def _masked(shape, dtype=np.float32):
    data = np.random.default_rng(0).standard_normal(shape).astype(dtype)
    return np.ma.masked_array(data, mask=data > 1)


@pytest.mark.parametrize("call", [
    lambda: fo.BatchNorm(3).forward(_masked((4, 3))),
    lambda: F.batch_norm_forward(_masked((4, 3)), None, None, training=True),
    lambda: F.dropout(_masked(100), 0.5, 1),
    lambda: fo.Dropout(0.5, seed=1).forward(_masked(100)),
    lambda: F.gaussian_noise(_masked(100), 0.5, seed=1),
    lambda: fo.LSTM(3, 4, seed=0).forward(_masked((5, 2, 3))),
    lambda: fo.GRUCell(3, 4, seed=0).forward(_masked((2, 3))),
])
def test_masked_arrays_are_refused(call):
    with pytest.raises(TypeError, match="masked array"):
        call()


def test_masked_output_is_refused_and_unchanged():
    x = np.ones(100, np.float32)
    out = _masked(100)
    before = out.data.copy()
    with pytest.raises(TypeError, match="out is a masked array"):
        F.dropout(x, 0.5, 1, out=out)
    np.testing.assert_array_equal(out.data, before)


@pytest.mark.parametrize("call,name", [
    (lambda: fo.BatchNorm(3, eps=10**400), "eps"),
    (lambda: fo.Dropout(10**400), "p"),
    (lambda: F.gaussian_noise(np.zeros(3), 10**400), "std"),
    (lambda: fo.LSTM(3, 4, dropout=10**400), "dropout"),
])
def test_huge_ints_as_reals_are_named(call, name):
    with pytest.raises(ValueError, match=f"{name} is beyond float64's range"):
        call()
