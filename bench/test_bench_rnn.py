"""pytest-benchmark suite of the recurrent layers, from the same cases as
``python -m fastopt bench --only rnn`` (fastopt, NumPy, torch, the GEMMs alone).

    python -m pytest bench/test_bench_rnn.py --benchmark-only
        [--benchmark-group-by=param:kernel]

One thread for fastopt, torch and the BLAS, as in the issue's targets.
"""
import numpy as np
import pytest

from fastopt.bench import REGISTRY, load_cases, set_threads
from benchtools import time_case

load_cases()
CASES = [(kernel, size, fn) for family, kernel, sizes, _, fn in REGISTRY if family == "rnn"
         for size in sizes]
COMPETITORS = ["fastopt", "numpy", "torch", "gemm_only"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    limiter = set_threads(1)
    yield
    if limiter is not None:
        limiter.restore_original_limits()


@pytest.mark.parametrize("who", COMPETITORS)
@pytest.mark.parametrize("kernel,size,case_fn", CASES, ids=[f"{k}-{s}" for k, s, _ in CASES])
def test_rnn(benchmark, kernel, size, case_fn, who):
    time_case(benchmark, kernel, size, case_fn(size, np.float32), who)
