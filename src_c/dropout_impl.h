/* dropout_impl.h -- dropout and noise kernels for one precision; dropout.c
 * includes it twice with T = float / double and SFX(x) = x ## _f32 / _f64. */

typedef struct {
    T *out;
    const T *in;
    uint8_t *mask;          /* forward: written (may be NULL); backward: read */
    int64_t n;
    dropout_plan d;
    uint64_t seed, offset;
    double std;             /* noise */
    int stream;             /* AVX-512 path: streaming stores (avx512.h) */
} SFX(dropout_job);

/* out[e] = in[e] * (bit e ? scale : 0) for the n <= 256 elements of a group.
 * out may be in (in place): each run of 32 is computed into a local array
 * before it is stored, so no restrict promise is broken and both loops still
 * vectorize without run-time alias checks. */
INLINE void SFX(apply_bits)(T *out, const T *in, const uint32_t bits[8], T scale, int64_t n) {
    if (n == FO_DROPOUT_GROUP) {
        for (int w = 0; w < 8; w++) {
            uint32_t b = bits[w];
            T v[32];
            for (int e = 0; e < 32; e++) v[e] = in[32 * w + e] * (((b >> e) & 1) ? scale : (T)0);
            for (int e = 0; e < 32; e++) out[32 * w + e] = v[e];
        }
    } else {
        for (int64_t e = 0; e < n; e++)
            out[e] = in[e] * (((bits[e / 32] >> (e % 32)) & 1) ? scale : (T)0);
    }
}

/* Groups [g0, g1): bits from the RNG (forward, backward without a mask) or
 * from the mask (backward), applied to in -> out. */
INLINE void SFX(dropout_groups)(const SFX(dropout_job) *j, int64_t g0, int64_t g1,
                                const int bits_from_mask, const int write_mask) {
    const T scale = (T)j->d.scale;
    for (int64_t g = g0; g < g1; g++) {
        int64_t i = g * FO_DROPOUT_GROUP;
        int64_t n = j->n - i < FO_DROPOUT_GROUP ? j->n - i : FO_DROPOUT_GROUP;
        int64_t nbytes = (n + 7) / 8;
        uint32_t bits[8];
        if (bits_from_mask) {
            load_mask_bytes(bits, j->mask + g * FO_DROPOUT_GROUP_BYTES, nbytes);
        } else {
            group_keep_bits(bits, &j->d, (uint64_t)g, j->seed, j->offset);
            for (int w = 0; w < 8; w++) {   /* clear the bits past the end */
                int64_t left = n - 32 * w;
                if (left < 32) bits[w] &= left <= 0 ? 0 : ((uint32_t)1 << left) - 1;
            }
        }
        if (write_mask) store_mask_bytes(j->mask + g * FO_DROPOUT_GROUP_BYTES, bits, nbytes);
        SFX(apply_bits)(j->out + i, j->in + i, bits, scale, n);
    }
}

#ifdef FO_DROPOUT_AVX512
/* out[64w + b] = in[64w + b] * (bit b of keep[w] ? scale : 0), w < 4, the
 * 256 outputs through the writer (whose next bytes are out's). */
AVX512_TARGET static inline void SFX(apply_masks_avx512)(fo_stream_writer *out, const T *in,
                                                         const __mmask64 keep[4], T scale) {
#if FO_T_IS_F64
    const __m512d s = _mm512_set1_pd(scale);
    for (int q = 0; q < 32; q++) {   /* 8 elements each */
        __m512d m = _mm512_maskz_mov_pd((__mmask8)(keep[q / 8] >> (8 * (q % 8))), s);
        fo_writer_put(out, _mm512_castpd_si512(_mm512_mul_pd(_mm512_loadu_pd(in + 8 * q), m)));
    }
#else
    const __m512 s = _mm512_set1_ps(scale);
    for (int q = 0; q < 16; q++) {   /* 16 elements each */
        __m512 m = _mm512_maskz_mov_ps((__mmask16)(keep[q / 4] >> (16 * (q % 4))), s);
        fo_writer_put(out, _mm512_castps_si512(_mm512_mul_ps(_mm512_loadu_ps(in + 16 * q), m)));
    }
#endif
}

/* dropout_groups for AVX-512 CPUs: whole groups here, a partial last group
 * through the portable code. */
AVX512_TARGET static void SFX(dropout_groups_avx512)(const SFX(dropout_job) *j, int64_t g0,
                                                     int64_t g1, const int bits_from_mask,
                                                     const int write_mask) {
    const T scale = (T)j->d.scale;
    int64_t full = j->n / FO_DROPOUT_GROUP;   /* groups with 256 elements */
    int64_t gend = g1 < full ? g1 : full;
    int64_t g = g0;
    fo_stream_writer out;
    fo_writer_init(&out, j->out + g0 * FO_DROPOUT_GROUP, j->stream);
    for (; g < gend; g += 2) {
        __mmask64 keep[2][4];
        int ng = g + 1 < gend ? 2 : 1;
        uint8_t *mask = j->mask ? j->mask + g * FO_DROPOUT_GROUP_BYTES : NULL;   /* NULL + k is UB */
        if (bits_from_mask) memcpy(keep, mask, FO_DROPOUT_GROUP_BYTES * (size_t)ng);   /* little-endian */
        else if (ng == 2) keep_masks_avx512(keep, &j->d, (uint64_t)g, j->seed, j->offset, 2);
        else keep_masks_avx512(keep, &j->d, (uint64_t)g, j->seed, j->offset, 1);
        if (write_mask) memcpy(mask, keep, FO_DROPOUT_GROUP_BYTES * (size_t)ng);
        for (int h = 0; h < ng; h++)
            SFX(apply_masks_avx512)(&out, j->in + (g + h) * FO_DROPOUT_GROUP, keep[h], scale);
    }
    fo_writer_finish(&out);
    if (j->stream) _mm_sfence();
    if (g1 > gend) SFX(dropout_groups)(j, gend, g1, bits_from_mask, write_mask);
}
#endif

FO_DISPATCH static void SFX(dropout_fwd_body)(void *c, int64_t g0, int64_t g1) {
    const SFX(dropout_job) *j = (const SFX(dropout_job) *)c;
#ifdef FO_DROPOUT_AVX512
    if (have_avx512()) {
        if (j->mask) SFX(dropout_groups_avx512)(j, g0, g1, 0, 1);
        else SFX(dropout_groups_avx512)(j, g0, g1, 0, 0);
        return;
    }
#endif
    if (j->mask) SFX(dropout_groups)(j, g0, g1, 0, 1);
    else SFX(dropout_groups)(j, g0, g1, 0, 0);
}

FO_DISPATCH static void SFX(dropout_bwd_mask_body)(void *c, int64_t g0, int64_t g1) {
#ifdef FO_DROPOUT_AVX512
    if (have_avx512()) {
        SFX(dropout_groups_avx512)((const SFX(dropout_job) *)c, g0, g1, 1, 0);
        return;
    }
#endif
    SFX(dropout_groups)((const SFX(dropout_job) *)c, g0, g1, 1, 0);
}

static void SFX(dropout_run)(SFX(dropout_job) *j, group_fn body) {
#ifdef FO_DROPOUT_AVX512
    j->stream = fo_stream_mode(j->out, j->n * (int64_t)sizeof(T));
#endif
    for_groups((j->n + FO_DROPOUT_GROUP - 1) / FO_DROPOUT_GROUP, body, j);
}

void SFX(fo_dropout_forward)(T *y, uint8_t *mask, const T *x, int64_t n,
                             const fo_dropout_args *a) {
    SFX(dropout_job) j = {y, x, mask, n, make_plan(a->p), a->seed, a->offset, 0, 0};
    SFX(dropout_run)(&j, SFX(dropout_fwd_body));
}

void SFX(fo_dropout_backward)(T *dx, const uint8_t *mask, const T *dy, int64_t n,
                              const fo_dropout_args *a) {
    SFX(dropout_job) j = {dx, dy, (uint8_t *)mask, n, make_plan(a->p), a->seed, a->offset, 0, 0};
    if (mask) SFX(dropout_run)(&j, SFX(dropout_bwd_mask_body));
    else SFX(dropout_run)(&j, SFX(dropout_fwd_body));   /* regenerate the bits */
}

/* ------------------------------------------------------- Gaussian noise */
/* Box-Muller on the words of each Philox block: (w0, w1) -> elements l and
 * 16 + l, (w2, w3) -> elements 32 + l and 48 + l; u = (r + 0.5) * 2^-32 lies
 * in (0, 1], so log(u) is finite. In T (logf/sinf/cosf for float32: about
 * twice as fast as double, and as accurate as the float32 result). */
static void SFX(noise_body)(void *c, int64_t g0, int64_t g1) {
    const SFX(dropout_job) *j = (const SFX(dropout_job) *)c;
    const T two_pi = (T)6.283185307179586, std = (T)j->std;
    const double inv32 = 1.0 / 4294967296.0;
    for (int64_t g = g0; g < g1; g++) {
        uint32_t r[FO_RNG_GROUP];
        T z[FO_RNG_GROUP];
        fo_philox_group(r, (uint64_t)g, j->seed, j->offset);
        for (int h = 0; h < 2; h++) {
            for (int l = 0; l < FO_RNG_LANES; l++) {
                T u1 = (T)(((double)r[2 * h * FO_RNG_LANES + l] + 0.5) * inv32);
                T u2 = (T)(((double)r[(2 * h + 1) * FO_RNG_LANES + l] + 0.5) * inv32);
                T rad = MATH(sqrt)(-2 * MATH(log)(u1)), th = two_pi * u2;
                z[2 * h * FO_RNG_LANES + l] = rad * MATH(cos)(th);
                z[(2 * h + 1) * FO_RNG_LANES + l] = rad * MATH(sin)(th);
            }
        }
        int64_t i = g * FO_RNG_GROUP;
        int64_t n = j->n - i < FO_RNG_GROUP ? j->n - i : FO_RNG_GROUP;
        for (int64_t e = 0; e < n; e++) j->out[i + e] = j->in[i + e] + std * z[e];
    }
}

void SFX(fo_gaussian_noise)(T *y, const T *x, int64_t n, const fo_noise_args *a) {
    SFX(dropout_job) j = {y, x, 0, n, make_plan(0), a->seed, a->offset, a->std, 0};
    for_groups((n + FO_RNG_GROUP - 1) / FO_RNG_GROUP, SFX(noise_body), &j);
}
