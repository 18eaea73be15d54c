"""fastopt's kernels inside a NumPy training loop, where NumPy's BLAS runs between them.

Each iteration is a NumPy matmul (standing in for the forward and backward
passes a NumPy model computes with OpenBLAS) followed by one fastopt call: an
Adam step, or an LSTM forward+backward. With torch installed, the same again
after a torch matmul (a torch model whose `.numpy()` views fastopt updates).
Printed: medians over the iterations of the matmul's time and of fastopt's, at
1 and 2 fastopt threads, in a fresh process for each environment below
(OpenBLAS and GNU OpenMP read these variables when they load, so they cannot be
changed in a running process):

    python bench/numpy_loop.py [--reps 40]

OpenBLAS's pthreads pool spins for about 2^28 cycles after each call
(OPENBLAS_THREAD_TIMEOUT=28), GNU OpenMP's for GOMP_SPINCOUNT pause loops
(300000); on a machine with few cores, each runtime's spinning threads take
the cores the other's need. See the README, "Threads in a NumPy loop".
"""
import argparse
import json
import os
import subprocess
import sys
import time

ENVS = [
    {},
    {"OPENBLAS_THREAD_TIMEOUT": "4"},
    {"OPENBLAS_THREAD_TIMEOUT": "4", "GOMP_SPINCOUNT": "10000"},
]


def matmul_libraries():
    """NumPy's matmul, and torch's when torch is installed (its own OpenMP pool)."""
    import numpy as np
    libs = [("numpy", lambda a: a)]
    try:
        import torch
        libs.append(("torch", lambda a: torch.from_numpy(np.ascontiguousarray(a))))
    except ImportError:
        pass
    return libs


def measure(reps):
    import numpy as np
    import fastopt as fo
    rng = np.random.default_rng(0)
    rows = []

    def run(name, matmul_size, call):
        for lib, wrap in matmul_libraries():
            run_after(name, lib, wrap, matmul_size, call)

    def run_after(name, lib, wrap, matmul_size, call):
        a = wrap(rng.standard_normal((matmul_size, matmul_size)).astype(np.float32))
        for threads in (1, 2):
            fo.set_num_threads(threads)
            call()
            t_mm, t_fo = [], []
            for _ in range(reps):
                t0 = time.perf_counter()
                a @ a
                t1 = time.perf_counter()
                call()
                t2 = time.perf_counter()
                t_mm.append(t1 - t0)
                t_fo.append(t2 - t1)
            rows.append({"case": name, "matmul": f"{lib} {matmul_size}", "threads": threads,
                         "matmul_ms": 1e3 * float(np.median(t_mm)),
                         "fastopt_ms": 1e3 * float(np.median(t_fo))})

    for n, mm in ((10**6, 512), (10**7, 1024)):
        p = [rng.standard_normal(n).astype(np.float32)]
        g = [rng.standard_normal(n).astype(np.float32)]
        opt = fo.Adam(p, lr=1e-3)
        run(f"Adam {n:.0e}", mm, lambda: opt.step(g))
    lstm = fo.LSTM(128, 256, seed=0)
    x = rng.standard_normal((50, 32, 128)).astype(np.float32)
    dout = rng.standard_normal((50, 32, 256)).astype(np.float32)

    def lstm_call():
        lstm.forward(x)
        lstm.backward(dout)
    run("LSTM T50 B32 I128 H256 fwd+bwd", 512, lstm_call)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=40)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure(args.reps)))
        return
    print("| environment | case | matmul | fastopt threads | matmul ms | fastopt ms | sum ms |")
    print("|---|---|---|---|---|---|---|")
    for extra in ENVS:
        env = {k: v for k, v in os.environ.items()
               if k not in ("OPENBLAS_THREAD_TIMEOUT", "GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
        env.update(extra)
        out = subprocess.run([sys.executable, __file__, "--child", "--reps", str(args.reps)],
                             env=env, check=True, capture_output=True, text=True).stdout
        label = " ".join(f"{k}={v}" for k, v in extra.items()) or "(defaults)"
        for r in json.loads(out.strip().splitlines()[-1]):
            print(f"| {label} | {r['case']} | {r['matmul']} | {r['threads']} | "
                  f"{r['matmul_ms']:.2f} | {r['fastopt_ms']:.2f} | "
                  f"{r['matmul_ms'] + r['fastopt_ms']:.2f} |")


if __name__ == "__main__":
    main()
