# Threads and the buffer checks shared by every family.
from libc.stdint cimport int64_t
from libc.stdlib cimport malloc, free
from numpy.ma import MaskedArray

cdef extern from "fastopt.h" nogil:
    void fo_set_num_threads(int n)
    int fo_get_num_threads()
    int fo_has_openmp()
    void fo_copy(void *dst, const void *src, int64_t nbytes)
    void fo_stream_add_f32(float *a, const float *b, int64_t n)
    float fo_fma_peak_f32(int64_t rounds)


def set_num_threads(n):
    """Use n threads (an int, 1 <= n < 2**31) in every fastopt kernel from now on."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise TypeError(f"n must be an int, got {type(n).__name__}")
    if not 1 <= n <= 2147483647:
        raise ValueError(f"n must be in [1, 2**31), got {n}")
    fo_set_num_threads(<int>n)


def get_num_threads():
    """The number of threads fastopt kernels use (1 without OpenMP)."""
    return fo_get_num_threads()


def has_openmp():
    """True when this build has OpenMP (so set_num_threads(n > 1) takes effect)."""
    return bool(fo_has_openmp())


def copy(cnp.ndarray dst, cnp.ndarray src):
    """dst[...] = src with the kernels' threads: the copy-bandwidth baseline."""
    _check_array(dst, "dst", src.dtype, True)
    _check_array(src, "src", dst.dtype, False)
    if dst.nbytes != src.nbytes:
        raise ValueError(f"dst has {dst.nbytes} bytes, src {src.nbytes}")
    cdef void *d = cnp.PyArray_DATA(dst)
    cdef const void *s = cnp.PyArray_DATA(src)
    cdef int64_t nb = dst.nbytes
    with nogil:
        fo_copy(d, s, nb)


def stream_add(cnp.ndarray a, cnp.ndarray b):
    """a += b (float32) with the kernels' threads: the in-place streaming baseline."""
    _check_array(a, "a", np.float32, True)
    _check_array(b, "b", np.float32, False)
    if a.size != b.size:
        raise ValueError(f"a has {a.size} elements, b {b.size}")
    cdef float *pa = <float *>cnp.PyArray_DATA(a)
    cdef const float *pb = <const float *>cnp.PyArray_DATA(b)
    cdef int64_t n = a.size
    with nogil:
        fo_stream_add_f32(pa, pb, n)


def fma_peak(double seconds=0.02, int repeats=5):
    """One core's float32 multiply-add rate in GFLOP/s (the best of `repeats`
    timings of about `seconds` each): the compute roof of the recurrent
    layers' GEMMs, measured by the benchmark in the same run."""
    import time
    cdef int64_t rounds = 1 << 16
    cdef double best = 0.0, dt
    cdef int r
    while True:   # calibrate: rounds for about `seconds`
        t0 = time.perf_counter()
        with nogil:
            fo_fma_peak_f32(rounds)
        dt = time.perf_counter() - t0
        if dt >= seconds / 4 or rounds >= (<int64_t>1 << 40):
            break
        rounds *= 4
    for r in range(repeats):
        t0 = time.perf_counter()
        with nogil:
            fo_fma_peak_f32(rounds)
        dt = time.perf_counter() - t0
        best = max(best, 384.0 * rounds / dt / 1e9)
    return best


# ------------------------------------------- what the Python layer hands down

def as_array(a, str name):
    """a as an ndarray to read: an ndarray as it is; a torch CPU tensor, a
    memoryview, anything with the buffer protocol, __array_interface__ or
    DLPack as a view of its memory; a (nested) sequence read into a new array.
    TypeError naming `name` otherwise, and for a torch tensor that requires
    grad (torch refuses to view it; detaching it here would hide that autograd
    is cut)."""
    if isinstance(a, cnp.ndarray):
        return a
    if a is None:   # np.asarray would make a 0-d object array of it
        raise TypeError(f"{name} must be an array, got None")
    if getattr(a, "requires_grad", False) is True:
        raise TypeError(f"{name} is a torch tensor that requires grad: pass {name}.detach()")
    try:
        # np.asarray of an object with DLPack alone would be a 0-d object array
        if hasattr(a, "__dlpack__") and not hasattr(a, "__array__"):
            return np.from_dlpack(a)
        return np.asarray(a)
    except Exception as e:   # ragged lists; bfloat16, conjugated, meta or GPU tensors
        raise TypeError(f"{name} cannot be read as an array: {e}") from None


def as_inplace_array(a, str name):
    """as_array(a), for an array that fastopt writes in place: refused with a
    TypeError when it would be a copy (a list, say), since the caller's object
    would then never see the result."""
    if isinstance(a, cnp.ndarray):
        return a
    arr = as_array(a, name)
    root = arr      # memory NumPy allocated itself is a copy, however it is viewed
    while isinstance(root, cnp.ndarray) and (<object>root).base is not None:
        root = (<object>root).base
    if isinstance(root, cnp.ndarray):
        raise TypeError(f"{name} ({type(a).__name__}) would be copied, so it could not "
                        "be updated in place; pass an ndarray or a buffer")
    return arr


cdef inline str _dtype_name(object dt):
    return str(np.dtype(dt)) if dt is not None else "float32 or float64"


cdef inline bint _rows_contiguous(cnp.ndarray a):
    """A 2-D matrix whose rows are contiguous and do not overlap (rows a BLAS
    leading dimension apart)."""
    cdef Py_ssize_t isz = cnp.PyArray_ITEMSIZE(a)
    if cnp.PyArray_NDIM(a) != 2:
        return False
    cdef Py_ssize_t rs = cnp.PyArray_STRIDE(a, 0), n = cnp.PyArray_DIM(a, 1)
    return ((cnp.PyArray_STRIDE(a, 1) == isz or n <= 1) and rs % isz == 0
            and (rs >= n * isz or cnp.PyArray_DIM(a, 0) <= 1))


cdef int _check_array(object a, str name, object dtype, bint writable,
                      bint rows=False) except -1:
    """a must be an ndarray, C-contiguous (or, with `rows`, a 2-D matrix with
    contiguous rows), of `dtype` (float32/float64 when None), and writeable
    when `writable`."""
    if not isinstance(a, cnp.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(a).__name__}")
    if isinstance(a, MaskedArray):   # the kernels would use the masked entries too
        raise TypeError(f"{name} is a masked array: pass its data, filled as you need")
    cdef cnp.ndarray arr = <cnp.ndarray>a
    cdef int tn = cnp.PyArray_TYPE(arr)
    if not cnp.PyArray_ISNOTSWAPPED(arr):   # the kernels read the machine's byte order
        raise TypeError(f"{name} must be in the machine's byte order, got dtype {arr.dtype}")
    if dtype is None:
        if tn != cnp.NPY_FLOAT32 and tn != cnp.NPY_FLOAT64:
            raise TypeError(f"{name} must be float32 or float64, got {arr.dtype}")
    elif (tn != (<cnp.dtype>dtype).type_num if isinstance(dtype, cnp.dtype)   # fast path
          else arr.dtype != dtype):
        raise TypeError(f"{name} must have dtype {_dtype_name(dtype)}, got {arr.dtype}")
    if not cnp.PyArray_IS_C_CONTIGUOUS(arr) and not (rows and _rows_contiguous(arr)):
        raise ValueError(f"{name} must be " + ("a 2-D matrix with contiguous rows" if rows
                                               else "C-contiguous"))
    if not cnp.PyArray_ISALIGNED(arr):   # C reads whole elements (np.frombuffer at an odd offset)
        raise ValueError(f"{name} must be aligned to its element size")
    if writable and not cnp.PyArray_ISWRITEABLE(arr):
        raise ValueError(f"{name} is read-only but is written in place")
    return 0


cdef inline bint _overlap(cnp.ndarray a, cnp.ndarray b):
    """True when the byte ranges of two C-contiguous arrays intersect."""
    cdef char *pa = <char *>cnp.PyArray_DATA(a)
    cdef char *pb = <char *>cnp.PyArray_DATA(b)
    cdef Py_ssize_t na = cnp.PyArray_NBYTES(a), nb = cnp.PyArray_NBYTES(b)
    if na == 0 or nb == 0:
        return False
    return pa < pb + nb and pb < pa + na


cdef inline bint _same_shape(cnp.ndarray a, cnp.ndarray b):
    cdef int d
    if cnp.PyArray_NDIM(a) != cnp.PyArray_NDIM(b):
        return False
    for d in range(cnp.PyArray_NDIM(a)):
        if cnp.PyArray_DIMS(a)[d] != cnp.PyArray_DIMS(b)[d]:
            return False
    return True


cdef int _check_no_overlap(list written, list read) except -1:
    """No two written arrays overlap, and no written array overlaps a read one
    (pairs are (name, array); None entries are skipped)."""
    cdef Py_ssize_t i, k
    for i in range(len(written)):
        if written[i][1] is None:
            continue
        for k in range(i + 1, len(written)):
            if written[k][1] is not None and _overlap(written[i][1], written[k][1]):
                raise ValueError(f"{written[i][0]} and {written[k][0]} share memory")
        for k in range(len(read)):
            if read[k][1] is not None and _overlap(written[i][1], read[k][1]):
                raise ValueError(f"{written[i][0]} shares memory with {read[k][0]}")
    return 0


def check_reads_apart_from_grads(list reads, grads):
    """ValueError for the first array a backward reads ((name, array) pairs,
    C-contiguous; None skipped) that shares memory with one of `grads`
    ({parameter name: gradient}), which it accumulates into."""
    cdef cnp.ndarray a
    for name, r in reads:
        if r is None:
            continue
        a = <cnp.ndarray?>r
        for gname, g in grads.items():
            if _overlap(a, <cnp.ndarray?>g):
                raise ValueError(f"{name} shares memory with the gradient of {gname}, "
                                 "which backward accumulates into")


cdef int _check_rc(int rc, str what) except -1:
    """A C kernel's return code: 0, -1 (no memory for scratch) or -2 (arguments
    that fastopt.h forbids; the checks above should have caught them)."""
    if rc == -2:
        raise ValueError(f"{what}: the C kernel refused its arguments")
    if rc != 0:
        raise MemoryError(f"{what}: no memory for scratch")
    return 0
