/* optim.c -- optimizer updates (SGD, Adagrad, RMSprop, Adam/AdamW).
 *
 * Each step is one pass over memory: every array is read once and written
 * once, no temporaries, so at large sizes a step runs at the memory
 * bandwidth. The math lives in optim_impl.h, instantiated here for float32
 * and float64 (T, SFX and SQRT name the type). Float32 kernels compute in float32 like PyTorch's, with the
 * per-step scalars (bias corrections, step sizes) computed in double. */
#include <math.h>

#include "fastopt.h"
#include "parallel.h"

#define T float
#define SFX(x) x##_f32
#define SQRT sqrtf
#include "optim_impl.h"
#undef SQRT
#undef T
#undef SFX

#define T double
#define SFX(x) x##_f64
#define SQRT sqrt
#include "optim_impl.h"
#undef SQRT
#undef T
#undef SFX
