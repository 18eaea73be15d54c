"""The benchmark runner behind ``python -m fastopt bench``.

A *case* is a function ``case(size, dtype) -> Case``: named callables that each
do the same work once (``'fastopt'`` is the reference; the others are
competitors such as ``'numpy'``, ``'numpy_careful'``, ``'torch'``), plus the
bytes the work must move at least (for GB/s and the fraction of copy bandwidth).
Modules in this package register cases with ``@register(family, kernel, sizes)``.

Timing: every callable of a case is timed in the same rounds, interleaved,
so that the machine's noise hits all of them alike; with more threads the
runner pauses between libraries so that an idle thread pool does not steal
the next library's core (see time_interleaved); the figure is the median over
rounds of the per-call time. The copy baseline (``fastopt.copy`` over the
same number of bytes moved, same thread count) is timed in the same rounds as
fastopt, so the fraction of copy bandwidth is measured, not assumed.
"""
import dataclasses
import importlib
import json
import os
import platform
import statistics
import sys
import time

import numpy as np

from .. import _fastopt

CASE_MODULES = ("optim", "norm", "rnn")   # fastopt.bench.<name>, those present
REGISTRY = []                             # (family, kernel, sizes, quick_sizes, fn)

# Column order of the competitors in the table: key -> header.
COMPETITORS = {
    "numpy": "numpy",
    "numpy_careful": "np-careful",
    "torch": "torch",
    "torch_foreach": "torch-foreach",
    "torch_cl": "torch-chlast",
    "gemm_only": "gemm-only",
    "fastopt_flat": "fo-flat",   # fastopt on one flat array of the same size
}


@dataclasses.dataclass
class Case:
    fns: dict                 # name -> zero-argument callable doing the work once
    bytes_moved: int = 0      # minimum memory traffic of the work (0: not memory-bound)
    note: str = ""
    flops: int = 0            # GEMM work (compute-bound cases): the %fma column
    settle: float = 0.0       # pause between libraries at >1 thread, if more than SETTLE


def register(family, kernel, sizes, quick_sizes=None):
    """Decorator: fn(size, dtype) -> Case, benchmarked at each of `sizes`
    (a size is any label-able value: an int, a shape tuple, a dict)."""
    def deco(fn):
        REGISTRY.append((family, kernel, list(sizes), list(quick_sizes or sizes), fn))
        return fn
    return deco


def load_cases():
    for m in CASE_MODULES:
        try:
            importlib.import_module(f"{__name__}.{m}")
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{m}":
                raise


def torch_or_none():
    try:
        import torch
        return torch
    except ImportError:
        return None


def set_threads(n):
    """Same thread count for fastopt, torch and the BLAS NumPy uses."""
    _fastopt.set_num_threads(n)
    torch = torch_or_none()
    if torch is not None:
        torch.set_num_threads(n)
    try:
        from threadpoolctl import threadpool_limits
        return threadpool_limits(n)
    except ImportError:
        return None


def time_interleaved(fns, min_time=0.2, rounds=None, target=0.005, settle=0.0,
                     min_rounds=7):
    """Median seconds per call of each callable.

    A round gives each callable one block of `number` timed calls (a block
    takes ~target seconds), preceded by one untimed call; every callable is
    timed in every round, so the machine's drifting noise hits all of them
    alike and the ratios are same-time figures.

    settle > 0 (used with more than one thread): before each block whose
    library differs from the previous block's, sleep `settle` seconds. Idle
    thread pools keep spinning after their library returns (GNU OpenMP for
    about a millisecond, OpenBLAS for ~2^28 cycles), and on a 2-core machine a
    spinning pool takes the core that the next library's second thread needs;
    the pause lets it go to sleep first. The callables on fastopt's own pool
    (OWN_POOL: fastopt and the copy and stream baselines) count as one library
    and run back to back."""
    order = [k for k in fns if k in OWN_POOL] + [k for k in fns if k not in OWN_POOL]
    number = {}
    for k in order:
        f = fns[k]
        f()
        t0 = time.perf_counter()
        f()
        dt = time.perf_counter() - t0
        number[k] = max(1, int(target / max(dt, 1e-7)))
    samples = {k: [] for k in order}
    per_round = sum(2 * target for _ in fns)
    n_rounds = rounds or max(min_rounds, min(200, int(min_time / per_round)))
    prev = None
    for _ in range(n_rounds):
        for k in order:
            f, n = fns[k], number[k]
            lib = "own" if k in OWN_POOL else k
            if settle and lib != prev:
                time.sleep(settle)
            prev = lib
            f()
            t0 = time.perf_counter()
            for _ in range(n):
                f()
            samples[k].append((time.perf_counter() - t0) / n)
    return {k: statistics.median(v) for k, v in samples.items()}


# seconds to pause between libraries with more than one thread (see
# time_interleaved); a case may ask for more (Case.settle: OpenBLAS's pool)
SETTLE = 0.02
# callables that run on fastopt's own OpenMP pool
OWN_POOL = ("fastopt", "fastopt_flat", "_copy", "_stream")


def size_label(size):
    if isinstance(size, int):
        if size < 10000:
            return str(size)
        mant, exp = f"{size:.1e}".split("e")
        return f"{mant.rstrip('0').rstrip('.')}e{int(exp)}"
    if isinstance(size, tuple):
        return "x".join(map(str, size))
    return str(size)


def machine_info():
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    torch = torch_or_none()
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "numpy": np.__version__, "torch": getattr(torch, "__version__", None),
            "openmp": _fastopt.has_openmp(), "blas": _blas_name()}


def _blas_name():
    from .. import blas
    try:
        return blas.get_blas()
    except Exception as e:   # a provider that fails to load is reported, not fatal
        return f"unavailable ({e})"


def run(threads=(1, 2), quick=False, families=None, dtype=np.float32, out=sys.stdout,
        min_time=None):
    """Run every registered case; print the table to `out`; return the rows."""
    load_cases()
    min_time = min_time if min_time is not None else (0.03 if quick else 0.4)
    t_start = time.perf_counter()
    rows = []
    info = machine_info()
    if np.dtype(dtype) == np.float64 and info["blas"] == "dnnl":
        info["blas"] = "scipy (dnnl has no float64 GEMM)"
    peak = info["fma_peak_gflops"] = _fastopt.fma_peak()   # one core, now
    settings = {"fastopt": _version(), "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                  time.gmtime()),
                "threads": list(threads), "quick": bool(quick),
                "only": list(families) if families else None, "dtype": np.dtype(dtype).name}
    print(f"# fastopt bench: {info['cpu']}, {info['cores']} cores, numpy {info['numpy']}, "
          f"torch {info['torch']}, OpenMP {info['openmp']}, BLAS for rnn {info['blas']}, "
          f"{np.dtype(dtype).name}; FMA peak {peak:.0f} GFLOP/s per core", file=out)
    print("# times are medians; X/fo = X's time / fastopt's time (>1: fastopt faster);\n"
          "# %copy = time of a streaming copy of the same bytes / fastopt time;\n"
          "# %strm = time of the in-place stream a += b over the same bytes / fastopt time;\n"
          "# %fma = the GEMM flops of the work / fastopt time / (FMA peak x threads)",
          file=out)
    header = (f"{'kernel':<24} {'size':>14} {'thr':>3} {'fastopt':>10} "
              + " ".join(f"{h + '/fo':>14}" for h in COMPETITORS.values())
              + f" {'GB/s':>7} {'%copy':>6} {'%strm':>6} {'%fma':>5}")
    print(header, file=out)
    for nt in threads:
        limiter = set_threads(nt)
        for family, kernel, sizes, qsizes, fn in REGISTRY:
            if families and family not in families and kernel not in families:
                continue
            for size in (qsizes if quick else sizes):
                case = fn(size, dtype)
                fns = dict(case.fns)
                copy_bufs = None
                if case.bytes_moved:
                    # the same bytes moved by a copy (read half, write half) and by
                    # the in-place stream a += b (read 2/3, write 1/3 in place)
                    half = max(1, case.bytes_moved // 2)
                    third = max(1, case.bytes_moved // 12)
                    copy_bufs = (np.empty(half, np.uint8), np.ones(half, np.uint8),
                                 np.zeros(third, np.float32), np.ones(third, np.float32))
                    fns["_copy"] = lambda b=copy_bufs: _fastopt.copy(b[0], b[1])
                    fns["_stream"] = lambda b=copy_bufs: _fastopt.stream_add(b[2], b[3])
                t = time_interleaved(fns, min_time=min_time, min_rounds=3 if quick else 7,
                                     settle=max(SETTLE, case.settle) if nt > 1 else 0.0)
                row = {"family": family, "kernel": kernel, "size": size_label(size),
                       "threads": nt, "dtype": np.dtype(dtype).name,
                       "seconds": {k: v for k, v in t.items() if not k.startswith("_")},
                       "bytes_moved": case.bytes_moved}
                fo_t = t["fastopt"]
                if case.bytes_moved:
                    row["gbps"] = case.bytes_moved / fo_t / 1e9
                    row["copy_gbps"] = case.bytes_moved / t["_copy"] / 1e9
                    row["frac_copy"] = t["_copy"] / fo_t
                    row["frac_stream"] = t["_stream"] / fo_t
                if case.flops:
                    row["gflops"] = case.flops / fo_t / 1e9
                    row["frac_fma_peak"] = row["gflops"] / (peak * nt)
                rows.append(row)
                cells = []
                for k in COMPETITORS:
                    cells.append(f"{t[k] / fo_t:>14.2f}" if k in t else f"{'-':>14}")
                tail = (f" {row['gbps']:>7.1f} {100 * row['frac_copy']:>5.0f}%"
                        f" {100 * row['frac_stream']:>5.0f}%"
                        if case.bytes_moved else f" {'-':>7} {'-':>6} {'-':>6}")
                tail += (f" {100 * row['frac_fma_peak']:>4.0f}%" if case.flops else f" {'-':>5}")
                print(f"{kernel:<24} {row['size']:>14} {nt:>3} {_fmt_time(fo_t):>10} "
                      + " ".join(cells) + tail, file=out, flush=True)
                del case, fns, copy_bufs
        if limiter is not None:
            limiter.restore_original_limits()
    print(f"# {len(rows)} rows in {time.perf_counter() - t_start:.0f} s", file=out)
    return {"machine": info, "run": settings, "rows": rows}


def _version():
    from .. import __version__
    return __version__


def _fmt_time(s):
    if s < 1e-3:
        return f"{s * 1e6:.1f} us"
    return f"{s * 1e3:.2f} ms"


def _thread_counts(text):
    import argparse
    try:
        counts = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"expected thread counts >= 1 like 1,2, got {text!r}")
    return counts


def main(argv=None):
    import argparse
    ap = argparse.ArgumentParser(prog="python -m fastopt bench",
                                 description="Time fastopt's kernels against NumPy and torch.")
    ap.add_argument("--threads", default=[1, 2], type=_thread_counts,
                    help="comma-separated thread counts (default 1,2)")
    ap.add_argument("--quick", action="store_true",
                    help="one or a few sizes per kernel, fewer rounds (under a minute)")
    ap.add_argument("--only", default="",
                    help="comma-separated families or kernels (optim, norm, rnn, adam, ...)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"],
                    help="the arrays' dtype (default float32)")
    ap.add_argument("--json", metavar="PATH", help="also write the rows as JSON to PATH ('-': stdout)")
    args = ap.parse_args(argv)
    if args.json and args.json != "-":   # before the run, not after minutes of it
        folder = os.path.dirname(os.path.abspath(args.json))
        if os.path.isdir(args.json) or not os.path.isdir(folder) or not os.access(folder, os.W_OK):
            ap.error(f"--json: cannot write {args.json!r} (a file in an existing, "
                     "writable folder)")
    names = [x.strip() for x in args.only.split(",")]
    if args.only and not all(names):
        ap.error(f"--only: expected names separated by commas, got {args.only!r}")
    families = [x for x in names if x] or None
    load_cases()
    known = {name for family, kernel, *_ in REGISTRY for name in (family, kernel)}
    unknown = sorted(set(families or ()) - known)
    if unknown:
        ap.error(f"--only: unknown {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    res = run(threads=args.threads, quick=args.quick, families=families, dtype=np.dtype(args.dtype),
              out=sys.stderr if args.json == "-" else sys.stdout)
    if args.json:
        text = json.dumps(res, indent=1)
        if args.json == "-":
            print(text)
        else:
            with open(args.json, "w") as f:
                f.write(text)
