"""The extension list: one Cython binding module compiled together with every
C kernel in src_c/.

One extension (fastopt._fastopt, whose .pyx includes one .pxi per kernel family)
so that the C library's state (the thread count) exists once in the process.

FASTOPT_DEBUG=1 turns Cython's bounds and wraparound checks back on and builds
with -O0 -g.
"""
import os
import subprocess
import sys
import sysconfig
import tempfile
from glob import glob

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup

DEBUG = os.environ.get("FASTOPT_DEBUG") == "1"


def compiler_has_openmp():
    """Compile and link a tiny OpenMP program with the compiler Python uses."""
    cc = os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc"
    cc = cc.split()
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "t.c")
        with open(src, "w") as f:
            f.write("#include <omp.h>\nint main(void){return omp_get_max_threads() < 1;}\n")
        try:
            r = subprocess.run(cc + ["-fopenmp", src, "-o", os.path.join(d, "t")],
                               capture_output=True)
        except OSError:
            return False
        return r.returncode == 0


openmp = os.environ.get("FASTOPT_NO_OPENMP") != "1" and compiler_has_openmp()
if not openmp:
    print("fastopt: building WITHOUT OpenMP (kernels run on one thread)", file=sys.stderr)

# No -march=native (the build must run on every x86-64: src_c dispatches to
# AVX2/AVX-512 at run time) and no -ffast-math (NaN/Inf must propagate).
# -fno-math-errno lets GCC vectorize sqrt. -g0 drops the debug info that
# Python's own CFLAGS ask for (-g): the module was 8.5 MB with it, 2.2 without.
cflags = ["-fno-math-errno", "-Wno-unused-function"]
cflags += ["-O0", "-g"] if DEBUG else ["-O3", "-g0"]
ldflags = []
if openmp:
    cflags.append("-fopenmp")
    ldflags.append("-fopenmp")

ext = Extension(
    "fastopt._fastopt",
    sources=["fastopt/_fastopt.pyx"] + sorted(glob("src_c/*.c")),
    include_dirs=["src_c", np.get_include()],
    define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
    extra_compile_args=cflags,
    extra_link_args=ldflags,
    depends=glob("src_c/*.h") + glob("fastopt/*.pxi") + glob("fastopt/*.pxd"),
)

directives = {
    "language_level": 3,
    "boundscheck": DEBUG,
    "wraparound": DEBUG,
    "initializedcheck": DEBUG,
    "cdivision": True,
}

setup(ext_modules=cythonize([ext], compiler_directives=directives))
