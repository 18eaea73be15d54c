"""The late-start rule (src_c/parallel.c): after a thread of a parallel region
starts late (another library's spinning pool held its core), kernels run on
one thread for a window: 10 ms, doubled for each late start less than 320 ms
after the last window's end, up to 320 ms. Times here are synthetic, so the
rule is checked without depending on the machine's load."""
import numpy as np
import pytest

import fastopt as fo
from fastopt import _fastopt

MS = 1_000_000   # ns


def rule(what, now=0):
    return _fastopt._late_start_rule(what, now)


@pytest.fixture
def two_threads():
    before = fo.get_num_threads()
    fo.set_num_threads(2)
    rule("forget")
    yield
    rule("forget")
    fo.set_num_threads(before)


def window_after(now):
    """The length of the one-thread window that starts at `now` (ms), found
    from threads_at alone."""
    assert rule("threads_at", now) == 1
    ms = 0
    while rule("threads_at", now + (ms + 1) * MS) == 1:
        ms += 1
    return ms + 1


def test_no_late_start_no_window(two_threads):
    now = rule("now")
    assert rule("threads_at", now) == 2
    assert fo.get_num_threads() == 2


def test_windows_double_while_late_starts_continue_then_reset(two_threads):
    t = rule("now")
    lengths = []
    for _ in range(7):
        rule("note", t)
        length = window_after(t)
        lengths.append(length)
        assert fo.get_num_threads() == 2           # the setting itself is untouched
        t += (length + 5) * MS                     # 5 ms after the window's end
    assert lengths == [10, 20, 40, 80, 160, 320, 320]
    rule("note", t + 400 * MS)                     # long after the last window: back to 10 ms
    assert window_after(t + 400 * MS) == 10


def test_a_late_start_inside_a_window_does_not_extend_it(two_threads):
    t = rule("now")
    rule("note", t)
    rule("note", t + 5 * MS)
    assert window_after(t) == 10


def test_one_thread_setting_is_not_changed(two_threads):
    fo.set_num_threads(1)
    t = rule("now")
    rule("note", t)
    assert rule("threads_at", t + 100 * MS) == 1
    assert rule("threads_at", t) == 1


def test_kernels_inside_a_window_give_the_same_numbers(two_threads):
    rng = np.random.default_rng(0)
    p0 = rng.standard_normal(1 << 20).astype(np.float32)
    g = rng.standard_normal(1 << 20).astype(np.float32)
    x = rng.standard_normal((256, 1024)).astype(np.float32)
    seq = rng.standard_normal((8, 4, 16)).astype(np.float32)

    def run():
        p = p0.copy()
        fo.Adam([p], lr=1e-2).step([g])
        bn = fo.BatchNorm(1024)
        y = bn.forward(x)
        dx = bn.backward(x)
        d, _ = fo.functional.dropout(x, 0.5, 7)
        lstm = fo.LSTM(16, 32, seed=0)
        out, _ = lstm.forward(seq)
        dseq, _ = lstm.backward(out)
        return [p, y, dx, d, out, dseq]

    both = run()
    rule("note", rule("now") + 300 * MS)           # one thread for the next 300 ms or more
    assert rule("threads_at", rule("now")) == 1
    alone = run()
    for a, b in zip(alone, both):
        np.testing.assert_array_equal(a, b)
