"""Shared by the pytest-benchmark suites (a plain module: a conftest.py here
would shadow tests/conftest.py when both directories run in one session)."""
import pytest


def time_case(benchmark, kernel, size, case, who):
    """Time one callable of a runner case (fastopt.bench), grouped by kernel
    and size; skipped where the case has no such competitor (e.g. torch not
    installed)."""
    if who not in case.fns:
        pytest.skip(f"{who} is not a competitor in this case (or not installed)")
    benchmark.group = f"{kernel} {size}"
    benchmark(case.fns[who])
