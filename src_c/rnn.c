/* rnn.c -- recurrent layers (RNN tanh/relu, LSTM, GRU in both reset placements):
 * the pointwise gate math and the sequence drivers around the caller's GEMM.
 *
 * Work per layer and sequence, as the fast libraries structure it:
 *   forward:  one GEMM projects the inputs of all T steps (x W_ih^T); each step
 *             adds only the recurrent product h W_hh^T, then one fused pass
 *             applies the biases and activations and updates the state;
 *   backward: newest step first, one fused pass turns dh (and dc) into the
 *             gate pre-activation gradients, one GEMM carries dh to the
 *             previous step; after the loop dx, dW_ih and dW_hh are a few
 *             large GEMMs over all T*B rows, not T small ones.
 * The math lives in rnn_impl.h, instantiated here for float32 and float64.
 *
 * sigmoid and tanh are computed from an exp written with plain arithmetic and
 * bit operations (Cody-Waite reduction and a Taylor polynomial): libm's expf/
 * tanhf are opaque calls that keep the loops scalar without -ffast-math, and
 * clamping the argument keeps them free of overflow for any input while NaN
 * still propagates. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "avx512.h"
#include "fastopt.h"
#include "parallel.h"

/* fo_rnn_use_portable(): for tests, the step products through the caller's
 * GEMM even where the packed AVX-512 kernel could run */
static int fo_rnn_portable = 0;

void fo_rnn_use_portable(int on) { fo_rnn_portable = on != 0; }

/* 1/k! for the exp polynomial (used up to k = 14). */
static const double fo_inv_factorial[15] = {
    1.0, 1.0, 1.0 / 2, 1.0 / 6, 1.0 / 24, 1.0 / 120, 1.0 / 720, 1.0 / 5040,
    1.0 / 40320, 1.0 / 362880, 1.0 / 3628800, 1.0 / 39916800, 1.0 / 479001600,
    1.0 / 6227020800.0, 1.0 / 87178291200.0};

/* 1 when the layer's sizes and mode are what fastopt.h allows. */
static int fo_rnn_layer_valid(const fo_rnn_layer *L) {
    if (fo_rnn_num_gates(L->mode) == 0) return 0;
    if (L->seq_len < 0 || L->batch < 0 || L->input_size < 1 || L->hidden_size < 1) return 0;
    if ((L->b_ih == NULL) != (L->b_hh == NULL)) return 0;   /* both biases or neither */
    return L->proj_size == 0 ||
           (L->mode == FO_LSTM && L->proj_size > 0 && L->proj_size < L->hidden_size);
}

int fo_rnn_num_gates(int mode) {
    switch (mode) {
    case FO_RNN_TANH: case FO_RNN_RELU: return 1;
    case FO_LSTM: return 4;
    case FO_GRU: case FO_GRU_RESET_BEFORE: return 3;
    default: return 0;
    }
}

/* Memory a packed product fetches into L2 for the pointwise work after it
 * (rnn_impl.h, product_packed): up to two byte ranges. */
typedef struct {
    const char *p[2];
    int64_t bytes[2];
} fo_rnn_ahead;

#ifdef FO_AVX512
/* The lines of ahead's ranges from fraction f0/den to f1/den of each (bytes,
 * so one copy serves both precisions). */
static void fo_rnn_fetch_ahead(const fo_rnn_ahead *ahead, int64_t f0, int64_t f1,
                               int64_t den) {
    for (int g = 0; g < 2; g++) {
        const int64_t lines = (ahead->bytes[g] + 63) / 64;
        for (int64_t l = f0 * lines / den; l < f1 * lines / den; l++)
            __builtin_prefetch(ahead->p[g] + 64 * l, 0, 2);
    }
}
#endif

/* Per precision: UT the same-width unsigned integer, MANT/BIAS the IEEE
 * mantissa bits and exponent bias; EXP_LO..EXP_HI the range where e^x is a
 * normal number; LN_MAX the log of the largest finite T; LN2_HI + LN2_LO =
 * ln 2 with LN2_HI*n exact; POLY_DEG the Taylor degree whose truncation error
 * is below half an ulp on |r| <= ln2/2. */
#define T float
#define SFX(x) x##_f32
#define UT uint32_t
#define MANT 23
#define BIAS 127
#define EXP_LO (-87.0f)
#define EXP_HI 88.0f
#define LN_MAX 88.7228394f
#define LN2_HI 0.693359375f
#define LN2_LO (-2.12194440e-4f)
#define POLY_DEG 7
#define GEMM_FN fo_gemm_f32_fn
#define FABS fabsf
#define COPYSIGN copysignf
/* on the bits of 64-byte vectors: interleave two (transpose), add as floats */
#define VPERMUTE2 _mm512_permutex2var_epi32
#define VADD_BITS(a, b) \
    _mm512_castps_si512(_mm512_add_ps(_mm512_castsi512_ps(a), _mm512_castsi512_ps(b)))
/* the packed products' vectors: VPS(op) is _mm512_<op>_ps */
#define VEC __m512
#define VMASK __mmask16
#define VPS(op) _mm512_##op##_ps
#include "rnn_impl.h"
#undef T
#undef SFX
#undef UT
#undef MANT
#undef BIAS
#undef EXP_LO
#undef EXP_HI
#undef LN_MAX
#undef LN2_HI
#undef LN2_LO
#undef POLY_DEG
#undef GEMM_FN
#undef FABS
#undef COPYSIGN
#undef VPERMUTE2
#undef VADD_BITS
#undef VEC
#undef VMASK
#undef VPS

#define T double
#define SFX(x) x##_f64
#define UT uint64_t
#define MANT 52
#define BIAS 1023
#define EXP_LO (-708.0)
#define EXP_HI 709.0
#define LN_MAX 709.782712893384
#define LN2_HI 6.93147180369123816490e-01
#define LN2_LO 1.90821492927058770002e-10
#define POLY_DEG 13
#define GEMM_FN fo_gemm_f64_fn
#define FABS fabs
#define COPYSIGN copysign
#define VPERMUTE2 _mm512_permutex2var_epi64
#define VADD_BITS(a, b) \
    _mm512_castpd_si512(_mm512_add_pd(_mm512_castsi512_pd(a), _mm512_castsi512_pd(b)))
#define VEC __m512d
#define VMASK __mmask8
#define VPS(op) _mm512_##op##_pd
#include "rnn_impl.h"

int64_t fo_rnn_dgates_ld(int mode, int64_t hidden_size, int64_t elem_size) {
    int64_t gh = fo_rnn_num_gates(mode) * hidden_size;
    if (gh <= 0) return 0;
    return elem_size == 8 ? padded_ld_f64(gh) : padded_ld_f32(gh);
}
