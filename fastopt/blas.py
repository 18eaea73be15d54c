"""The BLAS behind fastopt's own matrix products (the recurrent layers).

Two providers, chosen per process:

- ``'scipy'``: ``scipy.linalg.cython_blas`` (the OpenBLAS that scipy ships);
  always available, the fallback.
- ``'mkl'``: Intel MKL's ``cblas_sgemm``/``cblas_dgemm`` from ``libmkl_rt``,
  loaded at run time when the ``mkl`` wheel is installed
  (``pip install fastopt[mkl]``) or ``FASTOPT_MKL`` names the library.

``set_blas('auto')`` (the default, also taken from the environment variable
``FASTOPT_BLAS=auto|scipy|mkl``) picks MKL when it loads, else scipy.

Threads: MKL runs on the GNU OpenMP runtime that fastopt itself uses, with
``fastopt.get_num_threads()`` threads (set per call), so one thread pool
serves both. scipy's OpenBLAS has its own pool, which fastopt cannot size
from Cython: limit it with ``threadpoolctl.threadpool_limits(n, 'blas')``.
Within a layer the GEMMs and fastopt's pointwise kernels run one after the
other, never at the same time.
"""
import ctypes.util
import glob
import os
import sys

from . import _fastopt

__all__ = ["set_blas", "get_blas", "find_mkl"]

_configured = False
_mkl_loaded = None      # path of the loaded libmkl_rt, or None


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
        hits = sorted(glob.glob(os.path.join(prefix, "lib", "libmkl_rt.so*")))
        if hits:
            return hits[0]
    return ctypes.util.find_library("mkl_rt")


def _load_mkl():
    global _mkl_loaded
    if _mkl_loaded is None:
        path = find_mkl()
        if path is None:
            raise OSError("libmkl_rt not found (pip install mkl, or set FASTOPT_MKL)")
        _fastopt.load_mkl(path)
        _mkl_loaded = path
    return _mkl_loaded


def set_blas(name="auto"):
    """Use BLAS `name` ('auto', 'scipy' or 'mkl') for every later recurrent
    layer call; returns the provider in use. 'mkl' raises OSError when
    libmkl_rt cannot be loaded; 'auto' then falls back to scipy."""
    global _configured
    if name not in ("auto", "scipy", "mkl"):
        raise ValueError(f"name must be 'auto', 'scipy' or 'mkl', got {name!r}")
    if name == "scipy":
        _fastopt.set_blas_provider("scipy")
    else:
        try:
            _load_mkl()
            _fastopt.set_blas_provider("mkl")
        except OSError:
            if name == "mkl":
                raise
            _fastopt.set_blas_provider("scipy")
    _configured = True
    return _fastopt.blas_provider()


def get_blas():
    """The provider in use: 'scipy' or 'mkl' (configures the default first)."""
    ensure_configured()
    return _fastopt.blas_provider()


def ensure_configured():
    """Apply $FASTOPT_BLAS (default 'auto') once, before the first layer call."""
    if not _configured:
        set_blas(os.environ.get("FASTOPT_BLAS", "auto"))
