"""The benchmark runner behind `python -m fastopt bench` (the main job): it
must produce a row per size with fastopt's time, the same-run ratios and the
fraction of copy bandwidth, and valid JSON. Timings are not asserted."""
import io
import json

import numpy as np
import pytest

from fastopt import bench


def test_runner_rows_and_json(tmp_path):
    out = io.StringIO()
    res = bench.run(threads=(1,), quick=True, families=["sgd-momentum"], min_time=0.001,
                    out=out)
    rows = res["rows"]
    assert [r["size"] for r in rows] == ["1e4", "1e6", "model150"]
    for r in rows:
        t = r["seconds"]
        assert t["fastopt"] > 0 and t["numpy"] > 0 and t["numpy_careful"] > 0
        assert r["bytes_moved"] > 0 and r["frac_copy"] > 0 and r["gbps"] > 0
    text = out.getvalue()
    assert "sgd-momentum" in text and "%copy" in text
    assert text.count("\nsgd-momentum") == 3
    path = tmp_path / "b.json"
    bench.main(["--quick", "--only", "sgd-momentum", "--threads", "1", "--json", str(path)])
    record = json.loads(path.read_text())
    assert record["rows"][0]["kernel"] == "sgd-momentum"
    assert record["run"]["threads"] == [1] and record["run"]["quick"] is True
    assert record["run"]["only"] == ["sgd-momentum"] and record["run"]["fastopt"]


def test_interleaved_timing_measures_each_callable():
    """time_interleaved gives each callable its own median, with and without
    pauses between libraries: a callable that sleeps 2 ms is timed near 2 ms,
    beside a fast one (the pauses are not timed)."""
    import time
    for settle in (0.0, 0.01):
        t = bench.time_interleaved({"fastopt": lambda: time.sleep(0.002),
                                    "numpy": lambda: np.zeros(10)},
                                   rounds=5, target=0.004, settle=settle)
        assert 0.0018 < t["fastopt"] < 0.02
        assert t["numpy"] < 0.001


def test_gemm_rows_report_the_fraction_of_the_fma_peak():
    """Recurrent rows carry their GEMM flops (a GRU cell forward: x W_ih^T and
    h W_hh^T, 2*B*3H*(I+H)) and the fraction of the FMA peak measured in the
    same run."""
    res = bench.run(threads=(1,), quick=True, families=["gru-cell-fwd"], min_time=0.001,
                    out=io.StringIO())
    peak = res["machine"]["fma_peak_gflops"]
    assert 1 < peak < 1e5
    (row,) = res["rows"]
    B, I, H = 64, 256, 512
    assert row["size"] == f"B{B} I{I} H{H}"
    flops = row["gflops"] * 1e9 * row["seconds"]["fastopt"]
    assert abs(flops - 2 * B * 3 * H * (I + H)) < 1e-6 * flops
    assert row["frac_fma_peak"] == row["gflops"] / peak


def test_bad_options_are_refused_by_name(capsys):
    """Thread counts that are not whole numbers >= 1, --only names that match
    no family or kernel (or empty ones), and a --json path that cannot be
    written stop the runner before it runs, with a usage error that says what
    was expected (instead of a traceback, a table with no rows, or a whole
    run whose results are lost when the file fails to open)."""
    for argv, words in ((["--threads", "x"], ["--threads", "'x'"]),
                        (["--threads", "1,0"], ["--threads", "'1,0'"]),
                        (["--only", "adam,adamm"], ["--only", "adamm", "known:", "rmsprop"]),
                        (["--only", ","], ["--only", "separated by commas"]),
                        (["--only", "adam", "--json", "/nonexistent/x.json"],
                         ["--json", "/nonexistent/x.json"]),
                        (["--only", "adam", "--json", "/"], ["--json", "cannot write"])):
        with pytest.raises(SystemExit) as e:
            bench.main(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert all(w in err for w in words), err


def test_module_entry_point_usage(capsys):
    """python -m fastopt --help printed the usage to stderr and exited 2;
    asked for, it goes to stdout with 0. Without the subcommand: stderr, 2."""
    from fastopt.__main__ import main
    for argv in (["--help"], ["-h"]):
        assert main(argv) == 0
        out = capsys.readouterr()
        assert out.out.startswith("python -m fastopt bench") and not out.err
    for argv in ([], ["benchmark"]):
        assert main(argv) == 2
        out = capsys.readouterr()
        assert out.err.startswith("python -m fastopt bench") and not out.out
