"""Shared test helpers.

PyTorch is an optional oracle: parity tests skip when it is absent, except when
FASTOPT_REQUIRE_TORCH=1 (set by .ci/run), where its absence is a failure, so
that no parity test is silently skipped in CI.
"""
import os

import numpy as np
import pytest

RTOL = {np.float32: 1e-5, np.float64: 1e-12}
DTYPES = [np.float32, np.float64]


def require_torch():
    if os.environ.get("FASTOPT_REQUIRE_TORCH") == "1":
        import torch  # noqa: F401 -- must be importable in CI
        return torch
    return pytest.importorskip("torch")


@pytest.fixture
def torch():
    return require_torch()


@pytest.fixture
def threads():
    """Restores fastopt's thread count after a test that changes it."""
    import fastopt
    n = fastopt.get_num_threads()
    yield
    fastopt.set_num_threads(n)


def central_differences(loss, arr, eps=1e-6):
    """d loss / d arr by central differences, arr changed in place entry by
    entry (and restored); loss() reads arr."""
    num = np.empty(arr.shape)
    for i in np.ndindex(arr.shape):
        keep = arr[i]
        arr[i] = keep + eps
        up = loss()
        arr[i] = keep - eps
        down = loss()
        arr[i] = keep
        num[i] = (up - down) / (2 * eps)
    return num
