/* rnn_impl.h -- recurrent layers, written once for both precisions.
 * rnn.c includes this file twice, with T, SFX(x), UT, MANT, BIAS, EXP_LO,
 * EXP_HI, LN2_HI, LN2_LO, POLY_DEG, FABS, COPYSIGN and GEMM_FN defined (see there).
 *
 * Pointwise kernels run over the B*H (batch, unit) pairs of one step, split
 * by fo_parallel_foreach; a gate row of G*H pre-activations belongs to each
 * batch row b, gate k of unit j at [k*H + j]. Saved-for-backward values are
 * the activated gates, c_t (LSTM), W_hn h + b_hn or r*h (GRU), and out. */

#define INLINE static inline __attribute__((always_inline))

/* ------------------------------------------------------ exp, sigmoid, tanh */

/* e^x - 1 for x in [EXP_LO, EXP_HI]: x = n ln2 + r, |r| <= ln2/2, e^x - 1 =
 * (2^n - 1) + 2^n (e^r - 1), exact for n = 0 so accurate near 0 too.
 * Rounding x/ln2 by adding 1.5*2^MANT leaves n in the low bits of k. */
INLINE T SFX(expm1_clamped)(T x) {
    const T magic = (T)(1.5 * (double)((UT)1 << MANT));
    T k = x * (T)1.44269504088896340736 + magic;
    T n = k - magic;
    T r = x - n * LN2_HI;
    r = r - n * LN2_LO;
    T p = (T)fo_inv_factorial[POLY_DEG];
    for (int d = POLY_DEG - 1; d >= 1; d--) p = p * r + (T)fo_inv_factorial[d];
    T em1_r = p * r;                                   /* e^r - 1 */
    UT kb, mb;
    memcpy(&kb, &k, sizeof kb);
    memcpy(&mb, &magic, sizeof mb);
    UT sb = (kb - mb + (UT)BIAS) << MANT;              /* bits of 2^n */
    T s;
    memcpy(&s, &sb, sizeof s);
    return (s - 1) + s * em1_r;
}

/* Clamp to [lo, hi]; NaN passes through (both comparisons are false). */
INLINE T SFX(clamp)(T x, T lo, T hi) {
    x = x > hi ? hi : x;
    return x < lo ? lo : x;
}

/* The clamp's bounds (and sigmoid's zero bound, times 2^100), read from
 * memory: as constants, GCC turned the constant results at the clamped ends
 * into masked branches around the whole exp and computed each division twice
 * (the LSTM forward's gate math of T50 B32 H256, GEMMs left out: 1.46-1.62 ->
 * 1.29 ms here). Not const, so that GCC cannot fold them; nothing writes them. */
FO_INTERNAL T SFX(fo_exp_bounds)[3] = {EXP_LO, EXP_HI, -LN_MAX * (T)0x1p100};

/* 1/(1 + e^-x) = 1/(2 + expm1(-x)); saturates to 1 without overflow, and to 0
 * past x = -ln(T's max), where torch's e^-x overflows: the clamp alone left a
 * subnormal floor (6e-39 in float32) that kept saturated gates' derivatives
 * nonzero. The numerator `keep` is 1 above that bound, 0 at or below it, NaN
 * for NaN: as a select around the division, GCC left the loops scalar
 * (the division may trap, so it cannot run for the lanes a select drops). */
INLINE T SFX(sigmoid)(T x) {
    T d = (T)2 + SFX(expm1_clamped)(SFX(clamp)(-x, SFX(fo_exp_bounds)[0],
                                                SFX(fo_exp_bounds)[1]));
    T keep = SFX(clamp)(x * (T)0x1p100 - SFX(fo_exp_bounds)[2], 0, 1);   /* one FMA */
    return keep / d;
}

/* tanh|x| = -m/(2 + m) with m = expm1(-2|x|) in (-1, 0]: no cancellation near 0,
 * no overflow for large |x|; the sign is copied back. */
INLINE T SFX(tanh)(T x) {
    T m = SFX(expm1_clamped)(SFX(clamp)((T)-2 * FABS(x), SFX(fo_exp_bounds)[0],
                                        SFX(fo_exp_bounds)[1]));
    return COPYSIGN(-m / ((T)2 + m), x);
}

INLINE T SFX(relu)(T x) { return x < 0 ? (T)0 : x; }   /* NaN stays NaN, as in torch */

/* ---------------------------------------------------- pointwise step kernels */

/* Everything a pointwise kernel of one step may touch; each uses a subset.
 * Shapes: gate rows (B, G*H); state rows (B, H); bias (G*H); bias_hn (H). */
typedef struct {
    int64_t H;
    T *gates;              /* in: pre-activations without bias; out: activated */
    T *out, *c, *extra;    /* h_t, c_t, GRU extra of this step */
    const T *h_prev, *c_prev;   /* never NULL: the drivers pass a zero row */
    const T *bias, *bias_hn, *hh;   /* hh: GRU h W_hh^T of this step (B, 3H) */
    int relu;
    /* backward */
    T *dgates, *dgates_hh, *dh, *dc;
    int64_t ldg;                /* row stride of dgates and dgates_hh (>= G*H) */
    const T *dout, *drh;        /* dout never NULL either */
} SFX(step_ctx);

/* A chunk covers the pairs [lo, hi) of the flattened (B, H) index space; it
 * calls a row function once per batch row b with the units [j0, j1) of that
 * row. The row functions take every array as a restrict parameter: GCC honours
 * restrict on parameters, so the loops vectorize without alias checks. */
#define FOR_ROWS(lo, hi, H, b, j0, j1)                                   \
    for (int64_t b = (lo) / (H), j0, j1;                                  \
         b * (H) < (hi) && (j0 = (lo) > b * (H) ? (lo) - b * (H) : 0,     \
                            j1 = (hi) - b * (H) < (H) ? (hi) - b * (H) : (H), 1); \
         b++)

/* Gate k (of G) of batch row b in a (B, G*H) buffer; DGATE: in dgates or
 * dgates_hh, whose rows are c->ldg apart. */
#define GATE(buf, G, k) ((buf) + (b * (G) + (k)) * H)
#define DGATE(buf, k) ((buf) + b * c->ldg + (k) * H)
#define ROW(buf) ((buf) + b * H)

/* RNN forward: h = act(pre + bias). */
INLINE void SFX(rnn_fwd_row)(T *restrict h, const T *restrict pre, const T *restrict bias,
                             int relu, int64_t j0, int64_t j1) {
    if (relu)
        for (int64_t j = j0; j < j1; j++) h[j] = SFX(relu)(pre[j] + bias[j]);
    else
        for (int64_t j = j0; j < j1; j++) h[j] = SFX(tanh)(pre[j] + bias[j]);
}

FO_DISPATCH static void SFX(rnn_fwd_chunk)(void *vc, int64_t unused, int64_t lo, int64_t hi) {
    (void)unused;
    const SFX(step_ctx) *c = (const SFX(step_ctx) *)vc;
    const int64_t H = c->H;
    FOR_ROWS(lo, hi, H, b, j0, j1)
        SFX(rnn_fwd_row)(ROW(c->out), ROW(c->gates), c->bias, c->relu, j0, j1);
}

/* RNN backward: dpre = (dout + dh) * act'(h), act' from the saved output h. */
INLINE void SFX(rnn_bwd_row)(T *restrict dpre, const T *restrict h, const T *restrict dout,
                             const T *restrict dh, int relu, int64_t j0, int64_t j1) {
    if (relu)
        /* h <= 0 stops the gradient, as torch's threshold_backward: a NaN unit passes it */
        for (int64_t j = j0; j < j1; j++) dpre[j] = h[j] <= 0 ? (T)0 : dout[j] + dh[j];
    else
        for (int64_t j = j0; j < j1; j++) dpre[j] = (dout[j] + dh[j]) * ((T)1 - h[j] * h[j]);
}

FO_DISPATCH static void SFX(rnn_bwd_chunk)(void *vc, int64_t unused, int64_t lo, int64_t hi) {
    (void)unused;
    const SFX(step_ctx) *c = (const SFX(step_ctx) *)vc;
    const int64_t H = c->H;
    FOR_ROWS(lo, hi, H, b, j0, j1)
        SFX(rnn_bwd_row)(DGATE(c->dgates, 0), ROW(c->out), ROW(c->dout), ROW(c->dh), c->relu,
                         j0, j1);
}

/* LSTM forward: i, f, o = sigmoid, g = tanh of (pre + bias);
 * c = f*c_prev + i*g; h = o*tanh(c). Gates are stored activated, in place. */
INLINE void SFX(lstm_fwd_row)(T *restrict gi, T *restrict gf, T *restrict gg, T *restrict go,
                              T *restrict cn, T *restrict h, const T *restrict cp,
                              const T *restrict bias, int64_t H, int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; j++) {
        T i = SFX(sigmoid)(gi[j] + bias[j]);
        T f = SFX(sigmoid)(gf[j] + bias[H + j]);
        T g = SFX(tanh)(gg[j] + bias[2 * H + j]);
        T o = SFX(sigmoid)(go[j] + bias[3 * H + j]);
        T cj = f * cp[j] + i * g;
        gi[j] = i; gf[j] = f; gg[j] = g; go[j] = o;
        cn[j] = cj;
        h[j] = o * SFX(tanh)(cj);
    }
}

FO_DISPATCH static void SFX(lstm_fwd_chunk)(void *vc, int64_t unused, int64_t lo, int64_t hi) {
    (void)unused;
    const SFX(step_ctx) *c = (const SFX(step_ctx) *)vc;
    const int64_t H = c->H;
    FOR_ROWS(lo, hi, H, b, j0, j1)
        SFX(lstm_fwd_row)(GATE(c->gates, 4, 0), GATE(c->gates, 4, 1), GATE(c->gates, 4, 2),
                          GATE(c->gates, 4, 3), ROW(c->c), ROW(c->out), ROW(c->c_prev),
                          c->bias, H, j0, j1);
}

/* LSTM backward: with dh = dout + dh_rec and tc = tanh(c) recomputed,
 * dc += dh*o*(1-tc^2); di = dc*g*i(1-i); df = dc*c_prev*f(1-f);
 * dg = dc*i*(1-g^2); do = dh*tc*o(1-o); dc_prev = dc*f (in place in dc). */
INLINE void SFX(lstm_bwd_row)(T *restrict di, T *restrict df, T *restrict dg, T *restrict dgo,
                              T *restrict dc, const T *restrict gi, const T *restrict gf,
                              const T *restrict gg, const T *restrict go, const T *restrict cn,
                              const T *restrict cp, const T *restrict dout,
                              const T *restrict dh, int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; j++) {
        T i = gi[j], f = gf[j], g = gg[j], o = go[j];
        T tc = SFX(tanh)(cn[j]);
        T dhj = dout[j] + dh[j];
        T dcj = dc[j] + dhj * o * ((T)1 - tc * tc);
        di[j] = dcj * g * i * ((T)1 - i);
        df[j] = dcj * cp[j] * f * ((T)1 - f);
        dg[j] = dcj * i * ((T)1 - g * g);
        dgo[j] = dhj * tc * o * ((T)1 - o);
        dc[j] = dcj * f;
    }
}

FO_DISPATCH static void SFX(lstm_bwd_chunk)(void *vc, int64_t unused, int64_t lo, int64_t hi) {
    (void)unused;
    const SFX(step_ctx) *c = (const SFX(step_ctx) *)vc;
    const int64_t H = c->H;
    FOR_ROWS(lo, hi, H, b, j0, j1)
        SFX(lstm_bwd_row)(DGATE(c->dgates, 0), DGATE(c->dgates, 1), DGATE(c->dgates, 2),
                          DGATE(c->dgates, 3), ROW(c->dc), GATE(c->gates, 4, 0),
                          GATE(c->gates, 4, 1), GATE(c->gates, 4, 2), GATE(c->gates, 4, 3),
                          ROW(c->c), ROW(c->c_prev), ROW(c->dout), ROW(c->dh), j0, j1);
}

/* GRU (reset after, torch): with hh = h_prev W_hh^T,
 * r = sig(pre_r + b_r + hh_r); z = sig(pre_z + b_z + hh_z); hn = hh_n + b_hn;
 * n = tanh(pre_n + b_in + r*hn); h = n + z*(h_prev - n) (torch's form).
 * bias holds (b_ir+b_hr, b_iz+b_hz, b_in); extra saves hn. */
INLINE void SFX(gru_fwd_row)(T *restrict gr, T *restrict gz, T *restrict gn, T *restrict ex,
                             T *restrict h, const T *restrict hr, const T *restrict hz,
                             const T *restrict hnn, const T *restrict bias,
                             const T *restrict bhn, const T *restrict hp, int64_t H,
                             int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; j++) {
        T r = SFX(sigmoid)(gr[j] + bias[j] + hr[j]);
        T z = SFX(sigmoid)(gz[j] + bias[H + j] + hz[j]);
        T hn = hnn[j] + bhn[j];
        T n = SFX(tanh)(gn[j] + bias[2 * H + j] + r * hn);
        gr[j] = r; gz[j] = z; gn[j] = n;
        ex[j] = hn;
        h[j] = n + z * (hp[j] - n);
    }
}

FO_DISPATCH static void SFX(gru_fwd_chunk)(void *vc, int64_t unused, int64_t lo, int64_t hi) {
    (void)unused;
    const SFX(step_ctx) *c = (const SFX(step_ctx) *)vc;
    const int64_t H = c->H;
    FOR_ROWS(lo, hi, H, b, j0, j1)
        SFX(gru_fwd_row)(GATE(c->gates, 3, 0), GATE(c->gates, 3, 1), GATE(c->gates, 3, 2),
                         ROW(c->extra), ROW(c->out), GATE(c->hh, 3, 0), GATE(c->hh, 3, 1),
                         GATE(c->hh, 3, 2), c->bias, c->bias_hn, ROW(c->h_prev), H, j0, j1);
}

/* GRU (reset after) backward, dh = dout + dh_rec:
 * dn = dh(1-z)(1-n^2); dz = dh(h_prev-n) z(1-z); dr = dn*hn r(1-r);
 * input-side grads (dr, dz, dn), recurrent-side (dr, dz, dn*r);
 * dh_rec = dh*z, to which the caller adds dgates_hh W_hh. */
INLINE void SFX(gru_bwd_row)(T *restrict dr, T *restrict dz, T *restrict dn, T *restrict er,
                             T *restrict ez, T *restrict en, T *restrict dh,
                             const T *restrict gr, const T *restrict gz, const T *restrict gn,
                             const T *restrict hn, const T *restrict hp,
                             const T *restrict dout, int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; j++) {
        T r = gr[j], z = gz[j], n = gn[j];
        T dhj = dout[j] + dh[j];
        T dnp = dhj * ((T)1 - z) * ((T)1 - n * n);
        T dzp = dhj * (hp[j] - n) * z * ((T)1 - z);
        T drp = dnp * hn[j] * r * ((T)1 - r);
        dr[j] = drp; dz[j] = dzp; dn[j] = dnp;
        er[j] = drp; ez[j] = dzp; en[j] = dnp * r;
        dh[j] = dhj * z;
    }
}

FO_DISPATCH static void SFX(gru_bwd_chunk)(void *vc, int64_t unused, int64_t lo, int64_t hi) {
    (void)unused;
    const SFX(step_ctx) *c = (const SFX(step_ctx) *)vc;
    const int64_t H = c->H;
    FOR_ROWS(lo, hi, H, b, j0, j1)
        SFX(gru_bwd_row)(DGATE(c->dgates, 0), DGATE(c->dgates, 1), DGATE(c->dgates, 2),
                         DGATE(c->dgates_hh, 0), DGATE(c->dgates_hh, 1),
                         DGATE(c->dgates_hh, 2), ROW(c->dh), GATE(c->gates, 3, 0),
                         GATE(c->gates, 3, 1), GATE(c->gates, 3, 2), ROW(c->extra),
                         ROW(c->h_prev), ROW(c->dout), j0, j1);
}

/* GRU (reset before, Cho et al.), first half: r, z = sig(pre + bias) where
 * pre already holds x W_i^T + h_prev W_h^T for r and z; extra = r*h_prev. */
INLINE void SFX(grurb_fwd1_row)(T *restrict gr, T *restrict gz, T *restrict rh,
                                const T *restrict bias, const T *restrict hp, int64_t H,
                                int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; j++) {
        T r = SFX(sigmoid)(gr[j] + bias[j]);
        gr[j] = r;
        gz[j] = SFX(sigmoid)(gz[j] + bias[H + j]);
        rh[j] = r * hp[j];
    }
}

FO_DISPATCH static void SFX(grurb_fwd1_chunk)(void *vc, int64_t unused, int64_t lo, int64_t hi) {
    (void)unused;
    const SFX(step_ctx) *c = (const SFX(step_ctx) *)vc;
    const int64_t H = c->H;
    FOR_ROWS(lo, hi, H, b, j0, j1)
        SFX(grurb_fwd1_row)(GATE(c->gates, 3, 0), GATE(c->gates, 3, 1), ROW(c->extra),
                            c->bias, ROW(c->h_prev), H, j0, j1);
}

/* Second half, once pre_n holds x W_in^T + (r*h_prev) W_hn^T:
 * n = tanh(pre_n + b_in + b_hn); h = n + z*(h_prev - n). */
INLINE void SFX(grurb_fwd2_row)(T *restrict gn, T *restrict h, const T *restrict gz,
                                const T *restrict bn, const T *restrict hp,
                                int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; j++) {
        T n = SFX(tanh)(gn[j] + bn[j]);
        gn[j] = n;
        h[j] = n + gz[j] * (hp[j] - n);
    }
}

FO_DISPATCH static void SFX(grurb_fwd2_chunk)(void *vc, int64_t unused, int64_t lo, int64_t hi) {
    (void)unused;
    const SFX(step_ctx) *c = (const SFX(step_ctx) *)vc;
    const int64_t H = c->H;
    FOR_ROWS(lo, hi, H, b, j0, j1)
        SFX(grurb_fwd2_row)(GATE(c->gates, 3, 2), ROW(c->out), GATE(c->gates, 3, 1),
                            c->bias + 2 * H, ROW(c->h_prev), j0, j1);
}

/* Reset-before backward, first half (dh = dout + dh_rec):
 * dn = dh(1-z)(1-n^2); dz = dh(h_prev-n) z(1-z); dh_rec = dh*z. */
INLINE void SFX(grurb_bwd1_row)(T *restrict dz, T *restrict dn, T *restrict dh,
                                const T *restrict gz, const T *restrict gn,
                                const T *restrict hp, const T *restrict dout,
                                int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; j++) {
        T z = gz[j], n = gn[j];
        T dhj = dout[j] + dh[j];
        dn[j] = dhj * ((T)1 - z) * ((T)1 - n * n);
        dz[j] = dhj * (hp[j] - n) * z * ((T)1 - z);
        dh[j] = dhj * z;
    }
}

FO_DISPATCH static void SFX(grurb_bwd1_chunk)(void *vc, int64_t unused, int64_t lo, int64_t hi) {
    (void)unused;
    const SFX(step_ctx) *c = (const SFX(step_ctx) *)vc;
    const int64_t H = c->H;
    FOR_ROWS(lo, hi, H, b, j0, j1)
        SFX(grurb_bwd1_row)(DGATE(c->dgates, 1), DGATE(c->dgates, 2), ROW(c->dh),
                            GATE(c->gates, 3, 1), GATE(c->gates, 3, 2), ROW(c->h_prev),
                            ROW(c->dout), j0, j1);
}

/* Second half, once drh = dn W_hn (the gradient of r*h_prev):
 * dr = drh*h_prev r(1-r); dh_rec += drh*r. */
INLINE void SFX(grurb_bwd2_row)(T *restrict dr, T *restrict dh, const T *restrict gr,
                                const T *restrict drh, const T *restrict hp,
                                int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; j++) {
        T r = gr[j];
        dr[j] = drh[j] * hp[j] * r * ((T)1 - r);
        dh[j] += drh[j] * r;
    }
}

FO_DISPATCH static void SFX(grurb_bwd2_chunk)(void *vc, int64_t unused, int64_t lo, int64_t hi) {
    (void)unused;
    const SFX(step_ctx) *c = (const SFX(step_ctx) *)vc;
    const int64_t H = c->H;
    FOR_ROWS(lo, hi, H, b, j0, j1)
        SFX(grurb_bwd2_row)(DGATE(c->dgates, 0), ROW(c->dh), GATE(c->gates, 3, 0),
                            ROW(c->drh), ROW(c->h_prev), j0, j1);
}

/* ------------------------------------------------------------- sequence */

#ifndef FO_RNN_GRAIN
#define FO_RNN_GRAIN 4096
#endif
INLINE void SFX(run_step)(fo_chunk_fn body, SFX(step_ctx) *c, int64_t batch) {
    int64_t n = batch * c->H;
    fo_parallel_foreach_grain(&n, 1, body, c, FO_RNN_GRAIN);
}

/* acc[j] += sum over rows of a[row*lda + j], j < cols: bias gradients. */
static void SFX(colsum_add)(T *restrict acc, const T *restrict a, int64_t rows,
                            int64_t cols, int64_t lda) {
    for (int64_t r = 0; r < rows; r++)
        for (int64_t j = 0; j < cols; j++) acc[j] += a[r * lda + j];
}

/* dst (cols x rows, rows ldd apart) = src^T, or dst += src^T when acc, for src
 * (rows x cols, rows lds apart), in 16x16 blocks writing dst rows contiguously
 * (strided stores measured 2x slower), 16 dst rows at a time down all source
 * rows. Transposing a cell's gate product back into its (64, 2048) float32
 * gates, whose rows are 8 KiB apart, right after the GEMM wrote it, took
 * 150-220 us with the blocks the other way round (all 64 destination rows in
 * turn) and about 95 us with these (median per call inside the cell). With
 * 32x32 blocks, the 32 source rows of a block fell into a few L1 sets when a
 * row is 2 KiB (float32 (2048, 512): 1.0-1.2 ms against 0.33 ms). */
static void SFX(transpose_scalar)(T *restrict dst, int64_t ldd, const T *restrict src,
                                  int64_t lds, int64_t rows, int64_t cols, int acc) {
    for (int64_t j0 = 0; j0 < cols; j0 += 16)
        for (int64_t i0 = 0; i0 < rows; i0 += 16) {
            int64_t i1 = i0 + 16 < rows ? i0 + 16 : rows, j1 = j0 + 16 < cols ? j0 + 16 : cols;
            for (int64_t j = j0; j < j1; j++)
                for (int64_t i = i0; i < i1; i++)
                    dst[j * ldd + i] = acc ? dst[j * ldd + i] + src[i * lds + j] : src[i * lds + j];
        }
}

#ifdef FO_AVX512
/* The lanes of a 64-byte vector: the side of a block transposed in registers. */
#define TR_LANES ((int)(64 / sizeof(T)))

/* dst = [dst +] src^T for one TR_LANES x TR_LANES block: log2(lanes) rounds
 * that interleave rows i and i + lanes/2 (a perfect shuffle) transpose it. */
AVX512_TARGET static inline void SFX(transpose_block_avx512)(T *dst, int64_t ldd, const T *src,
                                                             int64_t lds, int acc, __m512i lo,
                                                             __m512i hi) {
    __m512i r[TR_LANES], t[TR_LANES];
    for (int i = 0; i < TR_LANES; i++) r[i] = _mm512_loadu_si512(src + i * lds);
    for (int round = TR_LANES; round > 1; round /= 2) {
        for (int i = 0; i < TR_LANES / 2; i++) {
            t[2 * i] = VPERMUTE2(r[i], lo, r[i + TR_LANES / 2]);
            t[2 * i + 1] = VPERMUTE2(r[i], hi, r[i + TR_LANES / 2]);
        }
        memcpy(r, t, sizeof r);
    }
    for (int i = 0; i < TR_LANES; i++)
        _mm512_storeu_si512(dst + i * ldd,
                            acc ? VADD_BITS(_mm512_loadu_si512(dst + i * ldd), r[i]) : r[i]);
}

/* transpose() of rows x cols, both multiples of the lanes, block by block in
 * the scalar code's order: the cell's transpose above in 41-64 us (medians of
 * six runs), and a float32 LSTM cell's forward 5-7% faster than with the
 * scalar code. */
AVX512_TARGET static void SFX(transpose_avx512)(T *dst, int64_t ldd, const T *src, int64_t lds,
                                                int64_t rows, int64_t cols, int acc) {
    UT lo_idx[TR_LANES], hi_idx[TR_LANES];   /* a0 b0 a1 b1 ... from the low / high halves */
    for (int k = 0; k < TR_LANES; k++) {
        lo_idx[k] = (UT)(k / 2 + (k % 2) * TR_LANES);
        hi_idx[k] = (UT)(TR_LANES / 2 + k / 2 + (k % 2) * TR_LANES);
    }
    const __m512i lo = _mm512_loadu_si512(lo_idx), hi = _mm512_loadu_si512(hi_idx);
    for (int64_t j0 = 0; j0 < cols; j0 += TR_LANES)
        for (int64_t i0 = 0; i0 < rows; i0 += TR_LANES)
            SFX(transpose_block_avx512)(dst + j0 * ldd + i0, ldd, src + i0 * lds + j0, lds, acc,
                                        lo, hi);
}
#endif

static void SFX(transpose)(T *restrict dst, int64_t ldd, const T *restrict src, int64_t lds,
                           int64_t rows, int64_t cols, int acc) {
    int64_t rows_v = 0, cols_v = 0;   /* the part done in whole vector blocks */
#ifdef FO_AVX512
    if (fo_cpu_has_avx512()) {
        rows_v = rows - rows % TR_LANES;
        cols_v = cols - cols % TR_LANES;
        SFX(transpose_avx512)(dst, ldd, src, lds, rows_v, cols_v, acc);
    }
#endif
    /* the rest: the columns right of the blocks, then the rows below them */
    SFX(transpose_scalar)(dst + cols_v * ldd, ldd, src + cols_v, lds, rows_v, cols - cols_v, acc);
    SFX(transpose_scalar)(dst + rows_v, ldd, src + rows_v * lds, lds, rows - rows_v, cols, acc);
}
#ifdef FO_AVX512
#undef TR_LANES
#endif

/* transpose over fastopt's threads, in ranges of source rows */
typedef struct {
    T *dst;
    const T *src;
    int64_t ldd, lds, cols;
    int acc;
} SFX(transpose_job);

static void SFX(transpose_rows)(void *ctx, int64_t unused, int64_t lo, int64_t hi) {
    const SFX(transpose_job) *j = (const SFX(transpose_job) *)ctx;
    (void)unused;
    SFX(transpose)(j->dst + lo, j->ldd, j->src + lo * j->lds, j->lds, hi - lo, j->cols, j->acc);
}

/* 32768 elements (about 10 us) per thread at least: a parallel region costs a
 * few microseconds */
static void SFX(transpose_parallel)(T *dst, int64_t ldd, const T *src, int64_t lds,
                                    int64_t rows, int64_t cols, int acc) {
    SFX(transpose_job) job = {dst, src, ldd, lds, cols, acc};
    fo_parallel_foreach_grain(&rows, 1, SFX(transpose_rows), &job,
                              cols < 32768 ? 32768 / cols : 1);
}

/* ------------------------------------------------- packed step products */

/* The products of a sequence's steps, h W_hh^T forward and dgates W_hh
 * backward, multiply by the same W_hh at every step. With AVX-512 they run
 * through the register-blocked kernel below, on a copy of W_hh packed once
 * per layer call into panels of PK_NR columns (each K rows of PK_NR values,
 * contiguous, zero padded past the last column). (32 x 256) @ (256 x 1024)
 * ran at 180 GFLOP/s there against 117-132 through oneDNN's dnnl_sgemm, and
 * (32 x 1024) @ (1024 x 256) at 188 (1 thread, Xeon with AVX-512, 2026-11). */
typedef struct {
    T *p;           /* panels of K x PK_NR, K * PK_NR elements apart */
    int64_t K, N;   /* B is K x N */
    const fo_rnn_ahead *ahead;   /* fetched into L2 by the next product, or NULL */
} SFX(packed);

#ifdef FO_AVX512
#define PK_LANES ((int64_t)(64 / sizeof(T)))
#define PK_NR (2 * PK_LANES)   /* a panel's columns: two vectors */
#define PK_MR 12               /* rows of a register block: 24 accumulators */
#define PK_AHEAD 16            /* panel rows prefetched ahead: from L2 in time */

static int64_t SFX(packed_elems)(int64_t K, int64_t N) {
    return (N + PK_NR - 1) / PK_NR * PK_NR * K;
}

/* B = W^T for W (N x K, rows ldw apart): a panel is rows n0.. of W transposed */
static void SFX(pack_transposed)(T *dst, const T *w, int64_t ldw, int64_t K, int64_t N) {
    for (int64_t n0 = 0; n0 < N; n0 += PK_NR, dst += K * PK_NR) {
        int64_t nc = N - n0 < PK_NR ? N - n0 : PK_NR;
        if (nc < PK_NR) memset(dst, 0, (size_t)(K * PK_NR) * sizeof(T));   /* the padding */
        SFX(transpose)(dst, PK_NR, w + n0 * ldw, ldw, nc, K, 0);
    }
}

/* B itself (K x N, rows ldb apart): a panel row is a piece of a row of B */
static void SFX(pack_rows)(T *dst, const T *b, int64_t ldb, int64_t K, int64_t N) {
    for (int64_t n0 = 0; n0 < N; n0 += PK_NR, dst += K * PK_NR) {
        int64_t nc = N - n0 < PK_NR ? N - n0 : PK_NR;
        for (int64_t k = 0; k < K; k++) {
            memcpy(dst + k * PK_NR, b + k * ldb + n0, (size_t)nc * sizeof(T));
            memset(dst + k * PK_NR + nc, 0, (size_t)(PK_NR - nc) * sizeof(T));
        }
    }
}

/* C[0:mr, 0:PK_NR] (masked by m0, m1) = C (acc) or 0, plus A[0:mr, 0:K] times
 * one panel p; mr a constant after inlining, so the accumulators stay in
 * registers. */
AVX512_TARGET INLINE void SFX(packed_block)(const int mr, int64_t K, const T *a, int64_t lda,
                                            const T *p, T *c, int64_t ldc, int acc, VMASK m0,
                                            VMASK m1) {
    VEC s0[PK_MR], s1[PK_MR];
#pragma GCC unroll 12
    for (int i = 0; i < mr; i++) {
        s0[i] = s1[i] = VPS(setzero)();
        _mm_prefetch((const char *)(c + i * ldc), _MM_HINT_T0);
        _mm_prefetch((const char *)(c + i * ldc + PK_LANES), _MM_HINT_T0);
    }
    for (int64_t k = 0; k < K; k++) {
        _mm_prefetch((const char *)(p + (k + PK_AHEAD) * PK_NR), _MM_HINT_T0);
        _mm_prefetch((const char *)(p + (k + PK_AHEAD) * PK_NR + PK_LANES), _MM_HINT_T0);
        VEC b0 = VPS(loadu)(p + k * PK_NR), b1 = VPS(loadu)(p + k * PK_NR + PK_LANES);
#pragma GCC unroll 12
        for (int i = 0; i < mr; i++) {
            VEC ai = VPS(set1)(a[i * lda + k]);
            s0[i] = VPS(fmadd)(ai, b0, s0[i]);
            s1[i] = VPS(fmadd)(ai, b1, s1[i]);
        }
    }
#pragma GCC unroll 12
    for (int i = 0; i < mr; i++) {
        T *ci = c + i * ldc;
        if (acc) {
            s0[i] = VPS(add)(s0[i], VPS(maskz_loadu)(m0, ci));
            s1[i] = VPS(add)(s1[i], VPS(maskz_loadu)(m1, ci + PK_LANES));
        }
        VPS(mask_storeu)(ci, m0, s0[i]);
        VPS(mask_storeu)(ci + PK_LANES, m1, s1[i]);
    }
}

typedef struct {
    int64_t M, K, N, pstride, lda, ldc;
    const T *a, *p;   /* p: the first panel's row k0 */
    T *c;
    int acc, by_rows;
    const fo_rnn_ahead *ahead;
} SFX(packed_job);

/* Rows [lo, hi) (by_rows) or the panels that start in columns [lo, hi),
 * register block by register block: a block's rows of A stay in L1 while
 * the panels stream from L2. The share [lo, hi) of j->ahead is fetched a
 * piece per panel of the first block, spread over the product's time. */
AVX512_TARGET static void SFX(packed_part)(void *ctx, int64_t unused, int64_t lo, int64_t hi) {
    const SFX(packed_job) *j = (const SFX(packed_job) *)ctx;
    (void)unused;
    const int64_t r0 = j->by_rows ? lo : 0, rows = (j->by_rows ? hi : j->M) - r0;
    const int64_t c0 = j->by_rows ? 0 : lo, c1 = j->by_rows ? j->N : hi;
    const int64_t nblk = (rows + PK_MR - 1) / PK_MR;
    const int64_t first = (c0 + PK_NR - 1) / PK_NR * PK_NR;   /* the first panel's column */
    const int64_t npanels = (c1 - first + PK_NR - 1) / PK_NR;
    const int64_t span = j->by_rows ? j->M : j->N;
    for (int64_t r = 0; r < nblk; r++) {
        const int64_t i0 = r0 + r * rows / nblk, i1 = r0 + (r + 1) * rows / nblk;   /* even */
        const T *a = j->a + i0 * j->lda;
        for (int64_t n0 = first; n0 < c1; n0 += PK_NR) {
            const int64_t w0 = j->N - n0, w1 = w0 - PK_LANES;
            const VMASK m0 = w0 >= PK_LANES ? (VMASK)-1 : (VMASK)((1u << w0) - 1);
            const VMASK m1 = w1 >= PK_LANES ? (VMASK)-1 : w1 <= 0 ? 0 : (VMASK)((1u << w1) - 1);
            const T *p = j->p + n0 / PK_NR * j->pstride;
            T *c = j->c + i0 * j->ldc + n0;
            if (j->ahead && r == 0) {
                const int64_t q = (n0 - first) / PK_NR;
                fo_rnn_fetch_ahead(j->ahead, lo * npanels + q * (hi - lo),
                                   lo * npanels + (q + 1) * (hi - lo), span * npanels);
            }
            switch (i1 - i0) {
#define PK_CASE(n) \
    case n: SFX(packed_block)(n, j->K, a, j->lda, p, c, j->ldc, j->acc, m0, m1); break;
            PK_CASE(1) PK_CASE(2) PK_CASE(3) PK_CASE(4) PK_CASE(5) PK_CASE(6)
            PK_CASE(7) PK_CASE(8) PK_CASE(9) PK_CASE(10) PK_CASE(11) PK_CASE(12)
#undef PK_CASE
            }
        }
    }
}

/* C (M x N, rows ldc apart) = C (acc) or 0, plus A (M x K, rows lda apart)
 * times rows k0..k0+K of the packed B. Threads take whole panels, or ranges
 * of rows when there are too few panels to share (dX = dgates W_ih of a
 * narrow input): every element is summed in the same order for any thread
 * count. */
static void SFX(product_packed)(const SFX(packed) *pk, int64_t M, int64_t K, const T *a,
                                int64_t lda, int64_t k0, int acc, T *c, int64_t ldc) {
    const int by_rows = (pk->N + PK_NR - 1) / PK_NR < 4 * (int64_t)fo_get_num_threads();
    SFX(packed_job) j = {M, K, pk->N, pk->K * PK_NR, lda, ldc, a, pk->p + k0 * PK_NR, c, acc,
                         by_rows, pk->ahead};
    const int64_t n = by_rows ? M : pk->N;   /* ~2 MFLOP a thread at least */
    const int64_t grain = ((int64_t)1 << 20) / ((by_rows ? pk->N : M) * K + 1) + 1;
    fo_parallel_foreach_grain(&n, 1, SFX(packed_part), &j, grain);
}
#undef PK_LANES
#undef PK_NR
#undef PK_MR
#undef PK_AHEAD

/* The bytes that W^T (transposed) or W packed takes, for W (rows x cols); 0
 * where the packed path does not run. */
static size_t SFX(pack_bytes)(int64_t rows, int64_t cols, int transposed) {
    if (fo_rnn_portable || !fo_cpu_has_avx512()) return 0;
    return (size_t)SFX(packed_elems)(transposed ? cols : rows, transposed ? rows : cols) *
           sizeof(T);
}

/* pk = W^T (transposed) or W, for W (rows x cols, contiguous), packed into
 * buf (pack_bytes of it); buf NULL: pk zeroed, no packed path */
static void SFX(pack)(SFX(packed) *pk, T *buf, const T *w, int64_t rows, int64_t cols,
                      int transposed) {
    memset(pk, 0, sizeof *pk);
    if (!buf) return;
    pk->K = transposed ? cols : rows;
    pk->N = transposed ? rows : cols;
    pk->p = buf;
    if (transposed) SFX(pack_transposed)(pk->p, w, cols, pk->K, pk->N);
    else SFX(pack_rows)(pk->p, w, cols, pk->K, pk->N);
}
#else
static size_t SFX(pack_bytes)(int64_t rows, int64_t cols, int transposed) {
    (void)rows; (void)cols; (void)transposed;
    return 0;
}
static void SFX(pack)(SFX(packed) *pk, T *buf, const T *w, int64_t rows, int64_t cols,
                      int transposed) {
    (void)buf; (void)w; (void)rows; (void)cols; (void)transposed;
    memset(pk, 0, sizeof *pk);
}
static void SFX(product_packed)(const SFX(packed) *pk, int64_t M, int64_t K, const T *a,
                                int64_t lda, int64_t k0, int acc, T *c, int64_t ldc) {
    (void)pk; (void)M; (void)K; (void)a; (void)lda; (void)k0; (void)acc; (void)c; (void)ldc;
}
#endif

/* C (M x N, rows ldc apart) = C (acc) or 0, plus A (M x K) W[k0:k0+K] for W
 * (rows ldw apart, N columns): through pk where it was packed, else the GEMM */
INLINE void SFX(product_w)(GEMM_FN gemm, const SFX(packed) *pk, int64_t M, int64_t N, int64_t K,
                           const T *a, int64_t lda, const T *w, int64_t ldw, int64_t k0, int acc,
                           T *c, int64_t ldc) {
    if (pk->p) SFX(product_packed)(pk, M, K, a, lda, k0, acc, c, ldc);
    else gemm(0, 0, M, N, K, a, lda, w + k0 * ldw, ldw, acc ? 1 : 0, c, ldc);
}

/* The row stride of a scratch matrix of n columns: rows a multiple of 4 KiB
 * apart put a GEMM's panel reads in one L1 set (4K aliasing): oneDNN's
 * (32 x 256) @ (256 x 1024) step product ran at 87 GFLOP/s with ld = 1024,
 * at 103-106 with 64 bytes more. */
static int64_t SFX(padded_ld)(int64_t n) {
    return (n * (int64_t)sizeof(T)) % 4096 == 0 ? n + 64 / (int64_t)sizeof(T) : n;
}

/* Products A W^T of at most this many rows (a cell's step, a short sequence)
 * run as C^T = W A^T, "NN" on transposed copies: oneDNN ran (64 x 512) @
 * (512 x 2048)^T at 89 GFLOP/s as "NT" and at 106 as "NN" on C^T, (32 x 256) @
 * (256 x 1024)^T at 89 against 115 (1 thread; 2 threads 175 -> 212, 176 ->
 * 227). From 256 rows on, the transposes cost about what they save. */
#define FO_RNN_FEW_ROWS 128

/* C (m x n, rows ldc apart) = C (acc) or 0 (!acc), plus A W^T for A (m x k)
 * and W (n x k), plus A2 W2^T (k2 columns) when a2 is not NULL; all contiguous.
 * With few rows, through scratch (m*(max(k, k2) + n) elements; NULL: none was
 * allocated), the two products summed before the one transpose back. */
INLINE void SFX(product_nt)(GEMM_FN gemm, int64_t m, int64_t n, int64_t k, const T *a,
                            const T *w, const T *a2, int64_t k2, const T *w2, int acc,
                            T *c, int64_t ldc, T *scratch) {
    if (m > FO_RNN_FEW_ROWS || !scratch) {
        gemm(0, 1, m, n, k, a, k, w, k, acc ? 1 : 0, c, ldc);
        if (a2) gemm(0, 1, m, n, k2, a2, k2, w2, k2, 1, c, ldc);
        return;
    }
    T *a_t = scratch, *c_t = scratch + m * (k > k2 ? k : k2);
    SFX(transpose_parallel)(a_t, m, a, k, m, k, 0);
    gemm(0, 0, n, m, k, w, k, a_t, m, 0, c_t, m);
    if (a2) {
        SFX(transpose_parallel)(a_t, m, a2, k2, m, k2, 0);
        gemm(0, 0, n, m, k2, w2, k2, a_t, m, 1, c_t, m);
    }
    SFX(transpose_parallel)(c, ldc, c_t, m, n, m, acc);
}

/* C (B x nr) = C (acc) or 0, plus h W_hh[r0:r0+nr]^T, h of width S: with
 * pk->p, through the packed W_hh[r0:r0+nr]^T; else with w_hh_t (S, G*H; rows
 * ldt apart), the transpose of w_hh, as the product "NN", which the BLASes
 * measured here run 7-27% faster than "NT" at these shapes (B rows); else
 * from w_hh directly. */
INLINE void SFX(recurrent_product)(GEMM_FN gemm, const SFX(packed) *pk, const T *h,
                                   const T *w_hh, const T *w_hh_t, int64_t ldt, int64_t B,
                                   int64_t S, int64_t r0, int64_t nr, int acc, T *c, int64_t ldc,
                                   T *scratch) {
    if (pk->p) SFX(product_packed)(pk, B, S, h, S, 0, acc, c, ldc);
    else if (w_hh_t) gemm(0, 0, B, nr, S, h, S, w_hh_t + r0, ldt, acc ? 1 : 0, c, ldc);
    else SFX(product_nt)(gemm, B, nr, S, h, w_hh + r0 * S, NULL, 0, NULL, acc, c, ldc,
                         scratch);
}

/* Below this many steps, transposing W_hh once costs more than it saves. */
#define FO_RNN_TRANSPOSE_MIN_STEPS 4

int SFX(fo_rnn_forward)(const fo_rnn_layer *L, const fo_rnn_forward_io *io, GEMM_FN gemm) {
    const int mode = L->mode;
    const int64_t Tn = L->seq_len, B = L->batch, I = L->input_size, H = L->hidden_size;
    const int64_t G = fo_rnn_num_gates(mode), GH = G * H, BH = B * H;
    /* state width: the projection's (LSTM with proj_size), else H */
    const int64_t P = L->proj_size, S = P ? P : H, BS = B * S;
    const T *x = (const T *)io->x, *h0 = (const T *)io->h0, *c0 = (const T *)io->c0;
    const T *w_ih = (const T *)L->w_ih, *w_hh = (const T *)L->w_hh, *w_hr = (const T *)L->w_hr;
    const T *b_ih = (const T *)L->b_ih, *b_hh = (const T *)L->b_hh;
    T *out = (T *)io->out, *c_all = (T *)io->c_all, *gates = (T *)io->gates;
    T *extra = (T *)io->extra;
    if (!fo_rnn_layer_valid(L)) return -2;
    if (Tn == 0 || B == 0) return 0;

    /* scratch: the bias row (G*H), b_hn (H), a zero state row (B, H) standing
     * for an absent h0/c0 (branch-free kernels), GRU's h W_hh^T (B, 3H),
     * product_nt's transposes when products have few rows, and W_hh^T for the
     * steps' products from FO_RNN_TRANSPOSE_MIN_STEPS steps on: packed (all
     * its columns, or GRU-RB's r,z columns and its n columns apart), else
     * transposed (w_hh_t). Only what is read before it is written gets
     * zeroed: calloc of the whole block cost a GRU cell (B64 H512) a 400 KB
     * memset per step. */
    const int64_t few = Tn * B <= FO_RNN_FEW_ROWS ? Tn * B
                       : B <= FO_RNN_FEW_ROWS && Tn < FO_RNN_TRANSPOSE_MIN_STEPS ? B : 0;
    const int64_t ldt = SFX(padded_ld)(GH);
    const int64_t cols = mode == FO_GRU_RESET_BEFORE ? 2 * H : GH;   /* of the first pack */
    const int copy_w_hh = Tn >= FO_RNN_TRANSPOSE_MIN_STEPS;
    const size_t z = sizeof(T);
    const size_t pack0 = copy_w_hh ? SFX(pack_bytes)(cols, S, 1) : 0;
    size_t sizes[8] = {z * (size_t)GH, z * (size_t)H, z * (size_t)BH,
                       mode == FO_GRU ? z * (size_t)(B * GH) : 0,
                       z * (size_t)(few * ((I > S ? I : S) + GH)),
                       pack0, pack0 ? SFX(pack_bytes)(GH - cols, S, 1) : 0,
                       copy_w_hh && !pack0 ? z * (size_t)(ldt * S) : 0};
    void *ptr[8];
    void *scratch = fo_scratch_alloc(sizes, ptr, 8);
    if (!scratch) return -1;
    T *bias = (T *)ptr[0], *bias_hn = (T *)ptr[1], *zeros = (T *)ptr[2], *hh = (T *)ptr[3];
    T *few_rows = few ? (T *)ptr[4] : NULL;
    T *w_hh_t = sizes[7] ? (T *)ptr[7] : NULL;
    if (!h0 || (mode == FO_LSTM && !c0)) memset(zeros, 0, sizes[2]);
    if (!b_ih) {
        memset(bias, 0, sizes[0]);
        memset(bias_hn, 0, sizes[1]);
    } else {
        for (int64_t j = 0; j < GH; j++) bias[j] = b_ih[j] + b_hh[j];
        if (mode == FO_GRU)   /* b_hn stays inside r*(W_hn h + b_hn) */
            for (int64_t j = 0; j < H; j++) {
                bias[2 * H + j] = b_ih[2 * H + j];
                bias_hn[j] = b_hh[2 * H + j];
            }
    }

    SFX(packed) pk[2];
    SFX(pack)(&pk[0], sizes[5] ? (T *)ptr[5] : NULL, w_hh, cols, S, 1);
    SFX(pack)(&pk[1], sizes[6] ? (T *)ptr[6] : NULL, w_hh + cols * S, GH - cols, S, 1);
    if (w_hh_t) SFX(transpose_parallel)(w_hh_t, ldt, w_hh, S, GH, S, 0);

    /* input projection of every step in one GEMM: gates = x W_ih^T; a single
     * step of an LSTM or RNN adds its recurrent product h0 W_hh^T to it there
     * (one transpose back instead of two) */
    const T *h0_fused = Tn == 1 && (mode == FO_LSTM || G == 1) ? h0 : NULL;
    SFX(product_nt)(gemm, Tn * B, GH, I, x, w_ih, h0_fused, S, w_hh, 0, gates, GH,
                    few_rows);

    SFX(step_ctx) c;
    memset(&c, 0, sizeof c);
    c.H = H; c.bias = bias; c.bias_hn = bias_hn; c.hh = hh;
    c.relu = mode == FO_RNN_RELU;
    for (int64_t t = 0; t < Tn; t++) {
        /* hp = NULL: the state is zero, its recurrent product is skipped */
        const T *hp = t ? out + (t - 1) * BS : h0;
        T *g = gates + t * B * GH;
        c.gates = g; c.out = out + t * BS; c.h_prev = hp ? hp : zeros;
        switch (mode) {
        case FO_RNN_TANH: case FO_RNN_RELU:
            if (hp && !h0_fused)
                SFX(recurrent_product)(gemm, &pk[0], hp, w_hh, w_hh_t, ldt, B, H, 0, GH, 1, g,
                                       GH, few_rows);
            SFX(run_step)(SFX(rnn_fwd_chunk), &c, B);
            break;
        case FO_LSTM:
            if (hp && !h0_fused)
                SFX(recurrent_product)(gemm, &pk[0], hp, w_hh, w_hh_t, ldt, B, S, 0, GH, 1, g,
                                       GH, few_rows);
            c.c = c_all + t * BH;
            c.c_prev = t ? c_all + (t - 1) * BH : c0 ? c0 : zeros;
            if (P) c.out = extra + t * BH;   /* o*tanh(c), then h = it W_hr^T */
            SFX(run_step)(SFX(lstm_fwd_chunk), &c, B);
            if (P) gemm(0, 1, B, P, H, c.out, H, w_hr, H, 0, out + t * BS, P);
            break;
        case FO_GRU:
            if (hp)
                SFX(recurrent_product)(gemm, &pk[0], hp, w_hh, w_hh_t, ldt, B, H, 0, GH, 0, hh,
                                       GH, few_rows);
            else memset(hh, 0, (size_t)(B * GH) * sizeof(T));
            c.extra = extra + t * BH;
            SFX(run_step)(SFX(gru_fwd_chunk), &c, B);
            break;
        case FO_GRU_RESET_BEFORE:
            /* r, z need h_prev W_h{r,z}^T; n needs (r*h_prev) W_hn^T after them */
            if (hp)
                SFX(recurrent_product)(gemm, &pk[0], hp, w_hh, w_hh_t, ldt, B, H, 0, 2 * H, 1, g,
                                       GH, few_rows);
            c.extra = extra + t * BH;
            SFX(run_step)(SFX(grurb_fwd1_chunk), &c, B);
            if (hp)
                SFX(recurrent_product)(gemm, &pk[1], c.extra, w_hh, w_hh_t, ldt, B, H, 2 * H, H,
                                       1, g + 2 * H, GH, few_rows);
            SFX(run_step)(SFX(grurb_fwd2_chunk), &c, B);
            break;
        }
    }
    fo_scratch_free(scratch);
    return 0;
}

int SFX(fo_rnn_backward)(const fo_rnn_layer *L, const fo_rnn_forward_io *sv,
                         const fo_rnn_backward_io *io, GEMM_FN gemm) {
    if (!fo_rnn_layer_valid(L)) return -2;
    const int mode = L->mode;
    const int64_t Tn = L->seq_len, B = L->batch, I = L->input_size, H = L->hidden_size;
    const int64_t G = fo_rnn_num_gates(mode), GH = G * H, BH = B * H, TB = Tn * B;
    const int64_t P = L->proj_size, S = P ? P : H, BS = B * S;   /* state width */
    const T *x = (const T *)sv->x, *h0 = (const T *)sv->h0, *c0 = (const T *)sv->c0;
    const T *out = (const T *)sv->out, *c_all = (const T *)sv->c_all;
    const T *gates = (const T *)sv->gates, *extra = (const T *)sv->extra;
    const T *w_ih = (const T *)L->w_ih, *w_hh = (const T *)L->w_hh, *w_hr = (const T *)L->w_hr;
    const T *dout = (const T *)io->dout, *dh_n = (const T *)io->dh_n, *dc_n = (const T *)io->dc_n;
    T *dgates = (T *)io->dgates;
    /* gradients w.r.t. the recurrent-side pre-activations: GRU's n row differs */
    T *dgh = mode == FO_GRU ? (T *)io->dgates_hh : dgates;
    const int64_t ldg = io->ld_dgates ? io->ld_dgates : GH;   /* their row stride */
    if (ldg < GH) return -2;
    if (B == 0) return 0;

    /* scratch: dh carried to the previous step, dc likewise, GRU-RB's d(r*h),
     * a zero row standing for an absent h0/c0/dout, the column sums of the
     * gate gradients (the bias gradients), taken step by step while each
     * step's rows are still in cache; with a projection, the gradient of
     * o*tanh(c) of a step and that of every step's h (for dW_hr); from
     * FO_RNN_TRANSPOSE_MIN_STEPS steps on, W_hh and W_ih packed for the
     * steps' products dgates W_hh and for dX = dgates W_ih */
    const size_t z = sizeof(T);
    const int pack_w = Tn >= FO_RNN_TRANSPOSE_MIN_STEPS;
    size_t sizes[10] = {z * (size_t)BH, z * (size_t)BH, z * (size_t)BH, z * (size_t)BH,
                        z * (size_t)BH, z * (size_t)GH, z * (size_t)GH,
                        P ? z * (size_t)(TB * P) : 0,
                        pack_w ? SFX(pack_bytes)(GH, S, 0) : 0,
                        pack_w && io->dx ? SFX(pack_bytes)(GH, I, 0) : 0};
    void *ptr[10];
    void *scratch = fo_scratch_alloc(sizes, ptr, 10);
    if (!scratch) return -1;
    T *dh = (T *)ptr[0], *dc = (T *)ptr[1], *drh = (T *)ptr[2], *zeros = (T *)ptr[3];
    T *dhf = (T *)ptr[4], *db_i = (T *)ptr[5], *db_h = (T *)ptr[6], *dh_all = (T *)ptr[7];
    /* zeroed: the sums, the zero row, and dh, dc where no gradient comes in;
     * drh, dhf and dh_all are written before they are read */
    if (dh_n) memcpy(dh, dh_n, (size_t)BS * sizeof(T));
    else memset(dh, 0, sizes[0]);
    if (dc_n) memcpy(dc, dc_n, (size_t)BH * sizeof(T));
    else memset(dc, 0, sizes[1]);
    memset(zeros, 0, sizes[3]);
    memset(db_i, 0, sizes[5]);
    memset(db_h, 0, sizes[6]);
    SFX(packed) pk;   /* W_hh for the steps' products dgates W_hh */
    SFX(pack)(&pk, sizes[8] ? (T *)ptr[8] : NULL, w_hh, GH, S, 0);

    SFX(step_ctx) c;
    memset(&c, 0, sizeof c);
    c.H = H; c.dc = dc; c.drh = drh;   /* c.dh: per step (a projection swaps it) */
    c.ldg = ldg;
    c.relu = mode == FO_RNN_RELU;
    /* While a step's product runs, the lines that the next step's pointwise
     * kernel will write (dgates rows, cold since the last backward) are
     * fetched into L2: their read-for-ownership misses otherwise stall it.
     * Forward+backward of T50 B32 I128 H256 layers, 1 and 2 threads (Xeon,
     * 2026-11): LSTM 0.97-0.99 of the time without, GRU (two dgates rows
     * to write) 0.945-0.96. Fetching what it reads too, or doing the same
     * in the forward, gained nothing. */
    fo_rnn_ahead ahead;
    pk.ahead = &ahead;
    for (int64_t t = Tn - 1; t >= 0; t--) {
        const T *hp = t ? out + (t - 1) * BS : h0;
        memset(&ahead, 0, sizeof ahead);
        if (t > 0) {
            const int64_t bytes = B * ldg * (int64_t)sizeof(T);   /* step t-1's rows */
            ahead.p[0] = (const char *)(dgates + (t - 1) * B * ldg);
            ahead.bytes[0] = bytes;
            if (dgh != dgates) {
                ahead.p[1] = (const char *)(dgh + (t - 1) * B * ldg);
                ahead.bytes[1] = bytes;
            }
        }
        const int carry = t > 0 || io->dh0;   /* is dh of step t-1 wanted at all */
        c.gates = (T *)gates + t * B * GH; c.out = (T *)out + t * BS;
        c.h_prev = hp ? hp : zeros;
        c.dgates = dgates + t * B * ldg; c.dgates_hh = dgh + t * B * ldg;
        c.dout = dout ? dout + t * BS : zeros;
        c.dh = dh;
        switch (mode) {
        case FO_RNN_TANH: case FO_RNN_RELU:
            SFX(run_step)(SFX(rnn_bwd_chunk), &c, B);
            if (carry) SFX(product_w)(gemm, &pk, B, H, GH, c.dgates, ldg, w_hh, H, 0, 0, dh, H);
            break;
        case FO_LSTM:
            c.c = (T *)c_all + t * BH;
            c.c_prev = t ? c_all + (t - 1) * BH : c0 ? c0 : zeros;
            if (P) {   /* dh of h = W_hr (o*tanh(c)), kept for dW_hr; then through W_hr */
                T *dht = dh_all + t * BS;
                for (int64_t i = 0; i < BS; i++) dht[i] = c.dout[i] + dh[i];
                gemm(0, 0, B, H, P, dht, P, w_hr, H, 0, dhf, H);
                c.dout = dhf;
                c.dh = zeros;
            }
            SFX(run_step)(SFX(lstm_bwd_chunk), &c, B);
            if (carry) SFX(product_w)(gemm, &pk, B, S, GH, c.dgates, ldg, w_hh, S, 0, 0, dh, S);
            break;
        case FO_GRU:
            c.extra = (T *)extra + t * BH;
            SFX(run_step)(SFX(gru_bwd_chunk), &c, B);
            if (carry) SFX(product_w)(gemm, &pk, B, H, GH, c.dgates_hh, ldg, w_hh, H, 0, 1, dh, H);
            break;
        case FO_GRU_RESET_BEFORE:
            SFX(run_step)(SFX(grurb_bwd1_chunk), &c, B);
            SFX(product_w)(gemm, &pk, B, H, H, c.dgates + 2 * H, ldg, w_hh, H, 2 * H, 0, drh, H);
            SFX(run_step)(SFX(grurb_bwd2_chunk), &c, B);
            if (carry) SFX(product_w)(gemm, &pk, B, H, 2 * H, c.dgates, ldg, w_hh, H, 0, 1, dh, H);
            break;
        }
        if (io->db_ih) {
            SFX(colsum_add)(db_i, c.dgates, B, GH, ldg);
            if (dgh != dgates) SFX(colsum_add)(db_h, c.dgates_hh, B, GH, ldg);
        }
    }
    if (io->db_ih) {   /* both biases see the same gradient unless FO_GRU */
        const T *sum_h = dgh != dgates ? db_h : db_i;
        for (int64_t j = 0; j < GH; j++) {
            ((T *)io->db_ih)[j] += db_i[j];
            ((T *)io->db_hh)[j] += sum_h[j];
        }
    }
    if (io->dh0) memcpy(io->dh0, dh, (size_t)BS * sizeof(T));
    if (io->dc0) memcpy(io->dc0, dc, (size_t)BH * sizeof(T));
    /* dW_hr += dh_all^T (o*tanh(c)) over all T*B rows */
    if (P && Tn) gemm(1, 0, P, H, TB, dh_all, P, extra, H, 1, (T *)io->dw_hr, H);

    /* the large products over all T*B rows */
    if (io->dx && Tn) {   /* packed too: (1600 x 1024) @ (1024 x 128) at 164 GFLOP/s
                           * against oneDNN's 140; LSTM, GRU T50 layers 0.99 of the time */
        SFX(packed) pk_ih;
        SFX(pack)(&pk_ih, sizes[9] ? (T *)ptr[9] : NULL, w_ih, GH, I, 0);
        SFX(product_w)(gemm, &pk_ih, TB, I, GH, dgates, ldg, w_ih, I, 0, 0, (T *)io->dx, I);
    }
    fo_scratch_free(scratch);
    if (Tn == 0) return 0;
    gemm(1, 0, GH, I, TB, dgates, ldg, x, I, 1, (T *)io->dw_ih, I);
    /* dW_hh += dgh^T [h0; out[0:T-1]], split at h0 (a separate buffer) */
    T *dw_hh = (T *)io->dw_hh;
    const int64_t rows_h = mode == FO_GRU_RESET_BEFORE ? 2 * H : GH;  /* rows that see h_prev */
    if (Tn > 1) gemm(1, 0, rows_h, S, TB - B, dgh + B * ldg, ldg, out, S, 1, dw_hh, S);
    if (h0) gemm(1, 0, rows_h, S, B, dgh, ldg, h0, S, 1, dw_hh, S);
    if (mode == FO_GRU_RESET_BEFORE)   /* W_hn sees r*h_prev */
        gemm(1, 0, H, H, TB, dgates + 2 * H, ldg, extra, H, 1, dw_hh + 2 * H * H, H);
    return 0;
}

#undef INLINE
#undef FOR_ROWS
#undef GATE
#undef DGATE
#undef ROW
