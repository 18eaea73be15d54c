"""pytest-benchmark suite for the optimizers: the runner's cases (fastopt's
class API and the NumPy/torch competitors), plus the raw binding call, so that
the difference between 'fastopt' and 'raw' is the Python wrapper's cost.

    pytest bench/test_bench_optim.py --benchmark-only --benchmark-group-by=param:size
"""
import numpy as np
import pytest

import fastopt as fo
from fastopt import _fastopt
from fastopt.bench import optim as cases
from benchtools import time_case

SIZES = [10_000, 1_000_000, 16_000_000, "model150"]
KERNELS = {"adam": cases.adam, "sgd-momentum": cases.sgd_momentum,
           "adagrad": cases.adagrad, "rmsprop": cases.rmsprop}
WHO = ["fastopt", "numpy", "numpy_careful", "torch", "torch_foreach"]


@pytest.mark.parametrize("size", SIZES, ids=str)
@pytest.mark.parametrize("kernel", list(KERNELS))
@pytest.mark.parametrize("who", WHO)
def test_step(benchmark, kernel, size, who):
    time_case(benchmark, kernel, size, KERNELS[kernel](size, np.float32), who)


@pytest.mark.parametrize("size", SIZES, ids=str)
def test_adam_raw_binding(benchmark, size):
    shapes = cases.model_shapes() if size == "model150" else [(size,)]
    params = [np.ones(s, np.float32) for s in shapes]
    grads = [np.full(s, 0.1, np.float32) for s in shapes]
    opt = fo.Adam(params)
    opt.step(grads)
    g = opt._groups[0]
    gt = _fastopt.check_grads(g["params"], grads)
    st = g["state"]
    benchmark.group = f"adam {size}"
    benchmark(_fastopt.adam_step, g["params"], gt, st["exp_avg"], st["exp_avg_sq"], None,
              1e-3, 0.9, 0.999, 1e-8, 0.0, 0.0, False, False, False, 2)
