"""src_c/ stands alone: the C test program builds against fastopt.h and the .c
files with nothing else (no Python) and passes, with and without OpenMP."""
import glob
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("program", ["test_kernels.c", "test_rnn.c"])
@pytest.mark.parametrize("openmp", [True, False], ids=["openmp", "serial"])
def test_c_program_builds_and_passes(tmp_path, openmp, program):
    cc = os.environ.get("CC", "cc")
    if shutil.which(cc) is None:
        if os.environ.get("FASTOPT_REQUIRE_TORCH") == "1":   # CI: a compiler is there
            pytest.fail(f"no C compiler {cc!r}")
        pytest.skip("no C compiler")
    srcs = sorted(glob.glob(os.path.join(ROOT, "src_c", "*.c")))
    exe = str(tmp_path / program[:-2])
    cmd = [cc, "-std=c99", "-O2", "-Wall", "-Werror", "-fno-math-errno",
           "-I", os.path.join(ROOT, "src_c"), os.path.join(ROOT, "tests", "c", program),
           *srcs, "-lm", "-o", exe] + (["-fopenmp"] if openmp else [])
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    r = subprocess.run([exe], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.startswith("ok"), r.stdout
