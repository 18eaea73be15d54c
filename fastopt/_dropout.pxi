# Dropout and noise bindings: check buffers and hyperparameters, then one C
# call without the GIL. Masks are uint8 arrays of ceil(n/8) bytes.
from libc.stdint cimport uint8_t, uint64_t

cdef extern from "fastopt.h" nogil:
    ctypedef struct fo_dropout_args:
        double p
        uint64_t seed, offset
    ctypedef struct fo_noise_args:
        double std
        uint64_t seed, offset

    void fo_dropout_forward_f32(float *y, uint8_t *mask, const float *x, int64_t n,
                                const fo_dropout_args *a)
    void fo_dropout_forward_f64(double *y, uint8_t *mask, const double *x, int64_t n,
                                const fo_dropout_args *a)
    void fo_dropout_backward_f32(float *dx, const uint8_t *mask, const float *dy, int64_t n,
                                 const fo_dropout_args *a)
    void fo_dropout_backward_f64(double *dx, const uint8_t *mask, const double *dy, int64_t n,
                                 const fo_dropout_args *a)
    void fo_dropout_use_portable(int on)
    void fo_gaussian_noise_f32(float *y, const float *x, int64_t n, const fo_noise_args *a)
    void fo_gaussian_noise_f64(double *y, const double *x, int64_t n, const fo_noise_args *a)


cdef int _check_out_like(object out, cnp.ndarray x, str name, str xname) except -1:
    """out: an ndarray, writable, x's dtype and shape; either x itself or
    disjoint from it. (out is untyped in the bindings so that a non-array is a
    TypeError naming it, not Cython's "Argument 'y' has incorrect type".)"""
    _check_array(out, name, x.dtype, True)
    if not _same_shape(out, x):
        raise ValueError(f"{name} must have {xname}'s shape {_shp(x)}, got {_shp(out)}")
    if out is not x and cnp.PyArray_DATA(out) != cnp.PyArray_DATA(x) and _overlap(out, x):
        raise ValueError(f"{name} partially overlaps {xname} (only exactly in place is allowed)")
    return 0


cdef int _check_mask(object mask, int64_t n, bint writable) except -1:
    if not isinstance(mask, cnp.ndarray):
        raise TypeError(f"mask must be a numpy.ndarray of uint8, got {type(mask).__name__}")
    _check_array(mask, "mask", np.uint8, writable)
    if mask.ndim != 1 or mask.size != (n + 7) // 8:
        raise ValueError(f"mask must have shape ({(n + 7) // 8},) (ceil(n/8) bytes, n = {n}), "
                         f"got {mask.shape}")
    return 0


cdef int _check_p(double p) except -1:
    if not (p >= 0.0 and p <= 1.0):
        raise ValueError(f"p must be in [0, 1], got {p}")
    return 0


def dropout_forward(cnp.ndarray x, y, mask, double p, uint64_t seed,
                    uint64_t offset):
    """y = x * (kept ? 1/(1-p) : 0); the keep bits go to mask (None: not stored)."""
    _check_array(x, "x", None, False)
    _check_out_like(y, x, "out", "x")
    cdef int64_t n = x.size
    if mask is not None:
        _check_mask(mask, n, True)
        _check_no_overlap([("mask", mask)], [("x", x), ("out", y)])
    _check_p(p)
    cdef fo_dropout_args a
    a.p = p; a.seed = seed; a.offset = offset
    cdef void *py = cnp.PyArray_DATA(<cnp.ndarray>y)
    cdef const void *px = cnp.PyArray_DATA(x)
    cdef uint8_t *pm = <uint8_t *>_data_or_null(mask)
    cdef bint f64 = x.dtype == np.float64
    with nogil:
        if f64:
            fo_dropout_forward_f64(<double *>py, pm, <const double *>px, n, &a)
        else:
            fo_dropout_forward_f32(<float *>py, pm, <const float *>px, n, &a)


def dropout_backward(cnp.ndarray dy, dx, mask, double p, uint64_t seed,
                     uint64_t offset):
    """dx = dy * (kept ? 1/(1-p) : 0), kept from mask, or (mask None) from (seed, offset)."""
    _check_array(dy, "dy", None, False)
    _check_out_like(dx, dy, "out", "dy")
    cdef int64_t n = dy.size
    if mask is not None:
        _check_mask(mask, n, False)
        _check_no_overlap([("out", dx)], [("mask", mask)])
    _check_p(p)
    cdef fo_dropout_args a
    a.p = p; a.seed = seed; a.offset = offset
    cdef void *pdx = cnp.PyArray_DATA(<cnp.ndarray>dx)
    cdef const void *pdy = cnp.PyArray_DATA(dy)
    cdef const uint8_t *pm = <const uint8_t *>_data_or_null(mask)
    cdef bint f64 = dy.dtype == np.float64
    with nogil:
        if f64:
            fo_dropout_backward_f64(<double *>pdx, pm, <const double *>pdy, n, &a)
        else:
            fo_dropout_backward_f32(<float *>pdx, pm, <const float *>pdy, n, &a)


def gaussian_noise(cnp.ndarray x, y, double std, uint64_t seed, uint64_t offset):
    """y = x + std * N(0, 1) (y may be x)."""
    _check_array(x, "x", None, False)
    _check_out_like(y, x, "out", "x")
    if not std >= 0.0:
        raise ValueError(f"std must be >= 0, got {std}")
    cdef fo_noise_args a
    a.std = std; a.seed = seed; a.offset = offset
    cdef int64_t n = x.size
    cdef void *py = cnp.PyArray_DATA(<cnp.ndarray>y)
    cdef const void *px = cnp.PyArray_DATA(x)
    cdef bint f64 = x.dtype == np.float64
    with nogil:
        if f64:
            fo_gaussian_noise_f64(<double *>py, <const double *>px, n, &a)
        else:
            fo_gaussian_noise_f32(<float *>py, <const float *>px, n, &a)


def _dropout_use_portable(bint on):
    """Testing hook: run the portable dropout code even on AVX-512 CPUs."""
    fo_dropout_use_portable(on)
