"""The BLAS behind fastopt's own matrix products (the recurrent layers).

Providers, chosen per process:

- ``'scipy'``: ``scipy.linalg.cython_blas`` (the OpenBLAS that scipy ships);
  always available, the fallback.
- ``'numpy'``: the OpenBLAS that NumPy's wheels ship (its ILP64 CBLAS, found
  in the already loaded library); absent for NumPy builds on another BLAS.
- ``'dnnl'``: oneDNN's ``dnnl_sgemm`` (JIT AVX2/AVX-512 kernels chosen by the
  CPU's features, whatever its vendor), loaded at run time from the
  ``onednn-cpu-gomp`` wheel (``pip install fastopt[dnnl]``) or ``FASTOPT_DNNL``;
  it threads with GNU OpenMP, the runtime fastopt's own kernels use. oneDNN
  has no float64 GEMM: this provider's float64 products go to scipy's.
- ``'mkl'``: Intel MKL's ``cblas_sgemm``/``cblas_dgemm`` from ``libmkl_rt``
  (the ``mkl`` wheel, ``pip install fastopt[mkl]``, or ``FASTOPT_MKL``), on
  MKL's GNU OpenMP threading layer. On AMD CPUs MKL runs its AVX2 code.

One provider serves every product of the process. ``set_blas('auto')`` (the
default, or ``FASTOPT_BLAS=auto|scipy|numpy|dnnl|mkl``) takes the fastest
that loads, in the order measured here (bench/blas_choice.py and whole
layers, 1 thread, AMD Zen 4): oneDNN (whole layers 10-20% faster than the
next), NumPy's OpenBLAS, scipy's OpenBLAS. MKL measured about even with
NumPy's OpenBLAS (within +-7% per layer, either way), so it is used only
when asked for. On the Xeon (AVX-512) where fastopt's own kernel runs the
per-step products, all four came within about 10% of each other per layer,
oneDNN and MKL within 5% either way (README, "Which BLAS"). Splitting one
layer's products between two libraries did not pay: with 2 threads their
two thread pools spinning on the same cores slowed layers 2-4x.

Threads: during each layer call the provider runs single-threaded (its count
set to 1 and put back at the end, so the user's own BLAS calls are
unaffected), and fastopt's threads split its large products into up to 4
pieces that depend on the shape only, also at 1 thread, so that results are
the same for any ``fastopt.set_num_threads(n)`` with every provider on every
CPU: MKL's and oneDNN's own threads split some products over K, and the
kernels' bits depend on where a piece starts. OpenBLAS's own pool's threads
also spin after each call and took the cores from fastopt's kernels (a
2-thread LSTM ran 4x slower than at 1 thread). The GEMMs and fastopt's
pointwise kernels run one after the other, never at the same time.
"""
import ctypes.util
import glob
import os
import sys

import numpy as np

from . import _fastopt

__all__ = ["set_blas", "get_blas", "find_mkl", "find_dnnl", "ensure_configured"]

_configured = False
_loaded = {"scipy": True}    # provider -> loaded (True) or the OSError met loading it


def _lib_beside(package_dir, libs_dir, pattern):
    hits = sorted(glob.glob(os.path.join(os.path.dirname(package_dir), libs_dir, pattern)))
    return hits[0] if hits else None


def find_mkl():
    """The path of libmkl_rt, or None: $FASTOPT_MKL, then the lib/ folder of
    this environment (where the ``mkl`` wheel puts it), then the loader's path."""
    env = os.environ.get("FASTOPT_MKL")
    if env:
        return env
    for prefix in dict.fromkeys([sys.prefix, sys.base_prefix]):
        for name in ("libmkl_rt.so.3", "libmkl_rt.so.2", "libmkl_rt.so"):
            p = os.path.join(prefix, "lib", name)
            if os.path.exists(p):
                return p
    return ctypes.util.find_library("mkl_rt")


def find_dnnl():
    """The path of a GNU-OpenMP oneDNN (the ``onednn-cpu-gomp`` wheel), or
    None: $FASTOPT_DNNL, then the lib/ folder of this environment."""
    env = os.environ.get("FASTOPT_DNNL")
    if env:
        return env
    for prefix in dict.fromkeys([sys.prefix, sys.base_prefix]):
        p = os.path.join(prefix, "lib", "libdnnl.so.3")
        if os.path.exists(p):
            return p
    return None


def _load(name):
    """Load provider `name` once; True, or raise the OSError that stopped it."""
    if name not in _loaded:
        try:
            if name == "mkl":
                path = find_mkl()
                if path is None:
                    raise OSError("libmkl_rt not found (pip install mkl, or set FASTOPT_MKL)")
                _fastopt.load_mkl(path)
            elif name == "dnnl":
                path = find_dnnl()
                if path is None:
                    raise OSError("libdnnl not found (pip install onednn-cpu-gomp, or set FASTOPT_DNNL)")
                _fastopt.load_dnnl(path)
            elif name == "numpy":
                path = _lib_beside(os.path.dirname(np.__file__), "numpy.libs",
                                   "libscipy_openblas64_*.so")
                if path is None:
                    # NumPy 1.x ships an OpenBLAS too, but one without the
                    # per-call thread setter that fastopt's thread rule needs
                    raise OSError(f"NumPy {np.__version__} ships no scipy-openblas "
                                  "library (NumPy >= 2.0 does)")
                _fastopt.load_numpy_openblas(path)
            else:
                raise ValueError(f"unknown blas {name!r}")
            _loaded[name] = True
        except OSError as e:
            _loaded[name] = e
    if _loaded[name] is not True:
        raise _loaded[name]
    return True


def _available(name):
    try:
        return _load(name)
    except OSError:
        return False


def set_blas(name="auto"):
    """Use provider `name` ('scipy', 'numpy', 'dnnl', 'mkl', or 'auto': the
    measured fastest that loads) for every later recurrent-layer product.
    Returns the provider in use; raises OSError when `name` cannot be loaded."""
    global _configured
    if not isinstance(name, str):
        raise TypeError(f"name must be a str ('auto', 'scipy', 'numpy', 'dnnl' or 'mkl'), "
                        f"got {type(name).__name__}")
    name = str(name)      # a str subclass (numpy.str_): the binding takes exactly str
    if name == "auto":    # measured order, see the module docstring
        name = next(n for n in ("dnnl", "numpy", "scipy") if n == "scipy" or _available(n))
    if name not in ("scipy", "numpy", "dnnl", "mkl"):
        raise ValueError(f"blas must be 'auto', 'scipy', 'numpy', 'dnnl' or 'mkl', got {name!r}")
    _load(name)
    _fastopt.set_blas_provider(name)
    _configured = True
    return name


def get_blas():
    """The provider in use: 'scipy', 'numpy', 'dnnl' or 'mkl'."""
    ensure_configured()
    return _fastopt.blas_provider()


def ensure_configured():
    """Apply $FASTOPT_BLAS (default 'auto') once, before the first layer call."""
    if not _configured:
        set_blas(os.environ.get("FASTOPT_BLAS", "auto"))
