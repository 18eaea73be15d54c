# The one binding layer between NumPy buffers and the C kernels in src_c/.
# Each kernel family has its own .pxi (declarations from fastopt.h and the
# checked entry points); they are included into this single extension so that
# the C library's state (the thread count) exists once per process.
#
# Rule for every entry point: check every buffer and argument first (raising
# TypeError/ValueError that names it), then one call into C with the GIL
# released. Nothing is copied that the caller expects updated in place.
cimport numpy as cnp
import numpy as np

cnp.import_array()

include "_common.pxi"
include "_optim.pxi"
include "_norm.pxi"
include "_dropout.pxi"
include "_rnn.pxi"
