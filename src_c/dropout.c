/* dropout.c -- inverted dropout and Gaussian noise injection, drawing from
 * Philox4x32-10 (rng.h) keyed by (seed, offset, element index).
 *
 * Dropout keeps element i when its 32-bit uniform >= round(p * 2^32), so
 * P(keep) = 1 - p to 2^-32. The uniform's top 8 bits are one byte of a Philox
 * word (four elements per word: the RNG is most of the cost), its low 24
 * bits are drawn only on a tie with the threshold's top 8 bits (see
 * extra_low_bits for the exact layout),
 * and scales kept elements by 1/(1-p). The output is y = x * m with
 * m = kept ? scale : 0 (a multiply, not a select, so that NaN and Inf
 * propagate through dropped elements as they do in PyTorch). The mask is
 * bit-packed: bit i % 8 of byte i / 8 is 1 when element i is kept
 * (np.unpackbits(mask, bitorder='little') reads it).
 *
 * Work is split into whole 256-element groups (32 mask bytes; the random
 * bits of one group come from 16 Philox blocks side by side in vector lanes);
 * results do not depend on the thread count. Portable C (target_clones) plus
 * an AVX-512 path chosen at run time; both give the same bits. The math lives
 * in dropout_impl.h, instantiated for float32 and float64. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "fastopt.h"
#include "parallel.h"
#include "avx512.h"
#include "rng.h"

#define INLINE static inline __attribute__((always_inline))

/* Below this many groups per thread (32K elements) an extra thread does not pay. */
#define FO_DROPOUT_MIN_GROUPS 128
/* Elements per dropout group: 8-bit draws, the four bytes of each of the 64
 * words of one Philox group (fo_philox_group). */
#define FO_DROPOUT_GROUP 256
#define FO_DROPOUT_GROUP_BYTES (FO_DROPOUT_GROUP / 8)   /* mask bytes of a group */

typedef enum { KEEP_ALL, KEEP_NONE, KEEP_RANDOM } keep_mode;

typedef struct {
    keep_mode mode;
    uint32_t t_hi, t_lo;   /* the 32-bit threshold round(p * 2^32): top 8 bits, low 24 */
    double scale;          /* 1/(1-p); 0 when p == 1 */
} dropout_plan;

static dropout_plan make_plan(double p) {
    dropout_plan d;
    d.t_hi = d.t_lo = 0;
    if (p <= 0) {
        d.mode = KEEP_ALL; d.scale = 1.0;
    } else if (p >= 1) {
        d.mode = KEEP_NONE; d.scale = 0.0;
    } else {
        double t = nearbyint(p * 4294967296.0);
        uint32_t ti = t >= 4294967295.0 ? 4294967295u : (uint32_t)t;
        d.mode = KEEP_RANDOM;
        d.t_hi = ti >> 24;
        d.t_lo = ti & 0xffffffu;
        d.scale = 1.0 / (1.0 - p);
    }
    return d;
}

/* Element i is kept when its 32-bit uniform U(i) >= round(p * 2^32), so
 * P(keep) = 1 - p to 2^-32. Philox words are the expensive part (about 0.4 ns
 * per word here, more than a copy of the element), so U's top 8 bits come
 * from a quarter of a word: element 256*g + e takes byte e % 4 (little-endian)
 * of word e / 4 of group g. Only when those 8 bits equal the threshold's
 * (probability 2^-8) are U's low 24 bits needed: they are the low 24 bits of
 * word 0 of a separate block, counter (i as 64 bits with the top bit set,
 * offset), which no group counter (< 2^63) ever uses; when the threshold's
 * low 24 bits are 0 (p = k/256) a tie keeps without drawing. */
static uint32_t extra_low_bits(uint64_t i, uint64_t seed, uint64_t offset) {
    uint32_t ctr[4] = {(uint32_t)i, (uint32_t)(i >> 32) | 0x80000000u,
                       (uint32_t)offset, (uint32_t)(offset >> 32)};
    uint32_t key[2] = {(uint32_t)seed, (uint32_t)(seed >> 32)};
    fo_philox4x32_10(ctr, key);
    return ctr[0] & 0xffffffu;
}

/* Keep bits of the tied elements i0 + b (bit b of ties set). */
static uint64_t settle_ties(uint64_t ties, uint64_t i0, const dropout_plan *d, uint64_t seed,
                            uint64_t offset) {
    uint64_t keep = 0;
    for (; ties; ties &= ties - 1) {
        int b = __builtin_ctzll(ties);
        if (extra_low_bits(i0 + (uint64_t)b, seed, offset) >= d->t_lo) keep |= (uint64_t)1 << b;
    }
    return keep;
}

/* The keep bits of group g: bit b of bits[w] = element 256*g + 32*w + b. */
INLINE void group_keep_bits(uint32_t bits[8], const dropout_plan *d, uint64_t g,
                            uint64_t seed, uint64_t offset) {
    if (d->mode != KEEP_RANDOM) {
        uint32_t all = d->mode == KEEP_ALL ? ~(uint32_t)0 : 0;
        for (int w = 0; w < 8; w++) bits[w] = all;
        return;
    }
    uint32_t r[FO_RNG_GROUP];
    fo_philox_group(r, g, seed, offset);
    /* keep when the top 8 bits exceed the threshold's (u > t_hi), or equal
     * them (u + 1 > t_hi) when its low 24 bits are 0: then no tie to settle */
    const int32_t t_hi = (int32_t)d->t_hi - (d->t_lo == 0);
    for (int w = 0; w < 8; w++) {
        /* 32 elements = the bytes of words 8w .. 8w + 7 */
        uint32_t acc = 0, ties = 0;
        for (int b = 0; b < 32; b++) {
            int32_t u = (int32_t)((r[8 * w + b / 4] >> (8 * (b % 4))) & 0xffu);
            acc |= (uint32_t)(u > t_hi) << b;
            ties |= (uint32_t)(u == t_hi) << b;
        }
        if (ties && d->t_lo != 0)
            acc |= (uint32_t)settle_ties(ties, g * FO_DROPOUT_GROUP + 32 * (uint64_t)w, d, seed,
                                         offset);
        bits[w] = acc;
    }
}

/* Mask bytes of a group (16, fewer at the end), little-endian whatever the
 * host's byte order. */
INLINE void store_mask_bytes(uint8_t *mask, const uint32_t bits[8], int64_t nbytes) {
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    if (nbytes == FO_DROPOUT_GROUP_BYTES) {
        memcpy(mask, bits, FO_DROPOUT_GROUP_BYTES);
        return;
    }
#endif
    for (int64_t k = 0; k < nbytes; k++) mask[k] = (uint8_t)(bits[k / 4] >> (8 * (k % 4)));
}

INLINE void load_mask_bytes(uint32_t bits[8], const uint8_t *mask, int64_t nbytes) {
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    if (nbytes == FO_DROPOUT_GROUP_BYTES) {
        memcpy(bits, mask, FO_DROPOUT_GROUP_BYTES);
        return;
    }
#endif
    for (int w = 0; w < 8; w++) bits[w] = 0;
    for (int64_t k = 0; k < nbytes; k++) bits[k / 4] |= (uint32_t)mask[k] << (8 * (k % 4));
}

/* ---- AVX-512 path --------------------------------------------------------
 * GCC vectorizes the portable code above, but not well: it multiplies with
 * vpmullq (no vpmuludq for 32x32->64-bit products) and builds the mask bits
 * with shuffles and OR-trees, where AVX-512 compares give them directly. This
 * path computes the same bits (16 blocks as two vectors of 64-bit lanes,
 * byte compares straight into 64-bit masks) and is chosen at run time on CPUs that have
 * AVX-512 (F, BW, DQ, VL). The test suite checks its masks against a NumPy
 * Philox; the portable path gives the identical bits. */
#ifdef FO_AVX512
#define FO_DROPOUT_AVX512 1

static int force_portable = 0;   /* fo_dropout_use_portable(): for tests */

static int have_avx512(void) { return !force_portable && fo_cpu_has_avx512(); }

/* Ten Philox rounds on nv vectors of eight blocks each (64-bit lanes whose low
 * 32 bits hold the words; vpmuludq reads only those, outputs are truncated). */
AVX512_TARGET static inline __attribute__((always_inline))
void philox_rounds_avx512(__m512i c[4][4], const int nv, uint64_t seed) {
    const __m512i m0 = _mm512_set1_epi64(FO_PHILOX_M0), m1 = _mm512_set1_epi64(FO_PHILOX_M1);
    uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);
#pragma GCC unroll 10
    for (int round = 0; round < 10; round++) {
        const __m512i K0 = _mm512_set1_epi64(k0), K1 = _mm512_set1_epi64(k1);
#pragma GCC unroll 4
        for (int v = 0; v < nv; v++) {
            __m512i p0 = _mm512_mul_epu32(c[0][v], m0), p1 = _mm512_mul_epu32(c[2][v], m1);
            c[0][v] = _mm512_ternarylogic_epi64(_mm512_srli_epi64(p1, 32), c[1][v], K0, 0x96);
            c[2][v] = _mm512_ternarylogic_epi64(_mm512_srli_epi64(p0, 32), c[3][v], K1, 0x96);
            c[1][v] = p1;
            c[3][v] = p0;
        }
        k0 += FO_PHILOX_W0;
        k1 += FO_PHILOX_W1;
    }
}

/* keep[h][w] bit b = element 256*(g + h) + 64*w + b is kept (h < ng, w < 4).
 * Two groups at a time (ng = 2) give the core eight independent multiply
 * chains, enough to hide the multiplies' latency. */
AVX512_TARGET static inline __attribute__((always_inline))
void keep_masks_avx512(__mmask64 keep[][4], const dropout_plan *d, uint64_t g, uint64_t seed,
                       uint64_t offset, const int ng) {
    if (d->mode != KEEP_RANDOM) {
        for (int h = 0; h < ng; h++)
            for (int w = 0; w < 4; w++) keep[h][w] = d->mode == KEEP_ALL ? ~(__mmask64)0 : 0;
        return;
    }
    /* even blocks 16g + 2k in vector 2h, odd blocks 16g + 2k + 1 in vector
     * 2h + 1 (64-bit lanes k < 8), so that one dword shuffle interleaves them
     * into the group's word in block order */
    const __m512i lane2 = _mm512_setr_epi64(0, 2, 4, 6, 8, 10, 12, 14);
    /* c[w][v]: word w of vector v. Constant indices only (loops fully
     * unrolled), so that GCC keeps all of it in registers. */
    __m512i c[4][4];
#pragma GCC unroll 4
    for (int v = 0; v < 2 * ng; v++) {
        c[0][v] = _mm512_add_epi64(
            _mm512_set1_epi64((long long)((g + (uint64_t)(v / 2)) * 16 + (uint64_t)(v % 2))), lane2);
        c[1][v] = _mm512_srli_epi64(c[0][v], 32);
        c[2][v] = _mm512_set1_epi64((long long)offset);
        c[3][v] = _mm512_set1_epi64((long long)(offset >> 32));
    }
    philox_rounds_avx512(c, 2 * ng, seed);
    const __m512i t8 = _mm512_set1_epi8((char)d->t_hi);
    /* A tie of the top 8 bits (one element in 256) keeps outright when the
     * threshold's low 24 bits are 0 (p = k/256, p = 0.5 among them): then
     * one compare, and no tie branch, whose mispredictions cost a fifth of
     * the time at 1.6e7 elements. */
    const int ties_need_bits = d->t_lo != 0;
#pragma GCC unroll 2
    for (int h = 0; h < ng; h++) {
#pragma GCC unroll 4
        for (int w = 0; w < 4; w++) {
            /* word w of blocks 0..15 as 16 lanes of 32 bits (odd lanes from
             * the odd blocks' low dwords): its bytes are elements 64w .. 64w + 63 */
            __m512i word = _mm512_mask_shuffle_epi32(c[w][2 * h], 0xAAAA, c[w][2 * h + 1],
                                                     _MM_PERM_CDAB);
            if (!ties_need_bits) {
                keep[h][w] = _mm512_cmpge_epu8_mask(word, t8);
                continue;
            }
            keep[h][w] = _mm512_cmpgt_epu8_mask(word, t8);
            __mmask64 ties = _mm512_cmpeq_epi8_mask(word, t8);
            if (ties)   /* one word in four; a vector Philox for the ties was slower */
                keep[h][w] |= settle_ties(ties, (g + (uint64_t)h) * FO_DROPOUT_GROUP + 64 * (uint64_t)w,
                                          d, seed, offset);
        }
    }
}
#endif

void fo_dropout_use_portable(int on) {
#ifdef FO_DROPOUT_AVX512
    force_portable = on != 0;
#else
    (void)on;
#endif
}

/* Split groups [0, ngroups) into one contiguous range per thread and call
 * body(ctx, g0, g1) on each. */
typedef void (*group_fn)(void *ctx, int64_t g0, int64_t g1);

typedef struct {
    int64_t ngroups;
    group_fn body;
    void *ctx;
} groups_job;

static void groups_part(void *vjob, int t, int n) {
    const groups_job *j = (const groups_job *)vjob;
    j->body(j->ctx, j->ngroups * t / n, j->ngroups * (t + 1) / n);
}

static void for_groups(int64_t ngroups, group_fn body, void *ctx) {
    if (ngroups <= 0) return;
    int64_t nt = fo_get_num_threads();
    if (nt > ngroups / FO_DROPOUT_MIN_GROUPS) nt = ngroups / FO_DROPOUT_MIN_GROUPS;
    groups_job job = {ngroups, body, ctx};
    fo_parallel_parts(nt < 1 ? 1 : (int)nt, groups_part, &job);
}

#define T float
#define SFX(x) x##_f32
#define FO_T_IS_F64 0
#define MATH(fn) fn##f   /* logf, sinf, ... */
#include "dropout_impl.h"
#undef T
#undef SFX
#undef FO_T_IS_F64
#undef MATH

#define T double
#define SFX(x) x##_f64
#define FO_T_IS_F64 1
#define MATH(fn) fn
#include "dropout_impl.h"
#undef T
#undef SFX
#undef FO_T_IS_F64
#undef MATH
