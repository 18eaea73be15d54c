"""pytest-benchmark suite for batch norm and dropout: the runner's cases
(fastopt's layer API and the NumPy/torch competitors), plus the raw binding
calls, so that the difference is the Python wrapper's cost.

    pytest bench/test_bench_norm.py --benchmark-only --benchmark-group-by=group
"""
import numpy as np
import pytest

from fastopt import _fastopt
from fastopt.bench import norm as cases
from fastopt.bench import size_label
from benchtools import time_case

WHO = ["fastopt", "numpy", "numpy_careful", "torch", "torch_cl"]
CASES = [("batchnorm-train-fwd+bwd", cases.batchnorm_train, s) for s in cases.BN_SIZES] + \
        [("dropout-fwd", cases.dropout_forward, n) for n in cases.DROPOUT_SIZES] + \
        [("dropout-bwd", cases.dropout_backward, n) for n in cases.DROPOUT_SIZES]


@pytest.mark.parametrize("who", WHO)
@pytest.mark.parametrize("kernel,fn,size", CASES,
                         ids=[f"{k}-{size_label(s)}" for k, _, s in CASES])
def test_case(benchmark, kernel, fn, size, who):
    time_case(benchmark, kernel, size, fn(size, np.float32), who)


@pytest.mark.parametrize("n", cases.DROPOUT_SIZES)
def test_dropout_raw_binding(benchmark, n):
    x = np.ones(n, np.float32)
    y, mask = np.empty_like(x), np.empty((n + 7) // 8, np.uint8)
    benchmark.group = f"dropout-fwd {n}"
    benchmark(_fastopt.dropout_forward, x, y, mask, 0.5, 1, 0)


@pytest.mark.parametrize("shape", [(32, 64, 56, 56), (256, 1024)], ids=str)
def test_batchnorm_raw_binding(benchmark, shape):
    C = shape[1]
    x = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
    y, dx = np.empty_like(x), np.empty_like(x)
    sm, si, w, b = (np.ones(C, np.float32) for _ in range(4))
    dw, db = np.zeros(C, np.float32), np.zeros(C, np.float32)

    def run():
        _fastopt.batchnorm_forward(x, y, sm, si, None, None, w, b, training=True,
                                   momentum=0.1, eps=1e-5, channels_last=False)
        _fastopt.batchnorm_backward(x, x, sm, si, w, dx, dw, db, training=True,
                                    accumulate=True, channels_last=False)

    benchmark.group = f"batchnorm-train-fwd+bwd {shape}"
    benchmark(run)
