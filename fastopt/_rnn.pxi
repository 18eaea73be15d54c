# Recurrent layers: the BLAS that fastopt's own matrix products use, and the
# checked entry points of the sequence drivers in src_c/rnn.c.
#
# The GEMM reaches C as a function pointer (fo_gemm_f32_fn/_f64_fn, row-major).
# Two providers: scipy.linalg.cython_blas (scipy's OpenBLAS, always there) and
# Intel MKL's cblas_?gemm from libmkl_rt, dlopen-ed at run time when the `mkl`
# wheel is installed. The choice is a process-wide setting (set_blas).
from libc.stdint cimport int32_t
from posix.dlfcn cimport dlopen, dlsym, dlerror, RTLD_NOW, RTLD_LOCAL
from scipy.linalg.cython_blas cimport sgemm as _blas_sgemm, dgemm as _blas_dgemm

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
    int fo_rnn_forward_f32(const fo_rnn_layer *layer, const fo_rnn_forward_io *io,
                           fo_gemm_f32_fn gemm)
    int fo_rnn_forward_f64(const fo_rnn_layer *layer, const fo_rnn_forward_io *io,
                           fo_gemm_f64_fn gemm)
    int fo_rnn_backward_f32(const fo_rnn_layer *layer, const fo_rnn_forward_io *saved,
                            const fo_rnn_backward_io *io, fo_gemm_f32_fn gemm)
    int fo_rnn_backward_f64(const fo_rnn_layer *layer, const fo_rnn_forward_io *saved,
                            const fo_rnn_backward_io *io, fo_gemm_f64_fn gemm)
    int fo_rnn_num_gates(int mode)

RNN_MODES = {"rnn_tanh": 0, "rnn_relu": 1, "lstm": 2, "gru": 3, "gru_reset_before": 4}

# ---------------------------------------------------------------- the GEMMs

# scipy's BLAS is Fortran (column-major, 32-bit ints). A row-major product
# C = op(A) op(B) is the column-major C^T = op(B)^T op(A)^T: swap the operands.
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


# MKL's CBLAS (LP64: 32-bit ints), resolved with dlsym.
ctypedef void (*cblas_sgemm_t)(int layout, int ta, int tb, int32_t m, int32_t n, int32_t k,
                               float alpha, const float *a, int32_t lda, const float *b,
                               int32_t ldb, float beta, float *c, int32_t ldc) noexcept nogil
ctypedef void (*cblas_dgemm_t)(int layout, int ta, int tb, int32_t m, int32_t n, int32_t k,
                               double alpha, const double *a, int32_t lda, const double *b,
                               int32_t ldb, double beta, double *c, int32_t ldc) noexcept nogil
ctypedef int (*mkl_int_fn_t)(int) noexcept nogil

cdef cblas_sgemm_t _mkl_sgemm = NULL
cdef cblas_dgemm_t _mkl_dgemm = NULL
cdef mkl_int_fn_t _mkl_set_threads_local = NULL
cdef enum:
    CBLAS_ROW_MAJOR = 101
    CBLAS_NO_TRANS = 111
    CBLAS_TRANS = 112
    MKL_THREADING_GNU = 3       # MKL's threads are libgomp's: the runtime fastopt uses


cdef void _mkl_gemm_f32(int ta, int tb, int64_t m, int64_t n, int64_t k,
                        const float *a, int64_t lda, const float *b, int64_t ldb,
                        float beta, float *c, int64_t ldc) noexcept nogil:
    _mkl_sgemm(CBLAS_ROW_MAJOR, CBLAS_TRANS if ta else CBLAS_NO_TRANS,
               CBLAS_TRANS if tb else CBLAS_NO_TRANS, <int32_t>m, <int32_t>n, <int32_t>k,
               1.0, a, <int32_t>lda, b, <int32_t>ldb, beta, c, <int32_t>ldc)


cdef void _mkl_gemm_f64(int ta, int tb, int64_t m, int64_t n, int64_t k,
                        const double *a, int64_t lda, const double *b, int64_t ldb,
                        double beta, double *c, int64_t ldc) noexcept nogil:
    _mkl_dgemm(CBLAS_ROW_MAJOR, CBLAS_TRANS if ta else CBLAS_NO_TRANS,
               CBLAS_TRANS if tb else CBLAS_NO_TRANS, <int32_t>m, <int32_t>n, <int32_t>k,
               1.0, a, <int32_t>lda, b, <int32_t>ldb, beta, c, <int32_t>ldc)


cdef fo_gemm_f32_fn _gemm_f32 = _scipy_gemm_f32
cdef fo_gemm_f64_fn _gemm_f64 = _scipy_gemm_f64
cdef str _blas_name = "scipy"


def load_mkl(str path):
    """dlopen libmkl_rt at `path`, select MKL's GNU-OpenMP threading layer (the
    OpenMP runtime fastopt itself uses, so that no second thread pool competes),
    and resolve cblas_sgemm/cblas_dgemm. Raises OSError when that fails."""
    global _mkl_sgemm, _mkl_dgemm, _mkl_set_threads_local
    cdef bytes bpath = path.encode()
    cdef void *h = dlopen(bpath, RTLD_NOW | RTLD_LOCAL)
    if h == NULL:
        raise OSError(f"cannot load {path}: {(<bytes>dlerror()).decode(errors='replace')}")
    cdef mkl_int_fn_t set_layer = <mkl_int_fn_t>dlsym(h, b"MKL_Set_Threading_Layer")
    cdef void *s = dlsym(h, b"cblas_sgemm")
    cdef void *d = dlsym(h, b"cblas_dgemm")
    if set_layer == NULL or s == NULL or d == NULL:
        raise OSError(f"{path} does not export MKL_Set_Threading_Layer and cblas_?gemm")
    set_layer(MKL_THREADING_GNU)
    _mkl_sgemm = <cblas_sgemm_t>s
    _mkl_dgemm = <cblas_dgemm_t>d
    _mkl_set_threads_local = <mkl_int_fn_t>dlsym(h, b"MKL_Set_Num_Threads_Local")


def set_blas_provider(str name):
    """'scipy' or 'mkl' (after load_mkl) for every later recurrent-layer call."""
    global _gemm_f32, _gemm_f64, _blas_name
    if name == "scipy":
        _gemm_f32, _gemm_f64 = _scipy_gemm_f32, _scipy_gemm_f64
    elif name == "mkl":
        if _mkl_sgemm == NULL:
            raise ValueError("blas 'mkl' is not loaded (load_mkl first)")
        _gemm_f32, _gemm_f64 = _mkl_gemm_f32, _mkl_gemm_f64
    else:
        raise ValueError(f"blas must be 'scipy' or 'mkl', got {name!r}")
    _blas_name = name


def blas_provider():
    return _blas_name


cdef inline void _mkl_threads(int n) noexcept nogil:
    # MKL follows fastopt's thread count (thread-local setting, cheap)
    if _gemm_f32 == _mkl_gemm_f32 and _mkl_set_threads_local != NULL:
        _mkl_set_threads_local(n)


def gemm(cnp.ndarray c, cnp.ndarray a, cnp.ndarray b, bint trans_a=False,
         bint trans_b=False, double beta=0.0):
    """c = op(a) @ op(b) + beta*c through the selected BLAS (2-D, C-contiguous,
    one dtype): what the recurrent layers call, exposed for the benchmarks."""
    _check_array(c, "c", None, True)
    _check_array(a, "a", c.dtype, False)
    _check_array(b, "b", c.dtype, False)
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
    cdef int64_t lda = a.shape[1], ldb = b.shape[1]
    cdef void *pa = cnp.PyArray_DATA(a)
    cdef void *pb = cnp.PyArray_DATA(b)
    cdef void *pc = cnp.PyArray_DATA(c)
    cdef bint f64 = c.dtype == np.float64
    with nogil:
        _mkl_threads(fo_get_num_threads())
        if f64:
            _gemm_f64(trans_a, trans_b, m, n, k, <double *>pa, lda, <double *>pb, ldb,
                      beta, <double *>pc, n)
        else:
            _gemm_f32(trans_a, trans_b, m, n, k, <float *>pa, lda, <float *>pb, ldb,
                      <float>beta, <float *>pc, n)


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


cdef class RnnLayerCall:
    """The checked arguments of one layer over one sequence: weights, dims and
    the buffers of forward (kept, so that backward reads what forward saved)."""
    cdef fo_rnn_layer layer
    cdef fo_rnn_forward_io fwd
    cdef readonly object dtype
    cdef bint is_f64
    cdef readonly tuple keep      # references that keep every pointer valid

    def __cinit__(self, str mode, int64_t seq_len, int64_t batch, int64_t input_size,
                  int64_t hidden_size, w_ih, w_hh, b_ih, b_hh, x, h0, c0, out, c_all,
                  gates, extra):
        if mode not in RNN_MODES:
            raise ValueError(f"mode must be one of {sorted(RNN_MODES)}, got {mode!r}")
        if seq_len < 0 or batch < 0 or input_size < 1 or hidden_size < 1:
            raise ValueError("need seq_len >= 0, batch >= 0, input_size >= 1, hidden_size >= 1")
        cdef int m = RNN_MODES[mode]
        cdef int64_t G = fo_rnn_num_gates(m), H = hidden_size, I = input_size
        cdef int64_t TB = seq_len * batch, BH = batch * H
        # the BLAS takes 32-bit sizes: every dimension and leading dimension must fit
        if max(TB, G * H, I) >= 2 ** 31:
            raise ValueError("a dimension of this layer exceeds the BLAS's 2^31-1 limit")
        dtype = w_ih.dtype if isinstance(w_ih, np.ndarray) else None
        if dtype not in (np.float32, np.float64):
            raise TypeError(f"w_ih must be a float32 or float64 ndarray")
        self.dtype = dtype
        self.is_f64 = dtype == np.float64
        self.layer.mode = m
        self.layer.seq_len = seq_len
        self.layer.batch = batch
        self.layer.input_size = I
        self.layer.hidden_size = H
        self.layer.w_ih = _ptr(w_ih, "w_ih", dtype, G * H * I, False, False)
        self.layer.w_hh = _ptr(w_hh, "w_hh", dtype, G * H * H, False, False)
        self.layer.b_ih = _ptr(b_ih, "b_ih", dtype, G * H, True, False)
        self.layer.b_hh = _ptr(b_hh, "b_hh", dtype, G * H, True, False)
        if (self.layer.b_ih == NULL) != (self.layer.b_hh == NULL):
            raise ValueError("b_ih and b_hh must both be given or both be None")
        is_lstm, is_gru = m == 2, m >= 3
        self.fwd.x = _ptr(x, "x", dtype, TB * I, False, False)
        self.fwd.h0 = _ptr(h0, "h0", dtype, BH, True, False)
        self.fwd.c0 = _ptr(c0, "c0", dtype, BH, True, False) if is_lstm else NULL
        self.fwd.out = <void *>_ptr(out, "out", dtype, TB * H, False, True)
        self.fwd.c_all = <void *>_ptr(c_all, "c_all", dtype, TB * H, not is_lstm, True)
        self.fwd.gates = <void *>_ptr(gates, "gates", dtype, TB * G * H, False, True)
        self.fwd.extra = <void *>_ptr(extra, "extra", dtype, TB * H, not is_gru, True)
        self.keep = (w_ih, w_hh, b_ih, b_hh, x, h0, c0, out, c_all, gates, extra)

    def forward(self):
        """Run the layer forward over the sequence, filling out and the saved buffers."""
        cdef int rc
        with nogil:
            _mkl_threads(fo_get_num_threads())
            if self.is_f64:
                rc = fo_rnn_forward_f64(&self.layer, &self.fwd, _gemm_f64)
            else:
                rc = fo_rnn_forward_f32(&self.layer, &self.fwd, _gemm_f32)
        if rc != 0:
            raise MemoryError("fastopt recurrent forward: out of memory")

    def backward(self, dout, dh_n, dc_n, dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh,
                 dgates, dgates_hh):
        """Backpropagate through the sequence that forward() ran: dx, dh0, dc0
        are written (each may be None: not computed), dw_*/db_* accumulated."""
        cdef fo_rnn_backward_io io
        cdef object dt = self.dtype
        cdef int m = self.layer.mode
        cdef int64_t G = fo_rnn_num_gates(m), H = self.layer.hidden_size
        cdef int64_t I = self.layer.input_size
        cdef int64_t TB = self.layer.seq_len * self.layer.batch, BH = self.layer.batch * H
        io.dout = _ptr(dout, "dout", dt, TB * H, True, False)
        io.dh_n = _ptr(dh_n, "dh_n", dt, BH, True, False)
        io.dc_n = _ptr(dc_n, "dc_n", dt, BH, True, False) if m == 2 else NULL
        io.dx = <void *>_ptr(dx, "dx", dt, TB * I, True, True)
        io.dh0 = <void *>_ptr(dh0, "dh0", dt, BH, True, True)
        io.dc0 = <void *>_ptr(dc0, "dc0", dt, BH, True, True) if m == 2 else NULL
        io.dw_ih = <void *>_ptr(dw_ih, "dw_ih", dt, G * H * I, False, True)
        io.dw_hh = <void *>_ptr(dw_hh, "dw_hh", dt, G * H * H, False, True)
        io.db_ih = <void *>_ptr(db_ih, "db_ih", dt, G * H, self.layer.b_ih == NULL, True)
        io.db_hh = <void *>_ptr(db_hh, "db_hh", dt, G * H, self.layer.b_ih == NULL, True)
        io.dgates = <void *>_ptr(dgates, "dgates", dt, TB * G * H, False, True)
        io.dgates_hh = <void *>_ptr(dgates_hh, "dgates_hh", dt, TB * G * H, m != 3, True)
        cdef int rc
        with nogil:
            _mkl_threads(fo_get_num_threads())
            if self.is_f64:
                rc = fo_rnn_backward_f64(&self.layer, &self.fwd, &io, _gemm_f64)
            else:
                rc = fo_rnn_backward_f32(&self.layer, &self.fwd, &io, _gemm_f32)
        if rc != 0:
            raise MemoryError("fastopt recurrent backward: out of memory")
