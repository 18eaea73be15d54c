"""Dropout backward alone and followed by a reader of its output: what the
16 MB streaming threshold of src_c/avx512.h trades.

Streaming (non-temporal) stores skip reading each output line before writing
it, so the kernel alone runs faster with them; but the output then leaves the
cache, and the layer that reads it next pays for that. Printed per size and
thread count, median microseconds of: the backward alone; the backward then a
threaded copy out of dx (one read of it); the backward then a second backward
reading dx. Compare two builds:

    python bench/dropout_reader.py
    CFLAGS=-DFO_STREAM_MIN_BYTES=1048576 python setup.py build_ext --inplace --force
    python bench/dropout_reader.py      # outputs of 1 MB and more streamed

(then rebuild without the define). Measured here (2026-11-28), 10^6 float32
at 2 threads: alone 186 us with ordinary stores, 155 streamed; with the copy
after it 365 against 464; with a second backward 369 against 441.
"""
import argparse
import time

import numpy as np

import fastopt as fo
from fastopt import _fastopt, functional as F


def per_call_us(f, reps):
    for _ in range(10):
        f()
    t0 = time.perf_counter()
    for _ in range(reps):
        f()
    return (time.perf_counter() - t0) / reps * 1e6


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1e6,4e6", help="element counts, comma-separated")
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args()
    for n in (int(float(s)) for s in args.sizes.split(",")):
        dy = np.random.default_rng(0).standard_normal(n).astype(np.float32)
        _, mask = F.dropout(dy, 0.5, 1)
        dx, z = np.empty_like(dy), np.empty_like(dy)
        cases = {
            "alone": lambda: F.dropout_backward(dy, mask, 0.5, out=dx),
            "+copy": lambda: (F.dropout_backward(dy, mask, 0.5, out=dx), _fastopt.copy(z, dx)),
            "+backward": lambda: (F.dropout_backward(dy, mask, 0.5, out=dx),
                                  F.dropout_backward(dx, mask, 0.5, out=z)),
        }
        reps = max(20, int(3e7 / n))
        for threads in (1, 2):
            fo.set_num_threads(threads)
            times = {k: [] for k in cases}
            for _ in range(args.rounds):     # interleaved, so drift hits all alike
                for k, f in cases.items():
                    times[k].append(per_call_us(f, reps))
            print(f"n={n:.0e} threads={threads} "
                  + " ".join(f"{k} {np.median(v):.1f} us" for k, v in times.items()))


if __name__ == "__main__":
    main()
