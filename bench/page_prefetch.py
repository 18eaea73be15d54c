"""The optimizers with and without their page-ahead prefetch, on this CPU.

The optimizer loops prefetch every array one 4 KiB page ahead on Intel CPUs
only (src_c/parallel.h, fo_prefetch_pages); FASTOPT_PAGE_PREFETCH=0/1 forces
the choice. This script runs the same build both ways in alternating child
processes and prints, per optimizer and size, the median step time of each
and the ratio on/off (> 1: the prefetch costs here):

    python bench/page_prefetch.py [--threads 1] [--rounds 5] [--dtype float32]

Measured on the AMD EPYC (Zen 4) guest, 2026-11-28, float32, 5 rounds:
on/off 1.32-1.71 at 1 thread, 1.08-1.56 at 2 (an earlier run of the same
cases: 1.20-1.53 and 1.03-1.35; float64 at 1 thread, 1.14-1.55). On the Xeon
before (2026-11-27, another A/B): on/off 0.89-0.96 for Adam, Adagrad and
RMSprop, 0.94-0.95 for SGD-momentum.
"""
import argparse
import collections
import os
import statistics
import subprocess
import sys
import time

import numpy as np

OPTIMIZERS = {
    "adam": ("Adam", {}),
    "sgd-momentum": ("SGD", {"momentum": 0.9}),
    "adagrad": ("Adagrad", {}),
    "rmsprop": ("RMSprop", {}),
}


def child(threads, dtype, steps):
    """Prints one line per case: name size milliseconds (median of steps)."""
    import fastopt as fo
    from fastopt.bench.optim import model_shapes
    fo.set_num_threads(threads)
    rng = np.random.default_rng(0)
    for size in (16_000_000, "model150"):
        shapes = model_shapes() if size == "model150" else [(size,)]
        for name, (cls, kw) in OPTIMIZERS.items():
            ps = [rng.standard_normal(s).astype(dtype) for s in shapes]
            gs = [rng.standard_normal(s).astype(dtype) for s in shapes]
            opt = getattr(fo, cls)(ps, lr=1e-3, **kw)
            opt.step(gs)
            times = []
            for _ in range(steps):
                t0 = time.perf_counter()
                opt.step(gs)
                times.append(time.perf_counter() - t0)
            print(name, size, statistics.median(times) * 1e3)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=21)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(a.threads, np.dtype(a.dtype), a.steps)
        return
    ms = collections.defaultdict(lambda: {"0": [], "1": []})
    for _ in range(a.rounds):
        for flag in ("0", "1"):
            out = subprocess.run(
                [sys.executable, __file__, "--child", "--threads", str(a.threads),
                 "--dtype", a.dtype, "--steps", str(a.steps)],
                env=dict(os.environ, FASTOPT_PAGE_PREFETCH=flag),
                check=True, capture_output=True, text=True).stdout
            for line in out.splitlines():
                name, size, t = line.split()
                ms[(name, size)][flag].append(float(t))
    print(f"{a.dtype}, {a.threads} thread(s), {a.rounds} rounds; median ms per step")
    print(f"{'optimizer':14s} {'size':>9s} {'off':>8s} {'on':>8s} {'on/off':>7s}")
    for (name, size), t in ms.items():
        off, on = statistics.median(t["0"]), statistics.median(t["1"])
        print(f"{name:14s} {size:>9s} {off:8.2f} {on:8.2f} {on / off:7.2f}")


if __name__ == "__main__":
    main()
