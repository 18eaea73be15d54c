"""Which BLAS for the recurrent layers: every GEMM shape that the LSTM/GRU
benchmarks issue, timed through each provider in interleaved rounds.

    python bench/blas_choice.py [--rounds 15] [--layers] [--threads 1]

--layers times whole layers instead (forward+backward, the benchmark sizes),
each provider in turn within every round.

Providers (fastopt.blas): scipy (scipy.linalg.cython_blas), numpy (NumPy's
own OpenBLAS), dnnl (oneDNN's dnnl_sgemm, `onednn-cpu-gomp` wheel), mkl
(libmkl_rt, `mkl` wheel), each when it loads; np.matmul for reference, and
blis (the `blis` package's gemm) when installed. Prints GFLOP/s per shape.
"""
import argparse
import statistics
import time

import numpy as np

import fastopt as fo
from fastopt import _fastopt

# (M, K, N, trans_a, trans_b, where it occurs): T=50 B=32 I=128 H=256 sequences
# (LSTM G*H = 1024, GRU 768) and B=64 I=256 H=512 cells (LSTM 2048).
SHAPES = [
    (32, 256, 1024, 0, 1, "LSTM seq: h W_hh^T per step, NT"),
    (32, 256, 1024, 0, 0, "LSTM seq: h W_hh^T per step, NN (as fastopt runs it)"),
    (32, 1024, 256, 0, 0, "LSTM seq: dG W_hh per step"),
    (1600, 128, 1024, 0, 1, "LSTM seq: x W_ih^T, all steps"),
    (1600, 1024, 128, 0, 0, "LSTM seq: dX = dG W_ih"),
    (1024, 1600, 128, 1, 0, "LSTM seq: dW_ih += dG^T X"),
    (1024, 1568, 256, 1, 0, "LSTM seq: dW_hh += dG^T H"),
    (32, 256, 768, 0, 0, "GRU seq: h W_hh^T per step, NN"),
    (32, 768, 256, 0, 0, "GRU seq: dG W_hh per step"),
    (64, 512, 2048, 0, 1, "LSTM cell: h W_hh^T"),
    (64, 2048, 512, 0, 0, "LSTM cell: dG W_hh"),
    (2048, 64, 512, 1, 0, "LSTM cell: dW_hh += dG^T h"),
]


def providers(a, b, c, ta, tb):
    an, bn = (a.T if ta else a), (b.T if tb else b)
    fns = {}

    def via(name):
        def run():
            _fastopt.set_blas_provider(name)
            _fastopt.gemm(c, a, b, ta, tb, 0.0)
        return run
    for name in ("scipy", "numpy", "dnnl", "mkl"):
        try:
            fo.set_blas(name)
            fns[name] = via(name)
        except OSError:
            pass
    fns["np.matmul"] = lambda: np.matmul(an, bn, out=c)
    try:
        import blis.py
        fns["blis"] = lambda: blis.py.gemm(a, b, trans1=bool(ta), trans2=bool(tb), out=c)
    except ImportError:
        pass
    return fns


def layer_runs(rng):
    """Zero-argument forward+backward runs of the benchmark's layers."""
    runs = {}
    for kind in ("LSTM", "GRU"):
        m = getattr(fo, kind)(128, 256)
        x = rng.standard_normal((50, 32, 128)).astype(np.float32)
        d = rng.standard_normal((50, 32, 256)).astype(np.float32)
        runs[f"{kind} T50 B32 I128 H256"] = lambda m=m, x=x, d=d: (m.forward(x), m.backward(d))
        cell = getattr(fo, kind + "Cell")(256, 512)
        xc = rng.standard_normal((64, 256)).astype(np.float32)
        h = rng.standard_normal((64, 512)).astype(np.float32)
        state = (h, h) if kind == "LSTM" else h
        grads = (h, h) if kind == "LSTM" else (h,)
        runs[f"{kind}Cell B64 I256 H512"] = (
            lambda c=cell, xc=xc, st=state, g=grads: (c.forward(xc, st), c.backward(*g)))
    return runs


def time_layers(rounds):
    names = []
    for name in ("scipy", "numpy", "dnnl", "mkl"):
        try:
            fo.set_blas(name)
            names.append(name)
        except OSError:
            pass
    print(f"{'layer, forward+backward':<24}" + "".join(f"{n:>9}" for n in names) + "   ms, median")
    for label, run in layer_runs(np.random.default_rng(0)).items():
        samples = {n: [] for n in names}
        for _ in range(rounds):
            for n in names:
                fo.set_blas(n)
                run()                       # untimed: the hand-over between libraries
                t0 = time.perf_counter()
                run()
                samples[n].append(time.perf_counter() - t0)
        print(f"{label:<24}" + "".join(f"{1e3 * statistics.median(samples[n]):>9.2f}"
                                       for n in names), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--layers", action="store_true", help="time whole layers per provider")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    fo.set_num_threads(args.threads)
    try:
        from threadpoolctl import threadpool_limits
        threadpool_limits(args.threads)
    except ImportError:
        pass
    if args.layers:
        time_layers(args.rounds)
        fo.set_blas("auto")
        return
    print(f"FMA peak of one core: {_fastopt.fma_peak():.1f} GFLOP/s (the roof of every column"
          f" at 1 thread)")
    rng = np.random.default_rng(0)
    header = None
    for M, K, N, ta, tb, where in SHAPES:
        a = rng.standard_normal((K, M) if ta else (M, K)).astype(np.float32)
        b = rng.standard_normal((N, K) if tb else (K, N)).astype(np.float32)
        c = np.empty((M, N), np.float32)
        fns = providers(a, b, c, ta, tb)
        if header is None:
            header = list(fns)
            print(f"{'M':>5} {'K':>5} {'N':>5} op  " + " ".join(f"{k:>7}" for k in header)
                  + "   GFLOP/s, median of interleaved rounds")
        number = {}
        for k, f in fns.items():
            f()
            t0 = time.perf_counter()
            f()
            number[k] = max(1, int(0.01 / (time.perf_counter() - t0)))
        samples = {k: [] for k in fns}
        for _ in range(args.rounds):
            for k, f in fns.items():
                t0 = time.perf_counter()
                for _ in range(number[k]):
                    f()
                samples[k].append((time.perf_counter() - t0) / number[k])
        flop = 2 * M * K * N
        op = ("T" if ta else "N") + ("T" if tb else "N")
        print(f"{M:>5} {K:>5} {N:>5} {op}  "
              + " ".join(f"{flop / statistics.median(samples[k]) / 1e9:>7.1f}" for k in header)
              + f"   {where}", flush=True)
    fo.set_blas("auto")


if __name__ == "__main__":
    main()
