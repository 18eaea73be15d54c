/* norm.c -- batch normalization: training and eval forward, backward.
 *
 * Every layout is seen as a row-major (outer, C, inner) array: NCHW (N, C, S)
 * is outer = N, inner = S = prod(spatial); (N, C) and channels-last
 * (N, *spatial, C) are outer = N (or N*S), inner = 1. The statistics of
 * channel c run over its outer*inner elements.
 *
 * Each kernel is one reduction pass and one apply pass over memory:
 *   forward (training): sums of (x - K) and (x - K)^2 per channel, K = the
 *     channel's first element, or 0 if not finite (the shifted-data algorithm:
 *     K lies within the data's spread, so the float64 sums do not cancel even
 *     for x = 1e4 + N(0, 1)); then y = (x - mean_T)*scale + shift, where
 *     mean_T is the mean rounded to T, so that x - mean_T is (nearly) exact
 *     and the rounding of the mean is folded into `shift` in double.
 *   forward (eval): y = x*scale + shift, running stats folded per channel.
 *   backward: sums of dy and dy*(x - mean) per channel in one pass over
 *     (x, dy), then dx = k1*dy + k2*(x - mean) + k3 in one pass.
 *
 * Determinism: a reduction is split into fixed units (a run of rows, or a
 * run of samples for a chunk of channels) that depend on the shape only; each
 * unit's float64 partial sums go to their own slots and are added in unit
 * order, so results are bitwise identical for any thread count. Units read
 * their rows or samples in address order, so that the prefetcher keeps up.
 *
 * Outputs larger than the cache are written with streaming stores by an
 * AVX-512 apply pass chosen at run time (avx512.h); everything else is
 * portable C vectorized by GCC (target_clones, parallel.h).
 *
 * The math lives in norm_impl.h, instantiated for float32 and float64. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "avx512.h"
#include "fastopt.h"
#include "parallel.h"

/* The vector arguments go only to always_inline helpers, so no call passes
 * one across the ABI that clang warns about. */
#ifdef __clang__
#pragma clang diagnostic ignored "-Wpsabi"
#endif

#define T float
#define SFX(x) x##_f32
#define FO_T_IS_F64 0
#include "norm_impl.h"
#undef T
#undef SFX
#undef FO_T_IS_F64

#define T double
#define SFX(x) x##_f64
#define FO_T_IS_F64 1
#include "norm_impl.h"
#undef T
#undef SFX
#undef FO_T_IS_F64
