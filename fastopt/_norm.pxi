# Batch-norm bindings: check every buffer (dtype, shape, contiguity,
# writability, overlap) and hyperparameter, then one C call without the GIL.

cdef extern from "fastopt.h" nogil:
    ctypedef struct fo_batchnorm_args:
        double eps, momentum
        int training
    ctypedef struct fo_batchnorm_backward_args:
        int training, accumulate

    int fo_batchnorm_forward_f32(float *y, float *save_mean, float *save_invstd,
                                 float *running_mean, float *running_var, const float *x,
                                 const float *weight, const float *bias, int64_t outer,
                                 int64_t C, int64_t inner, const fo_batchnorm_args *a)
    int fo_batchnorm_forward_f64(double *y, double *save_mean, double *save_invstd,
                                 double *running_mean, double *running_var, const double *x,
                                 const double *weight, const double *bias, int64_t outer,
                                 int64_t C, int64_t inner, const fo_batchnorm_args *a)
    int fo_batchnorm_backward_f32(float *dx, float *dweight, float *dbias, const float *dy,
                                  const float *x, const float *save_mean,
                                  const float *save_invstd, const float *weight,
                                  int64_t outer, int64_t C, int64_t inner,
                                  const fo_batchnorm_backward_args *a)
    int fo_batchnorm_backward_f64(double *dx, double *dweight, double *dbias, const double *dy,
                                  const double *x, const double *save_mean,
                                  const double *save_invstd, const double *weight,
                                  int64_t outer, int64_t C, int64_t inner,
                                  const fo_batchnorm_backward_args *a)


cdef inline object _shp(object a):
    return a.shape


cdef class _NormShape:
    """x's shape seen as (outer, C, inner); see fastopt.h."""
    cdef int64_t outer, C, inner


cdef _NormShape _norm_shape(cnp.ndarray x, str name, bint channels_last):
    cdef int nd = cnp.PyArray_NDIM(x), d
    if nd < 2:
        raise ValueError(f"{name} must have shape (N, C) or (N, C, *spatial)"
                         f"{' or (N, *spatial, C)' if channels_last else ''}, got {_shp(x)}")
    cdef _NormShape s = _NormShape()
    cdef cnp.npy_intp *dims = cnp.PyArray_DIMS(x)
    s.outer = dims[0]
    s.inner = 1
    if channels_last:
        s.C = dims[nd - 1]
        for d in range(1, nd - 1):
            s.outer *= dims[d]
    else:
        s.C = dims[1]
        for d in range(2, nd):
            s.inner *= dims[d]
    return s


cdef int _check_channel_array(object a, str name, object dtype, int64_t C,
                              bint writable) except -1:
    _check_array(a, name, dtype, writable)
    if cnp.PyArray_NDIM(<cnp.ndarray>a) != 1 or cnp.PyArray_DIMS(<cnp.ndarray>a)[0] != C:
        raise ValueError(f"{name} must have shape ({C},) (one value per channel), got {a.shape}")
    return 0


cdef void *_data_or_null(object a):
    return NULL if a is None else cnp.PyArray_DATA(<cnp.ndarray>a)


cdef int _check_unit_real(double v, str name, bint open_low) except -1:
    if not (v >= 0.0 and v <= 1.0) or (open_low and v == 0.0):
        raise ValueError(f"{name} must be in {'(' if open_low else '['}0, 1], got {v}")
    return 0


def batchnorm_forward(cnp.ndarray x, y, save_mean, save_invstd,
                      running_mean, running_var, weight, bias, *, bint training,
                      double momentum, double eps, bint channels_last):
    """Batch-norm forward (see fastopt.h) into y. training: save_mean and
    save_invstd are required, running_mean/var optional (both or neither);
    eval: running_mean/var are required (only read: they may be read-only),
    save_* optional. y may be x itself (untyped: a non-array is a TypeError
    naming out)."""
    _check_array(x, "x", None, False)
    dt = x.dtype
    cdef _NormShape s = _norm_shape(x, "x", channels_last)
    _check_array(y, "out", dt, True)
    if not _same_shape(<cnp.ndarray>y, x):
        raise ValueError(f"out must have x's shape {_shp(x)}, got {_shp(y)}")
    for name, arr, w in (("save_mean", save_mean, True), ("save_invstd", save_invstd, True),
                       ("running_mean", running_mean, training),
                       ("running_var", running_var, training),
                       ("weight", weight, False), ("bias", bias, False)):
        if arr is not None:
            _check_channel_array(arr, name, dt, s.C, w)
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must both be given or both be None")
    if not eps > 0.0:
        raise ValueError(f"eps must be > 0, got {eps}")
    _check_unit_real(momentum, "momentum", False)
    if training:
        if save_mean is None or save_invstd is None:
            raise ValueError("training needs save_mean and save_invstd buffers")
        if s.outer * s.inner == 1:   # as torch; an empty batch is fine (nothing to do)
            raise ValueError(f"x must have more than 1 value per channel when training, "
                             f"got shape {_shp(x)}")
    elif running_mean is None:
        raise ValueError("eval (training=False) needs running_mean and running_var")
    # training updates the running statistics; eval only reads them
    running = [("running_mean", running_mean), ("running_var", running_var)]
    written = [("out", y if y is not x else None), ("save_mean", save_mean),
               ("save_invstd", save_invstd)] + (running if training else [])
    _check_no_overlap(written, [("x", x), ("weight", weight), ("bias", bias)]
                      + ([] if training else running))
    if y is x:
        _check_no_overlap([("out", y)], [("weight", weight), ("bias", bias)])

    cdef fo_batchnorm_args a
    a.eps = eps; a.momentum = momentum; a.training = training
    cdef void *py = cnp.PyArray_DATA(<cnp.ndarray>y)
    cdef const void *px = cnp.PyArray_DATA(x)
    cdef void *sm = _data_or_null(save_mean)
    cdef void *si = _data_or_null(save_invstd)
    cdef void *rm = _data_or_null(running_mean)
    cdef void *rv = _data_or_null(running_var)
    cdef const void *pw = _data_or_null(weight)
    cdef const void *pb = _data_or_null(bias)
    cdef bint f64 = dt == np.float64
    cdef int rc
    with nogil:
        if f64:
            rc = fo_batchnorm_forward_f64(<double *>py, <double *>sm, <double *>si,
                                          <double *>rm, <double *>rv, <const double *>px,
                                          <const double *>pw, <const double *>pb,
                                          s.outer, s.C, s.inner, &a)
        else:
            rc = fo_batchnorm_forward_f32(<float *>py, <float *>sm, <float *>si,
                                          <float *>rm, <float *>rv, <const float *>px,
                                          <const float *>pw, <const float *>pb,
                                          s.outer, s.C, s.inner, &a)
    _check_rc(rc, "batchnorm_forward")


def batchnorm_backward(cnp.ndarray dy, cnp.ndarray x, save_mean, save_invstd, weight,
                       dx, dweight, dbias, *, bint training, bint accumulate,
                       bint channels_last):
    """Batch-norm backward (see fastopt.h): dx (may be None), dweight and dbias
    (None, or accumulated into when `accumulate`)."""
    _check_array(x, "x", None, False)
    dt = x.dtype
    cdef _NormShape s = _norm_shape(x, "x", channels_last)
    _check_array(dy, "dy", dt, False)
    if not _same_shape(dy, x):
        raise ValueError(f"dy must have x's shape {_shp(x)}, got {_shp(dy)}")
    if dx is not None:
        _check_array(dx, "out", dt, True)
        if not _same_shape(dx, x):
            raise ValueError(f"out must have x's shape {_shp(x)}, got {_shp(dx)}")
    _check_channel_array(save_mean, "save_mean", dt, s.C, False)
    _check_channel_array(save_invstd, "save_invstd", dt, s.C, False)
    for name, arr, w in (("weight", weight, False), ("dweight", dweight, True),
                       ("dbias", dbias, True)):
        if arr is not None:
            _check_channel_array(arr, name, dt, s.C, w)
    read = [("x", x), ("save_mean", save_mean), ("save_invstd", save_invstd),
            ("weight", weight)]
    # dx may be dy itself (each element reads its dy before writing dx)
    _check_no_overlap([("out", dx), ("dweight", dweight), ("dbias", dbias)],
                      read + ([] if dx is dy else [("dy", dy)]))
    if dx is dy:
        _check_no_overlap([("dweight", dweight), ("dbias", dbias)], [("dy", dy)])

    cdef fo_batchnorm_backward_args a
    a.training = training; a.accumulate = accumulate
    cdef void *pdx = _data_or_null(dx)
    cdef void *pdw = _data_or_null(dweight)
    cdef void *pdb = _data_or_null(dbias)
    cdef const void *pdy = cnp.PyArray_DATA(dy)
    cdef const void *px = cnp.PyArray_DATA(x)
    cdef const void *sm = cnp.PyArray_DATA(<cnp.ndarray>save_mean)
    cdef const void *si = cnp.PyArray_DATA(<cnp.ndarray>save_invstd)
    cdef const void *pw = _data_or_null(weight)
    cdef bint f64 = dt == np.float64
    cdef int rc
    with nogil:
        if f64:
            rc = fo_batchnorm_backward_f64(<double *>pdx, <double *>pdw, <double *>pdb,
                                           <const double *>pdy, <const double *>px,
                                           <const double *>sm, <const double *>si,
                                           <const double *>pw, s.outer, s.C, s.inner, &a)
        else:
            rc = fo_batchnorm_backward_f32(<float *>pdx, <float *>pdw, <float *>pdb,
                                           <const float *>pdy, <const float *>px,
                                           <const float *>sm, <const float *>si,
                                           <const float *>pw, s.outer, s.C, s.inner, &a)
    _check_rc(rc, "batchnorm_backward")
