# Optimizer bindings: a TensorTable holds the pointer table of a list of
# arrays (built and checked once, when an optimizer creates its state); each
# step checks only the new gradients, then makes one multi-tensor C call.

cdef extern from "fastopt.h" nogil:
    ctypedef struct fo_sgd_args:
        double lr, momentum, dampening, weight_decay, l1
        int nesterov, maximize, first_step
    ctypedef struct fo_adagrad_args:
        double lr, lr_decay, weight_decay, eps, l1
        int maximize
        int64_t step
    ctypedef struct fo_rmsprop_args:
        double lr, alpha, eps, weight_decay, momentum, l1
        int centered, nesterov, maximize
    ctypedef struct fo_adam_args:
        double lr, beta1, beta2, eps, weight_decay, l1
        int amsgrad, maximize, decoupled
        int64_t step

    void fo_sgd_step_f32(float **param, float **momentum_buffer, const float **grad,
                         const int64_t *numel, int64_t ntensors, const fo_sgd_args *a)
    void fo_sgd_step_f64(double **param, double **momentum_buffer, const double **grad,
                         const int64_t *numel, int64_t ntensors, const fo_sgd_args *a)
    void fo_adagrad_step_f32(float **param, float **sum, const float **grad,
                             const int64_t *numel, int64_t ntensors, const fo_adagrad_args *a)
    void fo_adagrad_step_f64(double **param, double **sum, const double **grad,
                             const int64_t *numel, int64_t ntensors, const fo_adagrad_args *a)
    void fo_rmsprop_step_f32(float **param, float **square_avg, float **grad_avg,
                             float **momentum_buffer, const float **grad,
                             const int64_t *numel, int64_t ntensors, const fo_rmsprop_args *a)
    void fo_rmsprop_step_f64(double **param, double **square_avg, double **grad_avg,
                             double **momentum_buffer, const double **grad,
                             const int64_t *numel, int64_t ntensors, const fo_rmsprop_args *a)
    void fo_adam_step_f32(float **param, float **exp_avg, float **exp_avg_sq,
                          float **max_exp_avg_sq, const float **grad,
                          const int64_t *numel, int64_t ntensors, const fo_adam_args *a)
    void fo_adam_step_f64(double **param, double **exp_avg, double **exp_avg_sq,
                          double **max_exp_avg_sq, const double **grad,
                          const int64_t *numel, int64_t ntensors, const fo_adam_args *a)


cdef class TensorTable:
    """The pointer table of a list of same-dtype, C-contiguous, writeable arrays.

    Holds references to the arrays, so the pointers stay valid while it lives.
    `shapes_of` (another TensorTable) requires the same shape, tensor by tensor.
    """
    cdef readonly tuple arrays
    cdef readonly object dtype
    cdef void **ptr
    cdef int64_t *numel
    cdef readonly Py_ssize_t n
    cdef readonly bint is_f64
    cdef int type_num

    def __cinit__(self, arrays, str name, TensorTable shapes_of=None):
        self.arrays = tuple(arrays)
        self.n = len(self.arrays)
        self.dtype = None
        for i, a in enumerate(self.arrays):
            _check_array(a, f"{name}[{i}]", self.dtype, True)
            if self.dtype is None:
                self.dtype = a.dtype
            if shapes_of is not None and a.shape != shapes_of.arrays[i].shape:
                raise ValueError(f"{name}[{i}] has shape {a.shape}, expected "
                                 f"{shapes_of.arrays[i].shape}")
        if shapes_of is not None and (self.n != shapes_of.n or
                                      (self.n and self.dtype != shapes_of.dtype)):
            raise ValueError(f"{name} must match the params in length and dtype")
        self.is_f64 = self.dtype == np.float64
        self.type_num = cnp.NPY_FLOAT64 if self.is_f64 else cnp.NPY_FLOAT32
        self.ptr = <void **>malloc(max(self.n, 1) * sizeof(void *))
        self.numel = <int64_t *>malloc(max(self.n, 1) * sizeof(int64_t))
        if self.ptr == NULL or self.numel == NULL:
            raise MemoryError()
        cdef cnp.ndarray arr
        for i in range(self.n):
            arr = self.arrays[i]
            self.ptr[i] = cnp.PyArray_DATA(arr)
            self.numel[i] = cnp.PyArray_SIZE(arr)

    def __dealloc__(self):
        free(self.ptr)
        free(self.numel)


cdef void **_null_or(TensorTable t):
    return NULL if t is None else t.ptr


cdef class ParamIndex:
    """The byte ranges of all the params of an optimizer, sorted by address
    (params never overlap each other): whether a gradient overlaps any param
    (which the step would change while reading the gradient) in O(log n)."""
    cdef Py_ssize_t n
    cdef char **lo
    cdef char **hi
    cdef readonly Py_ssize_t total   # params in all the tables, empty ones included

    def __cinit__(self, tables):
        ranges = []
        cdef cnp.ndarray a
        self.total = 0
        for t in tables:
            self.total += (<TensorTable?>t).n
            for a in (<TensorTable?>t).arrays:
                if cnp.PyArray_NBYTES(a):
                    ranges.append((<size_t>cnp.PyArray_DATA(a), cnp.PyArray_NBYTES(a)))
        ranges.sort()
        self.n = len(ranges)
        self.lo = <char **>malloc(max(self.n, 1) * sizeof(char *))
        self.hi = <char **>malloc(max(self.n, 1) * sizeof(char *))
        if self.lo == NULL or self.hi == NULL:
            raise MemoryError()
        cdef Py_ssize_t i
        for i in range(self.n):
            self.lo[i] = <char *><size_t>ranges[i][0]
            self.hi[i] = self.lo[i] + <Py_ssize_t>ranges[i][1]

    def __dealloc__(self):
        free(self.lo)
        free(self.hi)

    cdef bint hits(self, cnp.ndarray g):
        """True when g's bytes intersect a param's."""
        cdef char *s = <char *>cnp.PyArray_DATA(g)
        cdef char *e = s + cnp.PyArray_NBYTES(g)
        if s == e:
            return False
        # the last range starting before e is the only candidate (ranges are disjoint)
        cdef Py_ssize_t a = 0, b = self.n, m
        while a < b:
            m = (a + b) // 2
            if self.lo[m] < e:
                a = m + 1
            else:
                b = m
        return a > 0 and self.hi[a - 1] > s


cdef class GradTable:
    """The checked pointer table of one step's gradients for one params table
    (freed with the object). Holds the gradient arrays, so that a gradient
    converted from a list or a buffer lives as long as its pointer."""
    cdef void **ptr
    cdef readonly TensorTable params
    cdef readonly tuple arrays

    def __dealloc__(self):
        free(self.ptr)


def check_grads(TensorTable params not None, object grads, ParamIndex index=None,
                Py_ssize_t first=0, object listed=None, Py_ssize_t group=0):
    """Check grads against params (length, dtype, shape, contiguity; no overlap
    with any param of `index`, or with its own param without one) and that
    every param is still writeable; raises before anything is written.
    Messages number the grads from `first` (the group's place in a step).
    `listed`, when given (the user-visible param_groups[group]['params']),
    must still be a list of exactly the params."""
    if listed is not None and (type(listed) is not list or len(<list>listed) != params.n
                              or not _same_items(<list>listed, params.arrays)):
        raise ValueError(f"param_groups[{group}]['params'] was changed; params are fixed "
                         "when added (use add_param_group or a new optimizer)")
    if isinstance(grads, (str, bytes, np.ndarray)) or not hasattr(grads, "__len__"):
        raise TypeError(f"grads must be a sequence of arrays, got {type(grads).__name__}")
    cdef Py_ssize_t n = len(grads), i
    if n != params.n:
        raise ValueError(f"grads has {n} arrays, expected {params.n} (one per param)")
    cdef GradTable t = GradTable()
    t.params = params
    t.ptr = <void **>malloc(max(n, 1) * sizeof(void *))
    if t.ptr == NULL:
        raise MemoryError()
    cdef cnp.ndarray g, p
    cdef list held = None     # grads converted to arrays here, kept alive by the table
    for i in range(n):
        obj = grads[i]
        if obj is None:   # torch skips a param whose .grad is None; the table steps every one
            raise TypeError(f"grads[{first + i}] is None: step() takes a gradient for every "
                            "param (leave params that get none out of the optimizer)")
        if not isinstance(obj, cnp.ndarray):   # any buffer or sequence: read, never written
            obj = as_array(obj, f"grads[{first + i}]")
            if held is None:
                held = list(grads)
            held[i] = obj
        if isinstance(obj, MaskedArray):
            raise TypeError(f"grads[{first + i}] is a masked array: pass its data, filled as "
                            "you need")
        g = <cnp.ndarray>obj
        p = <cnp.ndarray>params.arrays[i]
        # the table holds the param's pointer, element count and dtype as added
        if (cnp.PyArray_TYPE(p) != params.type_num or cnp.PyArray_SIZE(p) != params.numel[i]
                or not cnp.PyArray_ISNOTSWAPPED(p) or not cnp.PyArray_IS_C_CONTIGUOUS(p)):
            raise ValueError(f"params[{first + i}] has changed dtype, size or layout in place "
                             "since it was added to the optimizer")
        if cnp.PyArray_TYPE(g) != cnp.PyArray_TYPE(p) or not cnp.PyArray_ISNOTSWAPPED(g):
            raise TypeError(f"grads[{first + i}] has dtype {(<object>g).dtype}, expected {(<object>p).dtype} "
                            "(no implicit casts)")
        if not _same_shape(g, p):
            raise ValueError(f"grads[{first + i}] has shape {(<object>g).shape}, expected "
                             f"{(<object>p).shape}")
        if not cnp.PyArray_IS_C_CONTIGUOUS(g):
            raise ValueError(f"grads[{first + i}] must be C-contiguous")
        if not cnp.PyArray_ISALIGNED(g):
            raise ValueError(f"grads[{first + i}] must be aligned to its element size")
        if (index.hits(g) if index is not None else _overlap(g, p)):
            raise ValueError(f"grads[{first + i}] shares memory with a param, which the step "
                             "would change while reading it")
        if not cnp.PyArray_ISWRITEABLE(p):
            raise ValueError(f"params[{first + i}] has become read-only but is updated in place")
        t.ptr[i] = cnp.PyArray_DATA(g)
    t.arrays = tuple(held if held is not None else grads)
    return t


cdef bint _same_items(list a, tuple b):
    """a holds exactly the objects of b, in order (identity; same length)."""
    cdef Py_ssize_t i
    for i in range(len(b)):
        if a[i] is not b[i]:
            return False
    return True


cdef int _check_tables(TensorTable params, GradTable g, tables) except -1:
    """Before a step call: g was checked for params, and each (table, name,
    required) state table is present when required and matches params in
    count, dtype and sizes (the C kernel trusts all of them)."""
    if params is None:
        raise TypeError("params must be a TensorTable")
    if g is None or g.params is not params:
        raise ValueError("g must be check_grads(params, ...) for these params")
    cdef TensorTable t
    cdef Py_ssize_t i
    for obj, name, required in tables:
        if obj is None:
            if required:
                raise ValueError(f"{name} is required with these options")
            continue
        t = <TensorTable?>obj
        if t.n != params.n or (t.n and t.dtype != params.dtype):
            raise ValueError(f"{name} must match the params in length and dtype")
        for i in range(t.n):
            if t.numel[i] != params.numel[i]:
                raise ValueError(f"{name}[{i}] has {t.numel[i]} elements, expected "
                                 f"{params.numel[i]}")
    return 0


def sgd_step(TensorTable params, GradTable g, TensorTable momentum_buffer,
             double lr, double momentum, double dampening, double weight_decay,
             double l1, bint nesterov, bint maximize, bint first_step):
    """One SGD step over a whole group (momentum_buffer None when momentum == 0)."""
    _check_tables(params, g, ((momentum_buffer, "momentum_buffer", momentum != 0),))
    cdef fo_sgd_args a
    a.lr = lr; a.momentum = momentum; a.dampening = dampening
    a.weight_decay = weight_decay; a.l1 = l1
    a.nesterov = nesterov; a.maximize = maximize; a.first_step = first_step
    cdef void **b = _null_or(momentum_buffer)
    with nogil:
        if params.is_f64:
            fo_sgd_step_f64(<double **>params.ptr, <double **>b, <const double **>g.ptr,
                            params.numel, params.n, &a)
        else:
            fo_sgd_step_f32(<float **>params.ptr, <float **>b, <const float **>g.ptr,
                            params.numel, params.n, &a)


def adagrad_step(TensorTable params, GradTable g, TensorTable state_sum,
                 double lr, double lr_decay, double weight_decay, double eps,
                 double l1, bint maximize, int64_t step):
    """One Adagrad step over a whole group."""
    _check_tables(params, g, ((state_sum, "state_sum", True),))
    cdef fo_adagrad_args a
    a.lr = lr; a.lr_decay = lr_decay; a.weight_decay = weight_decay; a.eps = eps
    a.l1 = l1; a.maximize = maximize; a.step = step
    with nogil:
        if params.is_f64:
            fo_adagrad_step_f64(<double **>params.ptr, <double **>state_sum.ptr,
                                <const double **>g.ptr, params.numel, params.n, &a)
        else:
            fo_adagrad_step_f32(<float **>params.ptr, <float **>state_sum.ptr,
                                <const float **>g.ptr, params.numel, params.n, &a)


def rmsprop_step(TensorTable params, GradTable g, TensorTable square_avg,
                 TensorTable grad_avg, TensorTable momentum_buffer,
                 double lr, double alpha, double eps, double weight_decay,
                 double momentum, double l1, bint centered, bint nesterov,
                 bint maximize):
    """One RMSprop step over a whole group (grad_avg None unless centered,
    momentum_buffer None unless momentum > 0)."""
    _check_tables(params, g, ((square_avg, "square_avg", True),
                              (grad_avg, "grad_avg", centered),
                              (momentum_buffer, "momentum_buffer", momentum > 0)))
    cdef fo_rmsprop_args a
    a.lr = lr; a.alpha = alpha; a.eps = eps; a.weight_decay = weight_decay
    a.momentum = momentum; a.l1 = l1; a.centered = centered; a.nesterov = nesterov
    a.maximize = maximize
    cdef void **ga = _null_or(grad_avg)
    cdef void **b = _null_or(momentum_buffer)
    with nogil:
        if params.is_f64:
            fo_rmsprop_step_f64(<double **>params.ptr, <double **>square_avg.ptr,
                                <double **>ga, <double **>b, <const double **>g.ptr,
                                params.numel, params.n, &a)
        else:
            fo_rmsprop_step_f32(<float **>params.ptr, <float **>square_avg.ptr,
                                <float **>ga, <float **>b, <const float **>g.ptr,
                                params.numel, params.n, &a)


def adam_step(TensorTable params, GradTable g, TensorTable exp_avg, TensorTable exp_avg_sq,
              TensorTable max_exp_avg_sq, double lr, double beta1, double beta2,
              double eps, double weight_decay, double l1, bint amsgrad,
              bint maximize, bint decoupled, int64_t step):
    """One Adam (decoupled=False) or AdamW (decoupled=True) step over a whole
    group (max_exp_avg_sq None unless amsgrad)."""
    _check_tables(params, g, ((exp_avg, "exp_avg", True), (exp_avg_sq, "exp_avg_sq", True),
                              (max_exp_avg_sq, "max_exp_avg_sq", amsgrad)))
    cdef fo_adam_args a
    a.lr = lr; a.beta1 = beta1; a.beta2 = beta2; a.eps = eps
    a.weight_decay = weight_decay; a.l1 = l1; a.amsgrad = amsgrad
    a.maximize = maximize; a.decoupled = decoupled; a.step = step
    cdef void **vmax = _null_or(max_exp_avg_sq)
    with nogil:
        if params.is_f64:
            fo_adam_step_f64(<double **>params.ptr, <double **>exp_avg.ptr,
                             <double **>exp_avg_sq.ptr, <double **>vmax,
                             <const double **>g.ptr, params.numel, params.n, &a)
        else:
            fo_adam_step_f32(<float **>params.ptr, <float **>exp_avg.ptr,
                             <float **>exp_avg_sq.ptr, <float **>vmax,
                             <const float **>g.ptr, params.numel, params.n, &a)


cdef extern from "parallel.h" nogil:
    int fo_prefetch_pages()


def _page_prefetch():
    """Testing hook: whether the optimizer loops prefetch one page ahead in
    this process (Intel CPUs, or FASTOPT_PAGE_PREFETCH=1)."""
    return bool(fo_prefetch_pages())
