# Recurrent layers: the BLAS that fastopt's own matrix products use, and the
# checked entry points of the sequence drivers in src_c/rnn.c.
#
# The GEMM reaches C as a function pointer (fo_gemm_f32_fn/_f64_fn, row-major)
# from one of the providers below, chosen per process (fastopt.blas): scipy's
# cython_blas (always there) or a library dlopen-ed at run time.
from libc.stdint cimport int32_t
from posix.dlfcn cimport dlopen, dlsym, dlerror, RTLD_NOW, RTLD_LOCAL
cdef extern from "<dlfcn.h>" nogil:
    const int RTLD_NOLOAD      # glibc: the handle of an already loaded library, or NULL
from cpython.pycapsule cimport PyCapsule_GetPointer, PyCapsule_GetName
from cpython.pythread cimport (PyThread_type_lock, PyThread_allocate_lock,
                               PyThread_acquire_lock, PyThread_release_lock, WAIT_LOCK)

cdef extern from "fastopt.h" nogil:
    ctypedef void (*fo_gemm_f32_fn)(int trans_a, int trans_b, int64_t m, int64_t n, int64_t k,
                                   const float *a, int64_t lda, const float *b, int64_t ldb,
                                   float beta, float *c, int64_t ldc)
    ctypedef void (*fo_gemm_f64_fn)(int trans_a, int trans_b, int64_t m, int64_t n, int64_t k,
                                   const double *a, int64_t lda, const double *b, int64_t ldb,
                                   double beta, double *c, int64_t ldc)
    ctypedef struct fo_rnn_layer:
        int mode
        int64_t seq_len, batch, input_size, hidden_size
        const void *w_ih
        const void *w_hh
        const void *b_ih
        const void *b_hh
        int64_t proj_size
        const void *w_hr
    ctypedef struct fo_rnn_forward_io:
        const void *x
        const void *h0
        const void *c0
        void *out
        void *c_all
        void *gates
        void *extra
    ctypedef struct fo_rnn_backward_io:
        const void *dout
        const void *dh_n
        const void *dc_n
        void *dx
        void *dh0
        void *dc0
        void *dw_ih
        void *dw_hh
        void *db_ih
        void *db_hh
        void *dgates
        void *dgates_hh
        void *dw_hr
        int64_t ld_dgates
    int fo_rnn_forward_f32(const fo_rnn_layer *layer, const fo_rnn_forward_io *io,
                           fo_gemm_f32_fn gemm)
    int fo_rnn_forward_f64(const fo_rnn_layer *layer, const fo_rnn_forward_io *io,
                           fo_gemm_f64_fn gemm)
    int fo_rnn_backward_f32(const fo_rnn_layer *layer, const fo_rnn_forward_io *saved,
                            const fo_rnn_backward_io *io, fo_gemm_f32_fn gemm)
    int fo_rnn_backward_f64(const fo_rnn_layer *layer, const fo_rnn_forward_io *saved,
                            const fo_rnn_backward_io *io, fo_gemm_f64_fn gemm)
    int fo_rnn_num_gates(int mode)
    int64_t fo_rnn_dgates_ld(int mode, int64_t hidden_size, int64_t elem_size)
    void fo_rnn_use_portable(int on)

RNN_MODES = {"rnn_tanh": 0, "rnn_relu": 1, "lstm": 2, "gru": 3, "gru_reset_before": 4}


def rnn_dgates_width(str mode, int64_t hidden_size, dtype):
    """The row width to allocate backward's dgates scratch with, (T, B, width):
    G*hidden_size, padded where rows a multiple of 4 KiB apart would slow the
    weight-gradient GEMMs (fo_rnn_dgates_ld)."""
    return fo_rnn_dgates_ld(RNN_MODES[mode], hidden_size, np.dtype(dtype).itemsize)

# ---------------------------------------------------------------- the GEMMs

# Providers, each a pair of row-major GEMMs (float32, float64) and an optional
# thread-count setter (returns the previous count):
#   scipy  scipy.linalg.cython_blas (scipy's OpenBLAS): always there
#   numpy  NumPy's own OpenBLAS (its ILP64 CBLAS), when NumPy ships one
#   dnnl   oneDNN's dnnl_sgemm (onednn-cpu-gomp wheel), float64 via scipy
#   mkl    Intel MKL's CBLAS from libmkl_rt (mkl wheel)
# One provider serves every product of a process (fastopt.blas chooses it).

cdef enum:
    CBLAS_ROW_MAJOR = 101
    CBLAS_NO_TRANS = 111
    CBLAS_TRANS = 112
    MKL_THREADING_GNU = 3       # MKL's threads are libgomp's: the runtime fastopt uses

ctypedef int (*set_threads_fn)(int) noexcept nogil


# scipy's BLAS is Fortran (column-major, 32-bit ints). Its GEMMs are taken from
# scipy.linalg.cython_blas at the first product, not cimported: importing
# scipy.linalg took more than half of `import fastopt` (227 ms here), paid by
# users who never run a recurrent layer.
ctypedef void (*fortran_sgemm_t)(char *ta, char *tb, int *m, int *n, int *k, float *alpha,
                                 float *a, int *lda, float *b, int *ldb, float *beta,
                                 float *c, int *ldc) noexcept nogil
ctypedef void (*fortran_dgemm_t)(char *ta, char *tb, int *m, int *n, int *k, double *alpha,
                                 double *a, int *lda, double *b, int *ldb, double *beta,
                                 double *c, int *ldc) noexcept nogil
cdef fortran_sgemm_t _blas_sgemm = NULL
cdef fortran_dgemm_t _blas_dgemm = NULL


cdef int _scipy_blas_ready() except -1:
    """Resolve scipy's sgemm/dgemm once; every entry point that multiplies
    calls this first (with the GIL), since any provider may fall back to them."""
    global _blas_sgemm, _blas_dgemm
    if _blas_sgemm != NULL:
        return 0
    try:
        from scipy.linalg import cython_blas
    except ImportError as e:
        raise ImportError("the recurrent layers need SciPy (scipy.linalg.cython_blas, the BLAS "
                          f"every provider falls back to), a dependency of fastopt: {e}") from e
    capi = cython_blas.__pyx_capi__
    s, d = capi["sgemm"], capi["dgemm"]
    _blas_dgemm = <fortran_dgemm_t>PyCapsule_GetPointer(d, PyCapsule_GetName(d))
    # Only now is scipy's OpenBLAS loaded: find its thread setter (NULL: none,
    # no split) through cython_blas's handle, whose look-ups search what it links.
    cdef bytes path = cython_blas.__file__.encode()
    cdef void *h = dlopen(path, RTLD_NOW | RTLD_LOCAL | RTLD_NOLOAD)
    _openblas[0].set_threads = <set_threads_fn>(dlsym(h, b"openblas_set_num_threads_local")
                                                if h != NULL else NULL)
    _blas_sgemm = <fortran_sgemm_t>PyCapsule_GetPointer(s, PyCapsule_GetName(s))
    return 0


# A row-major product C = op(A) op(B) is the column-major C^T = op(B)^T op(A)^T:
# swap the operands.
cdef void _scipy_gemm_f32(int ta, int tb, int64_t m, int64_t n, int64_t k,
                          const float *a, int64_t lda, const float *b, int64_t ldb,
                          float beta, float *c, int64_t ldc) noexcept nogil:
    cdef char ca = b'T' if ta else b'N'
    cdef char cb = b'T' if tb else b'N'
    cdef int im = <int>m, in_ = <int>n, ik = <int>k
    cdef int ilda = <int>lda, ildb = <int>ldb, ildc = <int>ldc
    cdef float one = 1
    _blas_sgemm(&cb, &ca, &in_, &im, &ik, &one, <float *>b, &ildb, <float *>a, &ilda,
                &beta, c, &ildc)


cdef void _scipy_gemm_f64(int ta, int tb, int64_t m, int64_t n, int64_t k,
                          const double *a, int64_t lda, const double *b, int64_t ldb,
                          double beta, double *c, int64_t ldc) noexcept nogil:
    cdef char ca = b'T' if ta else b'N'
    cdef char cb = b'T' if tb else b'N'
    cdef int im = <int>m, in_ = <int>n, ik = <int>k
    cdef int ilda = <int>lda, ildb = <int>ldb, ildc = <int>ldc
    cdef double one = 1
    _blas_dgemm(&cb, &ca, &in_, &im, &ik, &one, <double *>b, &ildb, <double *>a, &ilda,
                &beta, c, &ildc)


# CBLAS row-major GEMMs resolved with dlsym: MKL's LP64 (32-bit ints) and
# NumPy's OpenBLAS ILP64 (64-bit ints).
ctypedef void (*sgemm32_t)(int layout, int ta, int tb, int32_t m, int32_t n, int32_t k,
                           float alpha, const float *a, int32_t lda, const float *b,
                           int32_t ldb, float beta, float *c, int32_t ldc) noexcept nogil
ctypedef void (*dgemm32_t)(int layout, int ta, int tb, int32_t m, int32_t n, int32_t k,
                           double alpha, const double *a, int32_t lda, const double *b,
                           int32_t ldb, double beta, double *c, int32_t ldc) noexcept nogil
ctypedef void (*sgemm64_t)(int layout, int ta, int tb, int64_t m, int64_t n, int64_t k,
                           float alpha, const float *a, int64_t lda, const float *b,
                           int64_t ldb, float beta, float *c, int64_t ldc) noexcept nogil
ctypedef void (*dgemm64_t)(int layout, int ta, int tb, int64_t m, int64_t n, int64_t k,
                           double alpha, const double *a, int64_t lda, const double *b,
                           int64_t ldb, double beta, double *c, int64_t ldc) noexcept nogil

# oneDNN's dnnl_sgemm (row-major, 64-bit dims; float32 only) and the OpenMP
# calls of the runtime it threads with (GNU OpenMP in the onednn-cpu-gomp
# wheel: the same libgomp as fastopt's kernels).
ctypedef int (*dnnl_sgemm_t)(char ta, char tb, int64_t m, int64_t n, int64_t k, float alpha,
                             const float *a, int64_t lda, const float *b, int64_t ldb,
                             float beta, float *c, int64_t ldc) noexcept nogil
ctypedef void (*omp_set_t)(int) noexcept nogil
ctypedef int (*omp_get_t)() noexcept nogil
cdef dnnl_sgemm_t _dnnl_sgemm = NULL
cdef omp_set_t _omp_set_num_threads = NULL
cdef omp_get_t _omp_get_max_threads = NULL

cdef sgemm32_t _mkl_sgemm = NULL
cdef dgemm32_t _mkl_dgemm = NULL
cdef sgemm64_t _npy_sgemm = NULL
cdef dgemm64_t _npy_dgemm = NULL

cdef inline int _tr(int t) noexcept nogil:
    return CBLAS_TRANS if t else CBLAS_NO_TRANS


cdef void _mkl_gemm_f32(int ta, int tb, int64_t m, int64_t n, int64_t k,
                        const float *a, int64_t lda, const float *b, int64_t ldb,
                        float beta, float *c, int64_t ldc) noexcept nogil:
    _mkl_sgemm(CBLAS_ROW_MAJOR, _tr(ta), _tr(tb), <int32_t>m, <int32_t>n, <int32_t>k,
               1.0, a, <int32_t>lda, b, <int32_t>ldb, beta, c, <int32_t>ldc)


cdef void _mkl_gemm_f64(int ta, int tb, int64_t m, int64_t n, int64_t k,
                        const double *a, int64_t lda, const double *b, int64_t ldb,
                        double beta, double *c, int64_t ldc) noexcept nogil:
    _mkl_dgemm(CBLAS_ROW_MAJOR, _tr(ta), _tr(tb), <int32_t>m, <int32_t>n, <int32_t>k,
               1.0, a, <int32_t>lda, b, <int32_t>ldb, beta, c, <int32_t>ldc)


cdef void _npy_gemm_f32(int ta, int tb, int64_t m, int64_t n, int64_t k,
                        const float *a, int64_t lda, const float *b, int64_t ldb,
                        float beta, float *c, int64_t ldc) noexcept nogil:
    _npy_sgemm(CBLAS_ROW_MAJOR, _tr(ta), _tr(tb), m, n, k, 1.0, a, lda, b, ldb, beta, c, ldc)


cdef void _npy_gemm_f64(int ta, int tb, int64_t m, int64_t n, int64_t k,
                        const double *a, int64_t lda, const double *b, int64_t ldb,
                        double beta, double *c, int64_t ldc) noexcept nogil:
    _npy_dgemm(CBLAS_ROW_MAJOR, _tr(ta), _tr(tb), m, n, k, 1.0, a, lda, b, ldb, beta, c, ldc)


cdef extern from "parallel.h" nogil:
    ctypedef void (*fo_chunk_fn)(void *ctx, int64_t tensor, int64_t begin,
                                 int64_t end) noexcept nogil
    void fo_parallel_foreach_grain(const int64_t *numel, int64_t ntensors, fo_chunk_fn body,
                                   void *ctx, int64_t grain)


cdef void _dnnl_gemm_f32(int ta, int tb, int64_t m, int64_t n, int64_t k,
                         const float *a, int64_t lda, const float *b, int64_t ldb,
                         float beta, float *c, int64_t ldc) noexcept nogil:
    _dnnl_sgemm(b'T' if ta else b'N', b'T' if tb else b'N', m, n, k, 1.0, a, lda, b, ldb,
                beta, c, ldc)


# Every library runs single-threaded during a call of fastopt's, and large
# products split over fastopt's threads instead: by rows or columns of C into
# pieces that depend on the shape only, one call each with all of K, also at
# 1 thread, so that results do not depend on the thread count. Left to their
# own threads, MKL and oneDNN split some products over K (MKL: 22 of 240
# random shapes gave other bits at 2 threads than at 1, and a fifth of an LSTM
# T50 B32's input-weight gradient; oneDNN: products of few rows and columns
# and a long K, (1 x 34697) @ (34697 x 29)); and the bits of OpenBLAS's,
# oneDNN's and MKL's kernels depend on where a piece starts (under qemu as a
# Haswell for all three; here too for oneDNN's "NT" products), so one piece
# per thread would not do either. 4 pieces when each gets 256 rows or columns,
# else 2 (of 64 at least): each piece packs the other operand again, which
# costs more the narrower the pieces (oneDNN, 1 thread, (64 x 2048) @ (2048 x
# 256): 1.36x the time of one call in 4 pieces of 64 columns, 1.10x in 2),
# and 2 or 4 pieces share evenly between 2 threads. Against oneDNN's own
# threads (and OpenBLAS's earlier 4 pieces of 64 and more), LSTM and GRU
# T50 B32 I128 H256 and cells B64 I256 H512, forward+backward, took 0.97-1.02x
# the time with oneDNN and 0.95-1.02x with scipy's, at 1 and 2 threads
# (interleaved, medians; 4 pieces of 64 and more: cells 1.07x). OpenBLAS has
# a further reason: its own pthreads pool spins for ~2^28 cycles (~70 ms here)
# after every call, and between fastopt's OpenMP kernels those threads took
# the cores from them (LSTM forward+backward at 2 threads: 123 ms, against
# 30 ms at 1 thread); and oneDNN's own two threads ran (64 x 512) @
# (512 x 2048)^T at 90 GFLOP/s, its pieces over fastopt's two at 274.
cdef enum:
    _SPLIT_MIN = 64                    # rows or columns of C per piece at least
    _FOUR_PIECES_MIN = 256             # per piece, for 4 pieces; else 2
    _PIECE_UNITS = 16                  # a piece's units in the threads' split
    _SPLIT_MIN_MULS = 1 << 21          # m*n*k below this: one call


cdef struct _OpenBLAS:      # one of the two OpenBLAS libraries
    set_threads_fn set_threads  # openblas_set_num_threads_local; NULL: not found, no split
    int users                   # fastopt calls in flight that hold its count at 1
    int saved                   # the count they put back, when the last one ends

# 0: scipy's (cython_blas), 1: NumPy's (its ILP64 CBLAS, once loaded)
cdef _OpenBLAS _openblas[2]
_openblas[0].set_threads = NULL
_openblas[0].users = 0
_openblas[1].set_threads = NULL
_openblas[1].users = 0
# guards users/saved: layers run from several Python threads at once
cdef PyThread_type_lock _openblas_lock = PyThread_allocate_lock()


cdef int _dnnl_set_threads(int n) noexcept nogil:
    # dnnl threads with omp_get_max_threads() of the calling thread
    cdef int previous = _omp_get_max_threads()
    _omp_set_num_threads(n)
    return previous


cdef struct _Provider:
    fo_gemm_f32_fn one32            # one product in one call of the library
    fo_gemm_f64_fn one64
    set_threads_fn set_threads      # its own count (NULL: cannot be set from here)
    _OpenBLAS *ob32                 # the OpenBLAS behind its float32 products, or NULL
    _OpenBLAS *ob64                 # and behind its float64 ones

# index: 0 scipy, 1 numpy, 2 mkl, 3 dnnl
cdef _Provider _providers[4]
_providers[0].one32 = _scipy_gemm_f32
_providers[0].one64 = _scipy_gemm_f64
_providers[0].set_threads = NULL
_providers[0].ob32 = _providers[0].ob64 = &_openblas[0]
_providers[1].ob32 = _providers[1].ob64 = &_openblas[1]
_providers[2].ob32 = _providers[2].ob64 = NULL
_providers[3].ob32 = NULL
_providers[3].ob64 = &_openblas[0]   # oneDNN has no float64 GEMM
_providers[1].one32 = NULL
_providers[2].one32 = NULL
_providers[3].one32 = NULL
_PROVIDER_INDEX = {"scipy": 0, "numpy": 1, "mkl": 2, "dnnl": 3}
cdef _Provider *_current = &_providers[0]
cdef str _blas_name = "scipy"


cdef struct _Product:   # c = op(a) op(b) + beta*c, in pieces
    fo_gemm_f32_fn one32    # one call of the library, on the calling thread
    fo_gemm_f64_fn one64
    set_threads_fn set_own  # the library's count on each thread that runs pieces, or NULL
    bint f64, by_rows
    int ta, tb
    int64_t m, n, k, lda, ldb, ldc, isz
    int64_t span, pieces    # rows (by_rows) or columns of c, and the pieces they make
    const char *a
    const char *b
    char *c
    double beta


cdef void _product_part(_Product *j, int64_t lo, int64_t hi) noexcept nogil:
    """Rows (by_rows) or columns [lo, hi) of c, in one call."""
    cdef int64_t m = j.m, n = j.n
    cdef const char *a = j.a
    cdef const char *b = j.b
    cdef char *c = j.c
    if j.by_rows:
        m = hi - lo
        a += (lo if j.ta else lo * j.lda) * j.isz
        c += lo * j.ldc * j.isz
    else:
        n = hi - lo
        b += (lo * j.ldb if j.tb else lo) * j.isz
        c += lo * j.isz
    if j.f64:
        j.one64(j.ta, j.tb, m, n, j.k, <const double *>a, j.lda, <const double *>b, j.ldb,
                j.beta, <double *>c, j.ldc)
    else:
        j.one32(j.ta, j.tb, m, n, j.k, <const float *>a, j.lda, <const float *>b, j.ldb,
                <float>j.beta, <float *>c, j.ldc)


cdef void _product_pieces(void *ctx, int64_t unused, int64_t lo, int64_t hi) noexcept nogil:
    """Pieces [lo, hi) / _PIECE_UNITS of the call's j.pieces, each in its own call."""
    cdef _Product *j = <_Product *>ctx
    cdef int64_t p
    # one thread on this thread too: MKL's count is per thread, and with
    # MKL_DYNAMIC=FALSE a worker's MKL split K (36 of 240 random products
    # differed between 1 and 2 threads)
    cdef int saved = j.set_own(1) if j.set_own != NULL else -1
    for p in range(lo // _PIECE_UNITS, hi // _PIECE_UNITS):
        _product_part(j, p * j.span // j.pieces, (p + 1) * j.span // j.pieces)
    if saved >= 0:
        j.set_own(saved)


cdef void _split_gemm(bint f64, int ta, int tb, int64_t m, int64_t n, int64_t k,
                      const void *a, int64_t lda, const void *b, int64_t ldb, double beta,
                      void *c, int64_t ldc) noexcept nogil:
    """c = op(a) op(b) + beta*c through the current provider: split over
    fastopt's threads when large and the library's count is held at 1."""
    cdef _Product j
    j.one32 = _current.one32; j.one64 = _current.one64
    j.f64 = f64; j.isz = 8 if f64 else 4
    j.ta = ta; j.tb = tb; j.m = m; j.n = n; j.k = k; j.lda = lda; j.ldb = ldb; j.ldc = ldc
    j.a = <const char *>a; j.b = <const char *>b; j.c = <char *>c; j.beta = beta
    j.by_rows = m >= n
    j.span = m if j.by_rows else n
    j.pieces = (4 if j.span >= 4 * _FOUR_PIECES_MIN else
                2 if j.span >= 2 * _SPLIT_MIN else 1)
    # threads take whole pieces: a piece is _PIECE_UNITS units of the split,
    # whose ranges start at multiples of 16 (parallel.c's FO_ALIGN)
    cdef int64_t units = j.pieces * _PIECE_UNITS
    # pieces need the library single-threaded (its count could be set)
    cdef _OpenBLAS *ob = _current.ob64 if f64 else _current.ob32
    cdef bint held_at_one = ob.set_threads != NULL if ob != NULL else _current.set_threads != NULL
    j.set_own = _current.set_threads if ob == NULL else NULL
    if not held_at_one or j.pieces < 2 or m * n * k < _SPLIT_MIN_MULS:
        _product_part(&j, 0, j.span)
    else:
        fo_parallel_foreach_grain(&units, 1, _product_pieces, &j, _PIECE_UNITS)


cdef void _gemm_f32(int ta, int tb, int64_t m, int64_t n, int64_t k,
                    const float *a, int64_t lda, const float *b, int64_t ldb,
                    float beta, float *c, int64_t ldc) noexcept nogil:
    _split_gemm(False, ta, tb, m, n, k, a, lda, b, ldb, beta, c, ldc)


cdef void _gemm_f64(int ta, int tb, int64_t m, int64_t n, int64_t k,
                    const double *a, int64_t lda, const double *b, int64_t ldb,
                    double beta, double *c, int64_t ldc) noexcept nogil:
    _split_gemm(True, ta, tb, m, n, k, a, lda, b, ldb, beta, c, ldc)


cdef void *_dlopen_checked(str path, bint already_loaded) except NULL:
    cdef bytes bpath = path.encode()
    cdef int flags = RTLD_NOW | RTLD_LOCAL | (RTLD_NOLOAD if already_loaded else 0)
    cdef void *h = dlopen(bpath, flags)
    if h == NULL:
        err = dlerror()
        raise OSError(f"cannot load {path}: {(<bytes>err).decode(errors='replace') if err != NULL else ''}")
    return h


def load_mkl(str path):
    """dlopen libmkl_rt at `path`, select MKL's GNU-OpenMP threading layer (the
    OpenMP runtime fastopt itself uses, so that no second thread pool competes),
    and resolve cblas_sgemm/cblas_dgemm. Raises OSError when that fails."""
    global _mkl_sgemm, _mkl_dgemm
    cdef void *h = _dlopen_checked(path, False)
    cdef set_threads_fn set_layer = <set_threads_fn>dlsym(h, b"MKL_Set_Threading_Layer")
    cdef void *s = dlsym(h, b"cblas_sgemm")
    cdef void *d = dlsym(h, b"cblas_dgemm")
    if set_layer == NULL or s == NULL or d == NULL:
        raise OSError(f"{path} does not export MKL_Set_Threading_Layer and cblas_?gemm")
    set_layer(MKL_THREADING_GNU)
    _mkl_sgemm = <sgemm32_t>s
    _mkl_dgemm = <dgemm32_t>d
    _providers[2].one32 = _mkl_gemm_f32
    _providers[2].one64 = _mkl_gemm_f64
    _providers[2].set_threads = <set_threads_fn>dlsym(h, b"MKL_Set_Num_Threads_Local")


def load_numpy_openblas(str path):
    """Resolve the ILP64 CBLAS GEMMs of the OpenBLAS that NumPy has already
    loaded from `path` (NumPy's wheels: scipy_cblas_?gemm64_)."""
    global _npy_sgemm, _npy_dgemm
    cdef void *h = _dlopen_checked(path, True)
    cdef void *s = dlsym(h, b"scipy_cblas_sgemm64_")
    cdef void *d = dlsym(h, b"scipy_cblas_dgemm64_")
    if s == NULL or d == NULL:
        raise OSError(f"{path} does not export scipy_cblas_sgemm64_/dgemm64_")
    _npy_sgemm = <sgemm64_t>s
    _npy_dgemm = <dgemm64_t>d
    _openblas[1].set_threads = <set_threads_fn>dlsym(h, b"openblas_set_num_threads_local")
    _providers[1].one32 = _npy_gemm_f32
    _providers[1].one64 = _npy_gemm_f64


def load_dnnl(str path):
    """dlopen oneDNN at `path` (a GNU-OpenMP build: onednn-cpu-gomp) and
    resolve dnnl_sgemm. oneDNN has no float64 GEMM: float64 products of this
    provider go to scipy's BLAS. Raises OSError when that fails."""
    global _dnnl_sgemm, _omp_set_num_threads, _omp_get_max_threads
    cdef void *h = _dlopen_checked(path, False)
    cdef void *s = dlsym(h, b"dnnl_sgemm")
    cdef void *oset = dlsym(h, b"omp_set_num_threads")
    cdef void *oget = dlsym(h, b"omp_get_max_threads")
    if s == NULL or oset == NULL or oget == NULL:
        raise OSError(f"{path} is not a GNU-OpenMP oneDNN (dnnl_sgemm, omp_set_num_threads)")
    _dnnl_sgemm = <dnnl_sgemm_t>s
    _omp_set_num_threads = <omp_set_t>oset
    _omp_get_max_threads = <omp_get_t>oget
    _providers[3].one32 = _dnnl_gemm_f32
    _providers[3].one64 = _scipy_gemm_f64
    _providers[3].set_threads = _dnnl_set_threads


def set_blas_provider(str name):
    """Every later product goes to provider `name`: 'scipy', 'numpy', 'dnnl'
    or 'mkl' (once loaded)."""
    global _current, _blas_name
    if name not in _PROVIDER_INDEX:
        raise ValueError(f"blas must be 'scipy', 'numpy', 'dnnl' or 'mkl', got {name!r}")
    if _providers[<int>_PROVIDER_INDEX[name]].one32 == NULL:
        raise ValueError(f"blas {name!r} is not loaded")
    _current = &_providers[<int>_PROVIDER_INDEX[name]]
    _blas_name = name


def blas_provider():
    """The provider in use: 'scipy', 'numpy', 'dnnl' or 'mkl'."""
    return _blas_name


cdef struct _SavedThreads:   # what a call puts back at its end
    set_threads_fn own_set   # the provider's own setter (fastopt.set_blas may switch)
    int own                  # and the count it had (-1: none was set)
    _OpenBLAS *ob            # the OpenBLAS whose count the call holds at 1, or NULL


cdef inline _SavedThreads _blas_threads(bint f64) noexcept nogil:
    # At the start of every call: the library runs single-threaded (see
    # _split_gemm); _blas_threads_restore puts the previous counts back, so
    # that the user's own BLAS calls are unaffected.
    cdef _SavedThreads saved
    saved.own_set = _current.set_threads
    saved.own = saved.own_set(1) if saved.own_set != NULL else -1
    saved.ob = _current.ob64 if f64 else _current.ob32
    if saved.ob != NULL and saved.ob.set_threads == NULL:
        saved.ob = NULL
    if saved.ob != NULL:
        # OpenBLAS's count is process-wide: the first call in flight lowers it
        # and the last one puts it back (each saving its own left it at 1 when
        # calls from two Python threads overlapped)
        PyThread_acquire_lock(_openblas_lock, WAIT_LOCK)
        if saved.ob.users == 0:
            saved.ob.saved = saved.ob.set_threads(1)
        saved.ob.users += 1
        PyThread_release_lock(_openblas_lock)
    return saved


cdef inline void _blas_threads_restore(_SavedThreads saved) noexcept nogil:
    if saved.own >= 0:
        saved.own_set(saved.own)
    if saved.ob != NULL:
        PyThread_acquire_lock(_openblas_lock, WAIT_LOCK)
        saved.ob.users -= 1
        if saved.ob.users == 0:
            saved.ob.set_threads(saved.ob.saved)
        PyThread_release_lock(_openblas_lock)


def gemm(cnp.ndarray c, cnp.ndarray a, cnp.ndarray b, bint trans_a=False,
         bint trans_b=False, double beta=0.0):
    """c = op(a) @ op(b) + beta*c through the selected BLAS (2-D, one dtype, rows
    contiguous, any row stride): what the recurrent layers call, exposed for the
    benchmarks."""
    _check_array(c, "c", None, True, True)
    _check_array(a, "a", c.dtype, False, True)
    _check_array(b, "b", c.dtype, False, True)
    if a.ndim != 2 or b.ndim != 2 or c.ndim != 2:
        raise ValueError("a, b and c must be 2-D")
    cdef int64_t m = a.shape[1] if trans_a else a.shape[0]
    cdef int64_t k = a.shape[0] if trans_a else a.shape[1]
    cdef int64_t kb = b.shape[1] if trans_b else b.shape[0]
    cdef int64_t n = b.shape[0] if trans_b else b.shape[1]
    if k != kb or c.shape[0] != m or c.shape[1] != n:
        raise ValueError(f"shapes do not match: op(a) {m}x{k}, op(b) {kb}x{n}, c {(<object>c).shape}")
    if m == 0 or n == 0:
        return
    cdef int64_t isz = c.itemsize
    cdef int64_t lda = a.strides[0] // isz if a.shape[0] > 1 else a.shape[1]
    cdef int64_t ldb = b.strides[0] // isz if b.shape[0] > 1 else b.shape[1]
    cdef int64_t ldc = c.strides[0] // isz if c.shape[0] > 1 else c.shape[1]
    cdef void *pa = cnp.PyArray_DATA(a)
    cdef void *pb = cnp.PyArray_DATA(b)
    cdef void *pc = cnp.PyArray_DATA(c)
    cdef bint f64 = c.dtype == np.float64
    cdef _SavedThreads saved
    _scipy_blas_ready()
    with nogil:
        saved = _blas_threads(f64)
        if f64:
            _gemm_f64(trans_a, trans_b, m, n, k, <double *>pa, lda, <double *>pb, ldb,
                      beta, <double *>pc, ldc)
        else:
            _gemm_f32(trans_a, trans_b, m, n, k, <float *>pa, lda, <float *>pb, ldb,
                      <float>beta, <float *>pc, ldc)
        _blas_threads_restore(saved)


# ------------------------------------------------------------- the drivers

cdef const void *_ptr(object a, str name, object dtype, int64_t size, bint optional,
                      bint writable) except? NULL:
    """The data pointer of a C-contiguous `dtype` array of `size` elements
    (NULL for None when optional)."""
    if a is None:
        if optional:
            return NULL
        raise ValueError(f"{name} is required")
    _check_array(a, name, dtype, writable)
    if cnp.PyArray_SIZE(<cnp.ndarray>a) != size:
        raise ValueError(f"{name} has {cnp.PyArray_SIZE(<cnp.ndarray>a)} elements, expected {size}")
    return cnp.PyArray_DATA(<cnp.ndarray>a)


cdef int64_t _last_dim(cnp.ndarray a):
    cdef int nd = cnp.PyArray_NDIM(a)
    return cnp.PyArray_DIM(a, nd - 1) if nd else 0


cdef int64_t _dim(object v, str name, int64_t minimum) except -1:
    """A size argument as int64: an integer in [minimum, 2^31) (the BLAS takes
    32-bit sizes), else TypeError/ValueError naming it."""
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise TypeError(f"{name} must be an integer, got {type(v).__name__}")
    if not minimum <= v < 2 ** 31:
        raise ValueError(f"{name} must be in [{minimum}, 2^31-1] (the BLAS's 32-bit sizes), "
                         f"got {v}")
    return <int64_t>v


cdef int _check_layer(fo_rnn_layer *layer, str mode, seq_len, batch, input_size, hidden_size,
                      w_ih, w_hh, b_ih, b_hh, proj_size, w_hr) except -1:
    """Fill `layer` with one layer's checked mode, sizes and weights: the part
    of RnnLayerCall's checks that needs no buffers (check_layer runs it alone)."""
    if mode not in RNN_MODES:
        raise ValueError(f"mode must be one of {sorted(RNN_MODES)}, got {mode!r}")
    cdef int m = RNN_MODES[mode]
    # each size on its own first, so that no product below can wrap around
    # int64 (2^32 * 2^32 would be 0, and empty buffers would pass)
    cdef int64_t T = _dim(seq_len, "seq_len", 0), B = _dim(batch, "batch", 0)
    cdef int64_t I = _dim(input_size, "input_size", 1)
    cdef int64_t H = _dim(hidden_size, "hidden_size", 1)
    cdef int64_t P = _dim(proj_size, "proj_size", 0)
    if P and (m != 2 or not P < H):
        raise ValueError(f"proj_size must be 0, or in [1, hidden_size) for an LSTM, "
                         f"got {P}")
    cdef int64_t G = fo_rnn_num_gates(m)
    # S: the width of h (the projection's with proj_size)
    cdef int64_t S = P if P else H
    # the GEMMs' row counts (T*B) and widths (G*H) are 32-bit too; with every
    # factor below 2^31, every element count below is below 2^62
    if T * B >= 2 ** 31:
        raise ValueError(f"seq_len * batch = {T * B} exceeds the BLAS's 2^31-1 limit")
    if G * H >= 2 ** 31:
        raise ValueError(f"hidden_size: {G} gates * {H} exceeds the BLAS's 2^31-1 limit")
    dtype = w_ih.dtype if isinstance(w_ih, np.ndarray) else None
    if dtype not in (np.float32, np.float64):
        raise TypeError(f"w_ih must be a float32 or float64 ndarray")
    layer.mode = m
    layer.seq_len = T
    layer.batch = B
    layer.input_size = I
    layer.hidden_size = H
    layer.w_ih = _ptr(w_ih, "w_ih", dtype, G * H * I, False, False)
    layer.w_hh = _ptr(w_hh, "w_hh", dtype, G * H * S, False, False)
    layer.proj_size = P
    layer.w_hr = _ptr(w_hr, "w_hr", dtype, S * H, not P, False)
    layer.b_ih = _ptr(b_ih, "b_ih", dtype, G * H, True, False)
    layer.b_hh = _ptr(b_hh, "b_hh", dtype, G * H, True, False)
    if (layer.b_ih == NULL) != (layer.b_hh == NULL):
        raise ValueError("b_ih and b_hh must both be given or both be None")
    return 0


def check_layer(str mode, seq_len, batch, input_size, hidden_size, w_ih, w_hh, b_ih, b_hh,
                proj_size=0, w_hr=None):
    """Raise what RnnLayerCall(...) would for these sizes and weights, without
    buffers: a stack of layers checks every layer before its first one writes."""
    cdef fo_rnn_layer layer
    _check_layer(&layer, mode, seq_len, batch, input_size, hidden_size, w_ih, w_hh,
                 b_ih, b_hh, proj_size, w_hr)


def _rebuilt_rnn_layer_call(bint forwarded, *args):
    """RnnLayerCall(*args) that forward() has run for (RnnLayerCall.__reduce__)."""
    cdef RnnLayerCall call = RnnLayerCall(*args)
    call.forwarded = forwarded
    return call


cdef class RnnLayerCall:
    """The checked arguments of one layer over one sequence: weights, dims and
    the buffers of forward (kept, so that backward reads what forward saved)."""
    cdef fo_rnn_layer layer
    cdef fo_rnn_forward_io fwd
    cdef readonly object dtype
    cdef bint is_f64
    cdef bint forwarded           # forward() has filled the saved buffers
    cdef readonly tuple keep      # references that keep every pointer valid

    def __cinit__(self, str mode, seq_len, batch, input_size, hidden_size, w_ih, w_hh,
                  b_ih, b_hh, x, h0, c0, out, c_all, gates, extra, proj_size=0, w_hr=None):
        _check_layer(&self.layer, mode, seq_len, batch, input_size, hidden_size, w_ih, w_hh,
                     b_ih, b_hh, proj_size, w_hr)
        cdef int m = self.layer.mode
        cdef int64_t G = fo_rnn_num_gates(m), H = self.layer.hidden_size
        cdef int64_t I = self.layer.input_size, P = self.layer.proj_size, S = P if P else H
        cdef int64_t TB = self.layer.seq_len * self.layer.batch
        cdef int64_t BH = self.layer.batch * H, BS = self.layer.batch * S
        dtype = w_ih.dtype
        self.dtype = dtype
        self.is_f64 = dtype == np.float64
        is_lstm, is_gru = m == 2, m >= 3
        self.fwd.x = _ptr(x, "x", dtype, TB * I, False, False)
        self.fwd.h0 = _ptr(h0, "h0", dtype, BS, True, False)
        self.fwd.c0 = _ptr(c0, "c0", dtype, BH, True, False) if is_lstm else NULL
        self.fwd.out = <void *>_ptr(out, "out", dtype, TB * S, False, True)
        self.fwd.c_all = <void *>_ptr(c_all, "c_all", dtype, TB * H, not is_lstm, True)
        self.fwd.gates = <void *>_ptr(gates, "gates", dtype, TB * G * H, False, True)
        self.fwd.extra = <void *>_ptr(extra, "extra", dtype, TB * H,
                                      not (is_gru or P), True)
        # the kernel reads x, h0, c0 and the weights while writing the rest
        _check_no_overlap(
            [("out", out), ("c_all", c_all), ("gates", gates), ("extra", extra)],
            [("x", x), ("h0", h0), ("c0", c0 if is_lstm else None), ("w_ih", w_ih),
             ("w_hh", w_hh), ("b_ih", b_ih), ("b_hh", b_hh), ("w_hr", w_hr)])
        self.keep = (w_ih, w_hh, b_ih, b_hh, x, h0, c0, out, c_all, gates, extra, w_hr)
        self.forwarded = False

    def __reduce__(self):
        # pickle, copy.deepcopy (of a layer between forward and backward): the
        # pointers do not travel, so the copy is checked and built again over
        # the copies of the arrays it keeps, with forward's state
        mode = next(k for k, v in RNN_MODES.items() if v == self.layer.mode)
        return (_rebuilt_rnn_layer_call,
                (self.forwarded, mode, self.layer.seq_len, self.layer.batch,
                 self.layer.input_size, self.layer.hidden_size) + self.keep[:11]
                + (self.layer.proj_size, self.keep[11]))

    def forward(self):
        """Run the layer forward over the sequence, filling out and the saved buffers."""
        cdef int rc
        cdef _SavedThreads saved
        _scipy_blas_ready()
        with nogil:
            saved = _blas_threads(self.is_f64)
            if self.is_f64:
                rc = fo_rnn_forward_f64(&self.layer, &self.fwd, _gemm_f64)
            else:
                rc = fo_rnn_forward_f32(&self.layer, &self.fwd, _gemm_f32)
            _blas_threads_restore(saved)
        _check_rc(rc, "recurrent forward")
        self.forwarded = True

    def backward(self, dout, dh_n, dc_n, dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh,
                 dgates, dgates_hh, dw_hr=None):
        """Backpropagate through the sequence that forward() ran: dx, dh0, dc0
        are written (each may be None: not computed), dw_*/db_* accumulated."""
        cdef fo_rnn_backward_io io
        cdef object dt = self.dtype
        if not self.forwarded:   # the saved buffers would be uninitialised memory
            raise ValueError("backward() needs a matching forward() first")
        cdef int m = self.layer.mode
        cdef int64_t G = fo_rnn_num_gates(m), H = self.layer.hidden_size
        cdef int64_t I = self.layer.input_size
        cdef int64_t P = self.layer.proj_size, S = P if P else H
        cdef int64_t TB = self.layer.seq_len * self.layer.batch, BH = self.layer.batch * H
        cdef int64_t BS = self.layer.batch * S
        io.dout = _ptr(dout, "dout", dt, TB * S, True, False)
        io.dh_n = _ptr(dh_n, "dh_n", dt, BS, True, False)
        io.dc_n = _ptr(dc_n, "dc_n", dt, BH, True, False) if m == 2 else NULL
        io.dx = <void *>_ptr(dx, "dx", dt, TB * I, True, True)
        io.dh0 = <void *>_ptr(dh0, "dh0", dt, BS, True, True)
        io.dc0 = <void *>_ptr(dc0, "dc0", dt, BH, True, True) if m == 2 else NULL
        io.dw_ih = <void *>_ptr(dw_ih, "dw_ih", dt, G * H * I, False, True)
        io.dw_hh = <void *>_ptr(dw_hh, "dw_hh", dt, G * H * S, False, True)
        io.dw_hr = <void *>_ptr(dw_hr, "dw_hr", dt, S * H, not P, True)
        io.db_ih = <void *>_ptr(db_ih, "db_ih", dt, G * H, self.layer.b_ih == NULL, True)
        io.db_hh = <void *>_ptr(db_hh, "db_hh", dt, G * H, self.layer.b_ih == NULL, True)
        # dgates (and dgates_hh): T*B rows of G*H gradients, as many rows as
        # the last axis is long (rnn_dgates_width: padded rows run faster)
        _check_array(dgates, "dgates", dt, True)
        cdef int64_t ldg = _last_dim(dgates)
        if ldg < G * H:
            raise ValueError(f"dgates must have rows of at least G*hidden_size = {G * H} "
                             f"entries (its last axis), got shape {dgates.shape}")
        if m == 3 and isinstance(dgates_hh, np.ndarray) and _last_dim(dgates_hh) != ldg:
            raise ValueError(f"dgates_hh must have dgates' row width {ldg}, "
                             f"got shape {dgates_hh.shape}")
        io.dgates = <void *>_ptr(dgates, "dgates", dt, TB * ldg, False, True)
        io.dgates_hh = <void *>_ptr(dgates_hh, "dgates_hh", dt, TB * ldg, m != 3, True)
        io.ld_dgates = ldg
        # backward reads dout, dh_n, dc_n and everything forward read or saved
        w_ih, w_hh, b_ih, b_hh, x, h0, c0, out, c_all, gates, extra, w_hr = self.keep
        _check_no_overlap(
            [("dx", dx), ("dh0", dh0), ("dc0", dc0 if m == 2 else None), ("dw_ih", dw_ih),
             ("dw_hh", dw_hh), ("dw_hr", dw_hr), ("db_ih", db_ih), ("db_hh", db_hh),
             ("dgates", dgates), ("dgates_hh", dgates_hh)],
            [("dout", dout), ("dh_n", dh_n), ("dc_n", dc_n if m == 2 else None),
             ("w_ih", w_ih), ("w_hh", w_hh), ("b_ih", b_ih), ("b_hh", b_hh), ("w_hr", w_hr),
             ("x", x), ("h0", h0), ("c0", c0 if m == 2 else None), ("out", out),
             ("c_all", c_all), ("gates", gates), ("extra", extra)])
        cdef int rc
        cdef _SavedThreads saved
        _scipy_blas_ready()
        with nogil:
            saved = _blas_threads(self.is_f64)
            if self.is_f64:
                rc = fo_rnn_backward_f64(&self.layer, &self.fwd, &io, _gemm_f64)
            else:
                rc = fo_rnn_backward_f32(&self.layer, &self.fwd, &io, _gemm_f32)
            _blas_threads_restore(saved)
        _check_rc(rc, "recurrent backward")


def _rnn_use_portable(bint on):
    """Testing hook: the steps' recurrent products through the BLAS even where
    fastopt's packed AVX-512 kernel would run them."""
    fo_rnn_use_portable(on)
