/* norm_impl.h -- the batch-norm kernels, written once for both precisions.
 * norm.c includes this file twice, with
 *   T        float or double
 *   SFX(x)   x ## _f32 or x ## _f64
 *
 * Two ways to walk an (outer, C, inner) array (the plan, chosen from the
 * shape alone):
 *   row mode (inner small: (N, C), channels-last): a row of L = C*inner
 *     elements holds every channel; loops run along the row with per-column
 *     arrays (center, coefficients, float64 partial sums), vectorized across
 *     columns. A reduction unit is a run of rows.
 *   segment mode (NCHW with spatial dims): the inner elements of one
 *     (sample, channel) are contiguous; loops run along a segment with
 *     per-channel scalars. The sums of one channel over a run of samples go
 *     into float64 lane accumulators; a reduction unit is such a run for a
 *     chunk of up to FO_NORM_CHUNK channels, read sample by sample in address
 *     order. */

#define INLINE static inline __attribute__((always_inline))

#ifndef FO_NORM_PLAN
#define FO_NORM_PLAN

/* segment mode: channels per reduction unit. Small planes want many: a unit
 * reads one run of CHUNK planes per sample, and each run restarts the
 * prefetcher ((256, 512, 7, 7) backward: 5.8 ms with 64, 4.8 with 512). */
#define FO_NORM_CHUNK 512
#define FO_NORM_ROW_UNIT 65536         /* row mode: elements per reduction unit */
#define FO_NORM_SEG_UNIT 8192          /* segment mode: elements of a channel per run of samples */
#define FO_NORM_SHORT 256              /* segment mode: shorter segments (of 128 bytes or more)
                                          sum across lanes (reduce_short_segment) */
#define FO_NORM_MIN_PER_THREAD 32768   /* below: one thread (a parallel region costs us) */
#define FO_NORM_RUN_BYTES 65536        /* apply pass: runs read in address order (apply_range) */
#define FO_NORM_MAX_PARTIALS ((int64_t)1 << 20)   /* float64 partial sums (8 MB) at most */
/* The apply coefficient arrays (cen, k1, k2, k3) start this many bytes apart
 * beyond their length (rounded up to a line): with W*sizeof(T) a multiple of
 * 4 KiB they would all sit at one offset modulo 4 KiB, and the apply pass's
 * seven streams (x, dy, out and those four) would compete for one 8-way L1
 * set ((256, 1024) float32 backward: ~97 -> ~92 us here). */
#define FO_NORM_SKEW_BYTES 192

typedef struct {
    int64_t outer, C, inner, M;   /* M = outer*inner: elements per channel */
    int row_mode;
    int64_t W;                    /* per-column arrays: L = C*inner (row mode) or C */
    int64_t PW;                   /* row mode: W rounded up to a 64-byte line of float64 */
    int64_t per_unit;             /* rows (row mode) or samples (segment mode) per unit */
    int64_t nblocks;              /* runs of rows / of samples */
    int64_t nchunks;              /* segment mode: chunks of FO_NORM_CHUNK channels */
    int64_t nunits;               /* row mode: nblocks; segment mode: nblocks*nchunks */
    int nthreads;
} fo_norm_plan;

static fo_norm_plan fo_norm_make_plan(int64_t outer, int64_t C, int64_t inner) {
    fo_norm_plan p;
    p.outer = outer; p.C = C; p.inner = inner; p.M = outer * inner;
    int64_t L = C * inner;
    p.row_mode = inner < 16 && L <= 16384;
    p.W = p.row_mode ? L : C;
    /* s2 a line more than 4 KiB multiples after s1: the reduction's float64
     * adds into s2 then do not wait on its stores to s1 (4K aliasing:
     * (256, 1024) float32 training forward 55 -> 52 us here) */
    p.PW = (p.W + 7) / 8 * 8;
    if (p.PW % 512 == 0) p.PW += 8;
    if (p.row_mode) {
        p.per_unit = L >= FO_NORM_ROW_UNIT ? 1 : FO_NORM_ROW_UNIT / (L ? L : 1);
    } else {
        p.per_unit = inner >= FO_NORM_SEG_UNIT ? 1 : FO_NORM_SEG_UNIT / inner;
        /* at least 8 runs of samples where the batch allows, for the threads */
        if (p.per_unit > outer / 8) p.per_unit = outer / 8 > 1 ? outer / 8 : 1;
    }
    /* at most FO_NORM_MAX_PARTIALS partial sums (2 per column or channel per
     * unit): more rows or samples per unit instead of scratch that grows
     * with the input ((4096, 16384) would otherwise ask for 256 MB) */
    int64_t per_block = p.row_mode ? 2 * L : 2 * C;
    int64_t max_blocks = FO_NORM_MAX_PARTIALS / (per_block ? per_block : 1);
    if (max_blocks < 1) max_blocks = 1;
    if ((outer + p.per_unit - 1) / p.per_unit > max_blocks)
        p.per_unit = (outer + max_blocks - 1) / max_blocks;
    p.nblocks = (outer + p.per_unit - 1) / p.per_unit;
    p.nchunks = p.row_mode ? 1 : (C + FO_NORM_CHUNK - 1) / FO_NORM_CHUNK;
    p.nunits = p.nblocks * p.nchunks;
    int64_t nt = fo_get_num_threads();
    int64_t total = outer * L;
    if (nt > total / FO_NORM_MIN_PER_THREAD) nt = total / FO_NORM_MIN_PER_THREAD;
    if (nt < 1) nt = 1;
    p.nthreads = (int)nt;
    return p;
}

#endif /* FO_NORM_PLAN */

/* Everything a pass needs; per-column arrays have plan.W entries. */
typedef struct {
    fo_norm_plan plan;
    const T *x, *dy;
    T *out;
    const double *center;    /* reduction: sums of a*(x - center) */
                             /* (and cen = center as T, for the T partials) */
    double *partial;         /* reduction: 2*W sums per run of rows (row mode), or 2
                                per (run of samples, channel) (segment mode) */
    double *lanes;           /* segment mode: per thread, FO_NORM_CHUNK channels'
                                float64 lane accumulators */
    const T *cen, *k1, *k2, *k3;   /* apply: out = k1*dy + k2*(x - cen) + k3 */
    int64_t head;            /* row mode: the apply's columns before x's first line
                                (row_head; the coefficient arrays wrap past W) */
    int has_x;               /* apply reads x (0: eval backward, dx = k1*dy) */
    int stream;              /* apply through the AVX-512 streaming-store path (mode) */
} SFX(norm_job);

/* ---------------------------------------------------------- reduction */
/* Per channel: s1 = sum(a), s2 = sum(a*u), u = x - center,
 * a = dy (backward) or u (forward statistics). */

INLINE void SFX(reduce_row)(const T *restrict x, const T *restrict dy,
                            const double *restrict center, double *restrict s1,
                            double *restrict s2, int64_t L, const int has_dy) {
    for (int64_t j = 0; j < L; j++) {
        double u = (double)x[j] - center[j];
        double a = has_dy ? (double)dy[j] : u;
        s1[j] += a;
        s2[j] += a * u;
    }
}

/* R rows per pass over s1/s2 (16 or 8 without dy, 8 or 4 with it, as
 * reduce_unit picks; then 4, 1): the R-row partial sums in T (twice the lanes
 * of float64 for float32 data), added to the float64 sums once per pass. The
 * center is a T value (the shift K, or save_mean; read from cen, not converted
 * per row), so x - center is exact for x within a factor 2 of it (Sterbenz)
 * and the partials of a few shifted terms keep T's relative precision.
 * Columns go in blocks of FO_NORM_COLS (256 bytes), each block's R rows read
 * row by row, in address order, with the partials in registers: for
 * channels-last rows of 64 float32 the R rows are then one run that the
 * prefetcher follows; read column-wise they were R runs of four lines, which
 * it did not (the statistics of (32, 56, 56, 64): 2.3 -> 0.9 ms here). */
#ifndef FO_NORM_COLS
#define FO_NORM_COLS ((int64_t)(256 / sizeof(T)))
#endif

/* 64-byte vectors of T and of float64 (GCC vector extensions; unaligned
 * loads through may_alias): written as loops over lanes, GCC left the
 * segment sums scalar (the backward sums of (256, 512, 7, 7) took 15 ms). */
typedef T SFX(vec) __attribute__((vector_size(64), aligned(sizeof(T)), may_alias));
#ifndef FO_NORM_VEC
#define FO_NORM_VEC
typedef double fo_vec_f64 __attribute__((vector_size(64), aligned(8), may_alias));
typedef float fo_half_f32 __attribute__((vector_size(32), aligned(4), may_alias));
#define FO_NORM_LANES 16   /* float64 lane accumulators of a segment sum */
#endif
#define FO_VL ((int64_t)(64 / sizeof(T)))   /* elements of T in a vector */

/* acc[0..VL) += p, in float64. */
INLINE void SFX(add_lanes)(double *restrict acc, SFX(vec) p) {
#if FO_T_IS_F64
    *(fo_vec_f64 *)acc += p;
#else
    *(fo_vec_f64 *)acc += __builtin_convertvector(*(const fo_half_f32 *)&p, fo_vec_f64);
    *(fo_vec_f64 *)(acc + 8) +=
        __builtin_convertvector(*(const fo_half_f32 *)((const float *)&p + 8), fo_vec_f64);
#endif
}

/* The sums of R rows of n columns, rows L apart, through T partials in buf
 * (2n + 48 elements) into s1 and s2. */
INLINE void SFX(reduce_span)(const T *restrict x, const T *restrict dy,
                             const T *restrict cen, double *restrict s1,
                             double *restrict s2, T *buf, int64_t L, int64_t n, const int R,
                             const int has_dy) {
    /* wide rows: p2 not a multiple of 4 KiB after p1 (see FO_NORM_WIDE) */
    T *restrict p1 = buf, *restrict p2 = buf + n + (n > FO_NORM_COLS ? 48 : 0);
    for (int64_t j = 0; j < n; j++) p1[j] = p2[j] = 0;
    for (int k = 0; k < R; k++)
        for (int64_t j = 0; j < n; j++) {
            T u = x[k * L + j] - cen[j];
            T a = has_dy ? dy[k * L + j] : u;
            p1[j] += a;
            p2[j] += a * u;
        }
    for (int64_t j = 0; j < n; j++) {
        s1[j] += (double)p1[j];
        s2[j] += (double)p2[j];
    }
}

/* One vector of a reduction: p1 += a, p2 += a*u with u = x - c, a = dy
 * (backward) or u (forward statistics). */
INLINE void SFX(add_vec)(SFX(vec) *p1, SFX(vec) *p2, const T *x, const T *dy, SFX(vec) c,
                         const int has_dy) {
    SFX(vec) u = *(const SFX(vec) *)x - c;
    SFX(vec) a = has_dy ? *(const SFX(vec) *)dy : u;
    *p1 += a;
    *p2 += a * u;
}

/* A whole block (FO_NORM_COLS columns) of R rows: reduce_span's sums, with
 * the center and the partials in vector registers (as arrays, GCC unrolled
 * the R rows and kept reloading them). */
INLINE void SFX(reduce_block)(const T *restrict x, const T *restrict dy,
                              const T *restrict cen, double *restrict s1,
                              double *restrict s2, int64_t L, const int R, const int has_dy) {
    enum { NV = (int)(FO_NORM_COLS / FO_VL) };
    SFX(vec) c[NV], p1[NV], p2[NV];
    for (int v = 0; v < NV; v++) {
        c[v] = *(const SFX(vec) *)(cen + v * FO_VL);
        p1[v] = p2[v] = (SFX(vec)){0};
    }
    for (int k = 0; k < R; k++)
        for (int v = 0; v < NV; v++) {
            SFX(add_vec)(&p1[v], &p2[v], x + k * L + v * FO_VL,
                         has_dy ? dy + k * L + v * FO_VL : 0, c[v], has_dy);
        }
    for (int v = 0; v < NV; v++) {
        SFX(add_lanes)(s1 + v * FO_VL, p1[v]);
        SFX(add_lanes)(s2 + v * FO_VL, p2[v]);
    }
}

/* Rows wider than a block, up to FO_NORM_WIDE columns, go row after row, in
 * address order (one stream: two rows at a time were slower), with the
 * partials in L1; the two partial arrays must not sit a multiple of 4 KiB
 * apart, or their loads wait on each other's stores (4K aliasing: (N, 256)
 * rows 3.0c -> 2.4c forward, 4.6c -> 2.9c backward, c = a copy of x). */
#ifndef FO_NORM_WIDE
#define FO_NORM_WIDE 512
#endif

INLINE void SFX(reduce_wide)(const T *restrict x, const T *restrict dy,
                             const T *restrict cen, double *restrict s1,
                             double *restrict s2, int64_t L, const int R, const int has_dy) {
    T buf[2 * FO_NORM_WIDE + 48];
    SFX(reduce_span)(x, dy, cen, s1, s2, buf, L, L, R, has_dy);
}

/* Whole blocks of groups of R rows: nblocks blocks from x, rows L apart, the
 * groups R*L apart. A function per (R, has_dy), not inlined: inlined into
 * reduce_unit beside the crossing and segment code, the R row pointers of x
 * and dy went to vector registers and the stack, reloaded per block
 * ((256, 1024) float32 backward sums: 46 -> 40 us here). */
#define FO_NORM_BLOCKS(R, has_dy)                                                           \
    FO_DISPATCH FO_NOINLINE static void SFX(reduce_blocks_##R##_##has_dy)(                 \
        const T *x, const T *dy, const T *cen, double *s1, double *s2, int64_t L,           \
        int64_t ngroups, int64_t nblocks) {                                                 \
        for (int64_t g = 0; g < ngroups; g++)                                               \
            for (int64_t b = 0; b < nblocks; b++) {                                         \
                const int64_t c = b * FO_NORM_COLS, o = g * R * L + c;                      \
                SFX(reduce_block)(x + o, has_dy ? dy + o : 0, cen + c, s1 + c, s2 + c, L,  \
                                  R, has_dy);                                               \
            }                                                                               \
    }
FO_NORM_BLOCKS(16, 0)
FO_NORM_BLOCKS(8, 0)
FO_NORM_BLOCKS(8, 1)
FO_NORM_BLOCKS(4, 0)
FO_NORM_BLOCKS(4, 1)
#undef FO_NORM_BLOCKS

/* Rows wider than FO_NORM_WIDE whose lines do not start at the row's start
 * (head > 0, see row_head): the sums of R rows with every vector load on x's
 * lines, as apply_rows_from_line does. Blocks run from column `head` on; the
 * last block ends with the vector that crosses the row's end, whose lanes from
 * VL - head on hold the next row's first `head` columns. Those columns of the
 * R rows come from the windows of the row above and of rows 0..R-2 (lanes of
 * other rows zeroed), in row order: each column's sums are those of any other
 * offset of x, bit for bit. */
#if FO_T_IS_F64
typedef int64_t SFX(ivec) __attribute__((vector_size(64)));
#else
typedef int32_t SFX(ivec) __attribute__((vector_size(64)));
#endif

#define FO_KEEP_LANES(v, keep) ((__typeof__(v))((__typeof__(keep))(v) & (keep)))

/* *out = p[off..off + VL) where keep is set, 0 elsewhere; a window that
 * leaves the array (in_array 0) is read lane by lane, only where keep is set
 * (off may then be negative). */
INLINE void SFX(window)(SFX(vec) *out, const T *p, int64_t off, const SFX(ivec) *keep,
                        const int in_array) {
    if (in_array) {
        *out = FO_KEEP_LANES(*(const SFX(vec) *)(p + off), *keep);
        return;
    }
    T tmp[FO_VL];
    for (int i = 0; i < FO_VL; i++) tmp[i] = (*keep)[i] ? p[off + i] : 0;
    *out = *(const SFX(vec) *)tmp;
}

/* add_vec over the lanes where keep is set (the others add 0 + 0*0), for the
 * window at x + off (and dy + off). */
INLINE void SFX(add_vec_kept)(SFX(vec) *p1, SFX(vec) *p2, const T *x, const T *dy,
                              int64_t off, SFX(vec) c, const SFX(ivec) *keep,
                              const int in_array, const int has_dy) {
    SFX(vec) u, a;
    SFX(window)(&u, x, off, keep, in_array);
    u = FO_KEEP_LANES(u - c, *keep);
    if (has_dy) SFX(window)(&a, dy, off, keep, in_array);
    else a = u;
    *p1 += a;
    *p2 += a * u;
}

/* s[0..VL) += p's lanes in float64, lanes from `split` on to wrap[0..). */
INLINE void SFX(add_lanes_split)(double *s, double *wrap, SFX(vec) p, int64_t split) {
    double d[FO_VL];
    for (int i = 0; i < FO_VL; i++) d[i] = 0;
    SFX(add_lanes)(d, p);
    for (int64_t i = 0; i < split; i++) s[i] += d[i];
    for (int64_t i = split; i < FO_VL; i++) wrap[i - split] += d[i];
}

/* The last block: NV vectors ending at column L + head, R rows from x (row r;
 * up: row r - 1 exists; down: row r + R exists). */
INLINE void SFX(reduce_block_crossing)(const T *restrict x, const T *restrict dy,
                                       const T *restrict cen, double *restrict s1,
                                       double *restrict s2, int64_t L, int64_t h,
                                       const int NV, const int R, const int up,
                                       const int down, const int has_dy) {
    const int64_t c0 = L + h - NV * FO_VL, last = c0 + (NV - 1) * FO_VL;
    SFX(ivec) lane, wrap, main;
    for (int i = 0; i < FO_VL; i++) lane[i] = i;
    wrap = lane >= (__typeof__(lane[0]))(FO_VL - h);   /* the next row's columns [0, h) */
    main = ~wrap;
    SFX(vec) c[4], p1[4], p2[4];
    for (int v = 0; v < NV; v++) {
        c[v] = *(const SFX(vec) *)(cen + c0 + v * FO_VL);   /* cen wraps past L */
        p1[v] = p2[v] = (SFX(vec)){0};
    }
    /* row 0's first h columns, from the window of the row above */
    SFX(add_vec_kept)(&p1[NV - 1], &p2[NV - 1], x, dy, last - L, c[NV - 1], &wrap, up,
                      has_dy);
    for (int k = 0; k < R; k++)
        for (int v = 0; v < NV; v++) {
            const T *xk = x + k * L + c0 + v * FO_VL;
            const T *dyk = has_dy ? dy + k * L + c0 + v * FO_VL : 0;
            if (v < NV - 1 || k < R - 1)   /* (the last: row k + 1's first columns) */
                SFX(add_vec)(&p1[v], &p2[v], xk, dyk, c[v], has_dy);
            else
                SFX(add_vec_kept)(&p1[v], &p2[v], xk, dyk, 0, c[v], &main, down, has_dy);
        }
    for (int v = 0; v < NV - 1; v++) {
        SFX(add_lanes)(s1 + c0 + v * FO_VL, p1[v]);
        SFX(add_lanes)(s2 + c0 + v * FO_VL, p2[v]);
    }
    SFX(add_lanes_split)(s1 + last, s1, p1[NV - 1], FO_VL - h);
    SFX(add_lanes_split)(s2 + last, s2, p2[NV - 1], FO_VL - h);
}

/* The crossing block of R rows from row r (head > 0, rows wider than
 * FO_NORM_WIDE). */
INLINE void SFX(reduce_crossing)(const SFX(norm_job) *j, int64_t r, double *restrict s1,
                                 double *restrict s2, const int R, const int has_dy) {
    const int64_t L = j->plan.W, h = j->head, rem = L % FO_NORM_COLS;
    const T *x = j->x + r * L, *dy = has_dy ? j->dy + r * L : 0;
    const int up = r > 0, down = r + R < j->plan.outer;
#define CROSS(nv) SFX(reduce_block_crossing)(x, dy, j->cen, s1, s2, L, h, nv, R, up, down, \
                                             has_dy)
    switch ((rem ? rem : FO_NORM_COLS) / FO_VL) {
    case 1: CROSS(1); break;
    case 2: CROSS(2); break;
    case 3: CROSS(3); break;
    default: CROSS(4); break;
    }
#undef CROSS
}

/* The sums of rows [r, r1) in groups of R (row mode); returns the first row
 * left over. Each column's rows add in the same order whatever the path and
 * x's offset: whole blocks of every group first, then the columns that the
 * blocks leave (the crossing block when x's lines start at column `head`, a
 * partial last block), which are other columns. */
INLINE int64_t SFX(reduce_groups)(const SFX(norm_job) *j, int64_t r, int64_t r1,
                                  double *restrict s1, double *restrict s2, const int R,
                                  const int has_dy) {
    const int64_t L = j->plan.W, ng = (r1 - r) / R;
    const T *x = j->x + r * L, *dy = has_dy ? j->dy + r * L : 0;
    if (ng <= 0) return r;
    if (L > FO_NORM_COLS && L <= FO_NORM_WIDE) {
        for (int64_t g = 0; g < ng; g++)
            SFX(reduce_wide)(x + g * R * L, has_dy ? dy + g * R * L : 0, j->cen, s1, s2, L, R,
                             has_dy);
        return r + ng * R;
    }
    const int crossing = j->head && L > FO_NORM_WIDE;
    const int64_t rem = L % FO_NORM_COLS;
    /* whole blocks from column c0: from x's first line when crossing, where
     * the last block (of rem or a whole block's columns) crosses the row's end */
    const int64_t c0 = crossing ? j->head : 0,
                  nblocks = crossing ? (L - (rem ? rem : FO_NORM_COLS)) / FO_NORM_COLS
                                     : L / FO_NORM_COLS;
    const T *xb = x + c0, *dyb = has_dy ? dy + c0 : 0;
    const T *cen = j->cen + c0;
    if (R == 16)   /* (without dy only) */
        SFX(reduce_blocks_16_0)(xb, dyb, cen, s1 + c0, s2 + c0, L, ng, nblocks);
    else if (R == 8 && has_dy)
        SFX(reduce_blocks_8_1)(xb, dyb, cen, s1 + c0, s2 + c0, L, ng, nblocks);
    else if (R == 8)
        SFX(reduce_blocks_8_0)(xb, dyb, cen, s1 + c0, s2 + c0, L, ng, nblocks);
    else if (has_dy)
        SFX(reduce_blocks_4_1)(xb, dyb, cen, s1 + c0, s2 + c0, L, ng, nblocks);
    else
        SFX(reduce_blocks_4_0)(xb, dyb, cen, s1 + c0, s2 + c0, L, ng, nblocks);
    if (crossing) {
        for (int64_t g = 0; g < ng; g++) SFX(reduce_crossing)(j, r + g * R, s1, s2, R, has_dy);
    } else if (rem) {
        T buf[2 * FO_NORM_COLS];   /* the partials of the last, partial block */
        const int64_t jb = L - rem;
        for (int64_t g = 0; g < ng; g++)
            SFX(reduce_span)(x + g * R * L + jb, has_dy ? dy + g * R * L + jb : 0,
                             j->cen + jb, s1 + jb, s2 + jb, buf, L, rem, R, has_dy);
    }
    return r + ng * R;
}

/* Sums of a segment's n elements into the lanes: up to four vectors add up in
 * T (as the row kernels' partials do), then go into the float64 lanes; the
 * tail goes lane by lane in float64. */
INLINE void SFX(reduce_segment)(const T *restrict x, const T *restrict dy, T cen,
                                double *restrict acc1, double *restrict acc2, int64_t n,
                                const int has_dy) {
    SFX(vec) c;
    FO_SPLAT(c, cen);
    int64_t i = 0;
    while (i + FO_VL <= n) {
        SFX(vec) p1 = {0}, p2 = {0};
        for (int k = 0; k < 4 && i + FO_VL <= n; k++, i += FO_VL)
            SFX(add_vec)(&p1, &p2, x + i, has_dy ? dy + i : 0, c, has_dy);
        SFX(add_lanes)(acc1, p1);
        SFX(add_lanes)(acc2, p2);
    }
    for (int l = 0; i < n; i++, l++) {
        double u = (double)(x[i] - cen);
        double a = has_dy ? (double)dy[i] : u;
        acc1[l] += a;
        acc2[l] += a * u;
    }
}

/* The sum of p's lanes, in float64. float32 lanes are first added in pairs
 * in float32 (each then holds at most twice the terms of a vector partial
 * of reduce_segment's, whose four vectors add up in T), so that one
 * conversion serves all: on the AMD EPYC (Zen 4) the training forward of
 * (256, 512, 7, 7) float32 took 0.84-0.85 of the time of converting both
 * halves (1 and 2 threads; forward+backward 0.88-0.90), its statistics pass
 * 1.9 ms instead of 2.6, whose hsums had cost more than reading the data. */
INLINE double SFX(hsum)(SFX(vec) p) {
#if FO_T_IS_F64
    fo_vec_f64 v = p;
#else
    fo_half_f32 f = *(const fo_half_f32 *)&p + *(const fo_half_f32 *)((const float *)&p + 8);
    fo_vec_f64 v = __builtin_convertvector(f, fo_vec_f64);
#endif
    typedef double fo_half_f64 __attribute__((vector_size(32), aligned(8), may_alias));
    fo_half_f64 h = *(const fo_half_f64 *)&v + *(const fo_half_f64 *)((const double *)&v + 4);
    return (h[0] + h[2]) + (h[1] + h[3]);
}

/* reduce_segment for short segments (128 bytes to FO_NORM_SHORT elements:
 * small planes, as in (256, 512, 7, 7)): the T partials of the whole segment,
 * summed across lanes into one float64 pair per channel (*acc1, *acc2).
 * Adding all 16 float64 lanes per segment to the accumulators of a chunk's
 * channels, which live in L2, cost more than reading the data (~90 cycles per
 * 49-element segment here). */
INLINE void SFX(reduce_short_segment)(const T *restrict x, const T *restrict dy, T cen,
                                      double *restrict acc1, double *restrict acc2,
                                      int64_t n, const int has_dy) {
    SFX(vec) c;
    FO_SPLAT(c, cen);
    SFX(vec) p1 = {0}, p2 = {0};
    int64_t i = 0;
    for (; i + FO_VL <= n; i += FO_VL)
        SFX(add_vec)(&p1, &p2, x + i, has_dy ? dy + i : 0, c, has_dy);
    double t1 = SFX(hsum)(p1), t2 = SFX(hsum)(p2);
    for (; i < n; i++) {
        double u = (double)(x[i] - cen);
        double a = has_dy ? (double)dy[i] : u;
        t1 += a;
        t2 += a * u;
    }
    acc1[0] += t1;
    acc2[0] += t2;
}
#undef FO_VL

INLINE void SFX(reduce_unit_impl)(const SFX(norm_job) *j, int64_t unit, int tid,
                                  const int has_dy) {
    const fo_norm_plan *p = &j->plan;
    int64_t L = p->C * p->inner;
    if (p->row_mode) {
        double *s1 = j->partial + unit * 2 * p->PW, *s2 = s1 + p->PW;
        memset(s1, 0, sizeof(double) * 2 * (size_t)p->PW);
        int64_t r0 = unit * p->per_unit;
        int64_t r1 = r0 + p->per_unit < p->outer ? r0 + p->per_unit : p->outer;
        int64_t r = r0;
        /* 8 rows, but with dy only where 8 rows span at most 4 KiB: rows
         * 4 KiB apart (1024 float32 columns) would put the 16 streams of x
         * and dy in one 8-way L1 set. Without dy, rows wider than
         * FO_NORM_WIDE go 16 at a time: half the float64 adds per row
         * (forward of (256, 1024) float32 50 -> 47 us, (64, 4096) 91 -> 89) */
        if (!has_dy && L > FO_NORM_WIDE) r = SFX(reduce_groups)(j, r, r1, s1, s2, 16, 0);
        if (!has_dy || L * (int64_t)sizeof(T) <= 512)
            r = SFX(reduce_groups)(j, r, r1, s1, s2, 8, has_dy);
        r = SFX(reduce_groups)(j, r, r1, s1, s2, 4, has_dy);
        for (; r < r1; r++)
            SFX(reduce_row)(j->x + r * L, has_dy ? j->dy + r * L : 0, j->center,
                            s1, s2, L, has_dy);
    } else {
        /* unit = (run of samples b, chunk of channels g): sample by sample,
         * channel by channel, each channel's segments into its own lanes; then
         * each channel's lanes summed into its partial slot (b, c) */
        int64_t b = unit / p->nchunks, c0 = unit % p->nchunks * FO_NORM_CHUNK;
        int64_t nc = p->C - c0 < FO_NORM_CHUNK ? p->C - c0 : FO_NORM_CHUNK;
        int64_t slab = 2 * FO_NORM_LANES * (p->C < FO_NORM_CHUNK ? p->C : FO_NORM_CHUNK);
        double (*acc)[2][FO_NORM_LANES] =
            (double (*)[2][FO_NORM_LANES])(j->lanes + tid * slab);
        memset(acc, 0, sizeof(double) * 2 * FO_NORM_LANES * (size_t)nc);
        int64_t n0 = b * p->per_unit;
        int64_t n1 = n0 + p->per_unit < p->outer ? n0 + p->per_unit : p->outer;
        /* (two vectors or more: shorter ones, 16 and 25 float32, were slower) */
        const int short_segments =
            p->inner < FO_NORM_SHORT && p->inner * (int64_t)sizeof(T) >= 128;
        /* short segments add into one float64 pair per channel, packed here:
         * in the lanes' layout the pairs sat 256 bytes apart, 1024 lines for
         * 512 channels, more than L1 holds ((16, 512, 7, 7) float32 statistics
         * 104-131 -> 80-88 us) */
        double *short1 = (double *)acc, *short2 = short1 + nc;
        for (int64_t n = n0; n < n1; n++)
            for (int64_t k = 0; k < nc; k++) {
                int64_t off = (n * p->C + c0 + k) * p->inner;
                if (short_segments)
                    SFX(reduce_short_segment)(j->x + off, has_dy ? j->dy + off : 0,
                                              j->cen[c0 + k], short1 + k, short2 + k,
                                              p->inner, has_dy);
                else
                    SFX(reduce_segment)(j->x + off, has_dy ? j->dy + off : 0, j->cen[c0 + k],
                                        acc[k][0], acc[k][1], p->inner, has_dy);
            }
        for (int64_t k = 0; k < nc; k++) {
            double t1 = 0, t2 = 0;
            if (short_segments) {
                t1 = short1[k];
                t2 = short2[k];
            } else {
                for (int l = 0; l < FO_NORM_LANES; l++) {
                    t1 += acc[k][0][l];
                    t2 += acc[k][1][l];
                }
            }
            j->partial[2 * (b * p->C + c0 + k)] = t1;
            j->partial[2 * (b * p->C + c0 + k) + 1] = t2;
        }
    }
}

/* unit `unit` on thread tid (whose lanes it uses in segment mode) */
FO_DISPATCH static void SFX(reduce_unit)(const SFX(norm_job) *j, int64_t unit, int tid) {
    if (j->dy) SFX(reduce_unit_impl)(j, unit, tid, 1);
    else SFX(reduce_unit_impl)(j, unit, tid, 0);
}

/* a1 += s1, a2 += s2 over n entries (restrict: vectorized; as one loop with
 * the general case's index arithmetic it was 1.4 us of a (2, 1024) call). */
INLINE void SFX(add_pairs)(double *restrict a1, double *restrict a2,
                           const double *restrict s1, const double *restrict s2, int64_t n) {
    for (int64_t c = 0; c < n; c++) {
        a1[c] += s1[c];
        a2[c] += s2[c];
    }
}

/* thread t of n: a contiguous range of the units */
static void SFX(reduce_part)(void *vj, int t, int n) {
    const SFX(norm_job) *j = (const SFX(norm_job) *)vj;
    const int64_t nunits = j->plan.nunits;
    for (int64_t u = nunits * t / n; u < nunits * (t + 1) / n; u++) SFX(reduce_unit)(j, u, t);
}

/* Runs every unit (threads take contiguous ranges; each unit writes only its
 * own partial slot), then adds the partials per channel in unit order. */
static void SFX(reduce)(const SFX(norm_job) *j, double *sum1, double *sum2) {
    const fo_norm_plan *p = &j->plan;
    int nt = p->nthreads < p->nunits ? p->nthreads : (int)p->nunits;
    fo_parallel_parts(nt, SFX(reduce_part), (void *)j);
    /* unit-major loops (vectorized over channels); each channel still adds its
     * partials in unit order, then column order within a unit */
    for (int64_t c = 0; c < p->C; c++) sum1[c] = sum2[c] = 0;
    if (p->row_mode) {
        for (int64_t u = 0; u < p->nunits; u++) {
            const double *s1 = j->partial + u * 2 * p->PW, *s2 = s1 + p->PW;
            if (p->inner == 1)   /* (N, C) and channels-last: a vectorized loop */
                SFX(add_pairs)(sum1, sum2, s1, s2, p->C);
            else
                for (int64_t c = 0; c < p->C; c++)
                    for (int64_t q = 0; q < p->inner; q++) {
                        sum1[c] += s1[c * p->inner + q];
                        sum2[c] += s2[c * p->inner + q];
                    }
        }
    } else {
        for (int64_t b = 0; b < p->nblocks; b++)
            for (int64_t c = 0; c < p->C; c++) {
                sum1[c] += j->partial[2 * (b * p->C + c)];
                sum2[c] += j->partial[2 * (b * p->C + c) + 1];
            }
    }
}

/* -------------------------------------------------------------- apply */
/* out = k1*dy + k2*(x - cen) + k3, coefficients per column (row mode; arrays)
 * or per channel (segment mode; scalars). has_x = 0: x is not read (eval
 * backward: dx = k1*dy, and an Inf in x must not turn into NaN). */

INLINE void SFX(apply_cols)(T *restrict out, const T *restrict x, const T *restrict dy,
                            const T *restrict cen, const T *restrict k1,
                            const T *restrict k2, const T *restrict k3, int64_t n,
                            const int has_dy, const int has_x) {
    for (int64_t i = 0; i < n; i++) {
        T v = k3[i];
        if (has_x) v += k2[i] * (x[i] - cen[i]);
        if (has_dy) v += k1[i] * dy[i];
        out[i] = v;
    }
}

INLINE void SFX(apply_scalar)(T *restrict out, const T *restrict x, const T *restrict dy,
                              T cen, T k1, T k2, T k3, int64_t n,
                              const int has_dy, const int has_x) {
    for (int64_t i = 0; i < n; i++) {
        T v = k3;
        if (has_x) v += k2 * (x[i] - cen);
        if (has_dy) v += k1 * dy[i];
        out[i] = v;
    }
}

/* Row / segment `s`. */
INLINE void SFX(apply_span)(const SFX(norm_job) *j, int64_t s, const int has_dy,
                            const int has_x) {
    const fo_norm_plan *p = &j->plan;
    int64_t len = p->row_mode ? p->W : p->inner;
    int64_t off = s * len;
    const T *x = j->x + off, *dy = has_dy ? j->dy + off : 0;
    if (p->row_mode) {
        SFX(apply_cols)(j->out + off, x, dy, j->cen, j->k1, j->k2, j->k3, len, has_dy, has_x);
    } else {
        int64_t c = s % p->C;
        SFX(apply_scalar)(j->out + off, x, dy, j->cen[c], j->k1[c], j->k2[c], j->k3[c], len,
                          has_dy, has_x);
    }
}

#ifdef FO_AVX512
/* The apply pass for outputs too large for the cache: the same formula with
 * streaming stores straight from registers (avx512.h), which GCC-vectorized C
 * cannot emit. Used only when every line's length is a multiple of 16 bytes,
 * so that all streamed pieces stay 16-byte aligned, or for lines written as
 * one run (apply_run_avx512). */
#if FO_T_IS_F64
#define VT __m512d
#define VN 8
#define VLD _mm512_loadu_pd
#define VMLD _mm512_maskz_loadu_pd
#define VSET1 _mm512_set1_pd
#define VSUB _mm512_sub_pd
#define VFMA _mm512_fmadd_pd
#define VBITS _mm512_castpd_si512
#define VMASK __mmask8
#define VBLEND _mm512_mask_blend_pd
#define VMST _mm512_mask_storeu_pd
#else
#define VT __m512
#define VN 16
#define VLD _mm512_loadu_ps
#define VMLD _mm512_maskz_loadu_ps
#define VSET1 _mm512_set1_ps
#define VSUB _mm512_sub_ps
#define VFMA _mm512_fmadd_ps
#define VBITS _mm512_castps_si512
#define VMASK __mmask16
#define VBLEND _mm512_mask_blend_ps
#define VMST _mm512_mask_storeu_ps
#endif

AVX512_TARGET static inline __attribute__((always_inline))
void SFX(apply_line_avx512)(T *out, const T *x, const T *dy, const T *cen, const T *k1,
                            const T *k2, const T *k3, int64_t n, int stream,
                            const int cols, const int has_dy, const int has_x) {
    VT vc = VSET1(cen[0]), v1 = VSET1(k1[0]), v2 = VSET1(k2[0]), v3 = VSET1(k3[0]);
    int64_t i = 0;
    for (; i + VN <= n; i += VN) {
        if (cols) {
            vc = VLD(cen + i); v2 = VLD(k2 + i); v3 = VLD(k3 + i);
            if (has_dy) v1 = VLD(k1 + i);
        }
        VT v = v3;
        if (has_x) v = VFMA(v2, VSUB(VLD(x + i), vc), v);
        if (has_dy) v = VFMA(v1, VLD(dy + i), v);
        fo_store64(out + i, VBITS(v), stream);
    }
    if (i < n) {   /* n - i elements: a multiple of 16 bytes */
        __mmask16 m = (__mmask16)((1u << (n - i)) - 1);
        if (cols) {
            vc = VMLD(m, cen + i); v2 = VMLD(m, k2 + i); v3 = VMLD(m, k3 + i);
            if (has_dy) v1 = VMLD(m, k1 + i);
        }
        VT v = v3;
        if (has_x) v = VFMA(v2, VSUB(VMLD(m, x + i), vc), v);
        if (has_dy) v = VFMA(v1, VMLD(m, dy + i), v);
        fo_store_part16(out + i, VBITS(v), (n - i) * (int64_t)sizeof(T));
    }
}

/* Row mode, rows of NV whole vectors (NV <= 4: channels-last rows of up to
 * 64 float32 channels): the coefficients stay in registers for all the rows
 * of the call; a call per row took ~20% of a (32, 56, 56, 64) apply. */
AVX512_TARGET static inline __attribute__((always_inline))
void SFX(apply_short_rows_avx512)(const SFX(norm_job) *j, int64_t s0, int64_t s1,
                                  const int NV, const int has_dy, const int has_x) {
    const int64_t len = NV * VN;
    const int st = j->stream;
    VT vc[4], v1[4], v2[4], v3[4];
    for (int v = 0; v < NV; v++) {
        vc[v] = VLD(j->cen + v * VN); v1[v] = VLD(j->k1 + v * VN);
        v2[v] = VLD(j->k2 + v * VN); v3[v] = VLD(j->k3 + v * VN);
    }
    for (int64_t s = s0; s < s1; s++) {
        const int64_t off = s * len;
        for (int v = 0; v < NV; v++) {
            VT r = v3[v];
            if (has_x) r = VFMA(v2[v], VSUB(VLD(j->x + off + v * VN), vc[v]), r);
            if (has_dy) r = VFMA(v1[v], VLD(j->dy + off + v * VN), r);
            fo_store64(j->out + off + v * VN, VBITS(r), st);
        }
    }
}

/* One vector of a run (apply_run_avx512): lanes in `next` belong to line c2,
 * the others to line c; m: the lanes to load (the run's last, partial vector). */
AVX512_TARGET static inline __attribute__((always_inline))
VT SFX(run_vector)(const SFX(norm_job) *j, const T *x, const T *dy, int64_t c, int64_t c2,
                   VMASK next, VMASK m, const int has_dy, const int has_x) {
#define COEF(a) VBLEND(next, VSET1(j->a[c]), VSET1(j->a[c2]))
    VT v = COEF(k3);
    if (has_x) v = VFMA(COEF(k2), VSUB(VMLD(m, x), COEF(cen)), v);
    if (has_dy) v = VFMA(COEF(k1), VMLD(m, dy), v);
#undef COEF
    return v;
}

/* Segment mode with lines that are not a multiple of 16 bytes but at least a
 * vector long (7x7 planes: 196 bytes), which apply_line_avx512 cannot stream
 * line by line: the output of lines [s0, s1) is one contiguous run, written
 * as consecutive vectors through the realigning stream writer (avx512.h). A
 * vector spans at most two lines and blends their coefficients by lane. */
AVX512_TARGET static inline __attribute__((always_inline))
void SFX(apply_run_avx512)(const SFX(norm_job) *j, int64_t s0, int64_t s1, const int has_dy,
                           const int has_x) {
    const int64_t len = j->plan.inner, C = j->plan.C, n = (s1 - s0) * len;
    const VMASK all = (VMASK)~(VMASK)0;
    T *out = j->out + s0 * len;
    const T *x = j->x + s0 * len, *dy = has_dy ? j->dy + s0 * len : 0;
    fo_stream_writer w;
    fo_writer_init(&w, out, ((uintptr_t)out & 63) ? 1 : 2);
    int64_t c = s0 % C, r = 0;   /* the line (channel) of element i, and i's offset in it */
    int64_t i = 0;
    for (; i + VN <= n; i += VN) {
        const int64_t c2 = c + 1 == C ? 0 : c + 1;
        const VMASK next = len - r >= VN ? 0 : (VMASK)(all << (len - r));
        fo_writer_put(&w, VBITS(SFX(run_vector)(j, x + i, has_dy ? dy + i : 0, c, c2, next,
                                                 all, has_dy, has_x)));
        r += VN;
        if (r >= len) {
            r -= len;
            c = c2;
        }
    }
    fo_writer_finish(&w);
    if (i < n) {   /* the last n - i < VN elements, within one line: ordinary stores */
        const VMASK m = (VMASK)~(all << (n - i));
        VMST(out + i, m, SFX(run_vector)(j, x + i, has_dy ? dy + i : 0, c, c, 0, m, has_dy,
                                         has_x));
    }
}

AVX512_TARGET static void SFX(apply_lines_avx512)(const SFX(norm_job) *j, int64_t s0,
                                                   int64_t s1) {
    const fo_norm_plan *p = &j->plan;
    int64_t len = p->row_mode ? p->W : p->inner;
    int has_dy = j->dy != 0, has_x = j->has_x, st = j->stream;
    if (!p->row_mode && (len * (int64_t)sizeof(T)) % 16 != 0) {
        if (has_dy && has_x) SFX(apply_run_avx512)(j, s0, s1, 1, 1);
        else if (has_dy) SFX(apply_run_avx512)(j, s0, s1, 1, 0);
        else SFX(apply_run_avx512)(j, s0, s1, 0, 1);
        return;
    }
    if (p->row_mode && len % VN == 0 && len <= 4 * VN) {
#define ROWS(nv) do { \
        if (has_dy && has_x) SFX(apply_short_rows_avx512)(j, s0, s1, nv, 1, 1); \
        else if (has_dy) SFX(apply_short_rows_avx512)(j, s0, s1, nv, 1, 0); \
        else SFX(apply_short_rows_avx512)(j, s0, s1, nv, 0, 1); } while (0)
        switch (len / VN) {
        case 1: ROWS(1); break;
        case 2: ROWS(2); break;
        case 3: ROWS(3); break;
        default: ROWS(4); break;
        }
#undef ROWS
        return;
    }
#define LINE(cols, hd, hx) SFX(apply_line_avx512)(j->out + off, j->x + off, \
        hd ? j->dy + off : 0, j->cen + c, j->k1 + c, j->k2 + c, j->k3 + c, len, st, cols, hd, hx)
    for (int64_t s = s0; s < s1; s++) {
        int64_t off = s * len, c = p->row_mode ? 0 : s % p->C;
        if (p->row_mode) {
            if (has_dy && has_x) LINE(1, 1, 1); else if (has_dy) LINE(1, 1, 0); else LINE(1, 0, 1);
        } else {
            if (has_dy && has_x) LINE(0, 1, 1); else if (has_dy) LINE(0, 1, 0); else LINE(0, 0, 1);
        }
    }
#undef LINE
}
#undef VT
#undef VN
#undef VLD
#undef VMLD
#undef VSET1
#undef VSUB
#undef VFMA
#undef VBITS
#undef VMASK
#undef VBLEND
#undef VMST
#endif

/* Rows [s0, s1) as one run whose vectors start on x's lines (row_head): the
 * first row's `head` columns, then per row W columns from column `head` on, so
 * that a row's last vector ends in the next row; the coefficient arrays repeat
 * their first `head` columns past W. The last row stops at its own end. */
INLINE void SFX(apply_rows_from_line)(const SFX(norm_job) *j, int64_t s0, int64_t s1,
                                      const int has_dy, const int has_x) {
    const int64_t L = j->plan.W, h = j->head;
    const T *x = j->x + s0 * L, *dy = has_dy ? j->dy + s0 * L : 0;
    T *out = j->out + s0 * L;
    SFX(apply_cols)(out, x, dy, j->cen, j->k1, j->k2, j->k3, h, has_dy, has_x);
    for (int64_t s = s0; s < s1; s++) {
        int64_t off = (s - s0) * L + h, n = s + 1 < s1 ? L : L - h;
        SFX(apply_cols)(out + off, x + off, has_dy ? dy + off : 0, j->cen + h, j->k1 + h,
                        j->k2 + h, j->k3 + h, n, has_dy, has_x);
    }
}

/* Lines [s0, s1), a thread's whole share: short lines (channels-last rows of
 * 64) do not pay a call and a dispatch each. */
FO_DISPATCH static void SFX(apply_lines)(const SFX(norm_job) *j, int64_t s0, int64_t s1) {
    int has_dy = j->dy != 0, has_x = j->has_x;
    if (j->head && s0 < s1) {
        if (has_dy && has_x) SFX(apply_rows_from_line)(j, s0, s1, 1, 1);
        else if (has_dy) SFX(apply_rows_from_line)(j, s0, s1, 1, 0);
        else SFX(apply_rows_from_line)(j, s0, s1, 0, 1);
        return;
    }
    for (int64_t s = s0; s < s1; s++) {
        if (has_dy && has_x) SFX(apply_span)(j, s, 1, 1);
        else if (has_dy) SFX(apply_span)(j, s, 1, 0);
        else SFX(apply_span)(j, s, 0, 1);
    }
}

/* Lines [s0, s1) of the apply pass. Unless streamed, they go from the end,
 * in runs of about FO_NORM_RUN_BYTES of x read in address order: the
 * reduction before it read the same lines from the start, so its last ones
 * are still in L2 when the apply begins. Training forward+backward, float32,
 * against address order (Xeon, 2026-11): (256, 1024) 0.90-0.95 of the time
 * at 1 thread, 0.96 at 2; (16, 64, 28, 28) 0.93-0.94, (64, 256, 7, 7)
 * 0.94-0.95. (Streamed outputs are far larger than L2; there runs of 16
 * lines, whatever their length, were up to 1.2 times slower.) */
static void SFX(apply_range)(const SFX(norm_job) *j, int64_t s0, int64_t s1) {
#ifdef FO_AVX512
    if (j->stream) {
        SFX(apply_lines_avx512)(j, s0, s1);
        /* each thread orders its streaming stores before the region's end */
        _mm_sfence();
        return;
    }
#endif
    const int64_t line = (j->plan.row_mode ? j->plan.W : j->plan.inner) * (int64_t)sizeof(T);
    const int64_t run = line > 0 && line < FO_NORM_RUN_BYTES ? FO_NORM_RUN_BYTES / line : 1;
    for (int64_t e = s1; e > s0; e -= run) SFX(apply_lines)(j, e - run > s0 ? e - run : s0, e);
}

/* thread t of n: a contiguous range of the lines */
static void SFX(apply_part)(void *vj, int t, int n) {
    const SFX(norm_job) *j = (const SFX(norm_job) *)vj;
    const int64_t nlines = j->plan.row_mode ? j->plan.outer : j->plan.outer * j->plan.C;
    SFX(apply_range)(j, nlines * t / n, nlines * (t + 1) / n);
}

static void SFX(apply)(const SFX(norm_job) *j) {
    fo_parallel_parts(j->plan.nthreads, SFX(apply_part), (void *)j);
}

/* ------------------------------------------------------------ drivers */

/* Streaming stores for a large output (see avx512.h), when the CPU has
 * AVX-512 and every line starts 16-byte aligned, or, in segment mode, lines
 * are at least 64 bytes long (apply_run_avx512 writes them as one run). */
static int SFX(stream_mode)(const fo_norm_plan *p, const T *out) {
#ifdef FO_AVX512
    int64_t len = p->row_mode ? p->W : p->inner;
    int run = !p->row_mode && len * (int64_t)sizeof(T) >= 64;
    if (((len * (int64_t)sizeof(T)) % 16 != 0 && !run) || !fo_cpu_has_avx512()) return 0;
    int mode = fo_stream_mode(out, p->outer * p->C * p->inner * (int64_t)sizeof(T));
    /* 64-byte stores need every line 64-byte aligned */
    return mode == 2 && (len * (int64_t)sizeof(T)) % 64 != 0 ? 1 : mode;
#else
    (void)p; (void)out;
    return 0;
#endif
}

/* Scratch of one call: partial sums, per-channel float64 sums, the per-column
 * center (float64) and apply coefficients (T). */
typedef struct {
    void *block;
    double *lanes, *partial, *sum1, *sum2, *center;
    T *cen, *k1, *k2, *k3;
} SFX(norm_scratch);

/* Row mode, rows of whole lines (so that every row starts at x's offset within
 * a line), not streamed: the columns before x's first 64-byte line. The apply
 * (apply_rows_from_line) and, for rows wider than FO_NORM_WIDE, the reduction
 * (reduce_groups) run their vectors from there, over per-column arrays
 * that start at x's offset within a line: NumPy's arrays start at any multiple
 * of 16 bytes, and a load split across two lines costs about a second load.
 * (256, 1024) float32, x and the outputs 16 bytes past a line, best of 18000
 * calls here: training forward 57 -> 52.5 us with the apply's, -> 51 with
 * both; backward 93 -> 85 -> 80; with every array on a line, 50 and 80. */
static int64_t SFX(row_head)(const fo_norm_plan *p, const T *x, int stream) {
    if (!p->row_mode || stream || p->W * (int64_t)sizeof(T) % 64 != 0) return 0;
    return (int64_t)((64 - (uintptr_t)x % 64) % 64 / sizeof(T));
}

/* head: the coefficient arrays start `head` elements before a line and have
 * room for `head` more past W (row_head). */
static int SFX(scratch_alloc)(SFX(norm_scratch) *s, const fo_norm_plan *p, int64_t head) {
    int64_t W = p->W, C = p->C;
    int64_t npartial = p->row_mode ? p->nunits * 2 * p->PW : p->nblocks * C * 2;
    int64_t nlanes = p->row_mode ? 0 : (int64_t)p->nthreads * 2 * FO_NORM_LANES *
                                           (C < FO_NORM_CHUNK ? C : FO_NORM_CHUNK);
    const size_t shift = (64 - (size_t)head * sizeof(T)) % 64;
    const size_t d = sizeof(double),
                 coef = (size_t)(W + head) * sizeof(T) + FO_NORM_SKEW_BYTES + shift;
    size_t bytes[9] = {d * (size_t)nlanes, d * (size_t)npartial, d * (size_t)C,
                       d * (size_t)C, d * (size_t)W, coef, coef, coef, coef};
    void *ptr[9];
    s->block = fo_scratch_alloc(bytes, ptr, 9);
    if (!s->block) return -1;
    s->lanes = (double *)ptr[0];
    s->partial = (double *)ptr[1];
    s->sum1 = (double *)ptr[2];
    s->sum2 = (double *)ptr[3];
    s->center = (double *)ptr[4];
    s->cen = (T *)((char *)ptr[5] + shift);
    s->k1 = (T *)((char *)ptr[6] + shift);
    s->k2 = (T *)((char *)ptr[7] + shift);
    s->k3 = (T *)((char *)ptr[8] + shift);
    return 0;
}

/* Row mode: expand per-channel values to the L = C*inner columns of a row. */
static void SFX(expand)(T *col, const fo_norm_plan *p) {
    if (!p->row_mode || p->inner == 1) return;
    for (int64_t c = p->C - 1; c >= 0; c--)
        for (int64_t q = p->inner - 1; q >= 0; q--) col[c * p->inner + q] = col[c];
}

static void SFX(expand_d)(double *col, const fo_norm_plan *p) {
    if (!p->row_mode || p->inner == 1) return;
    for (int64_t c = p->C - 1; c >= 0; c--)
        for (int64_t q = p->inner - 1; q >= 0; q--) col[c * p->inner + q] = col[c];
}

/* Row mode: per-column values expanded to the W columns of a row, with their
 * first `head` columns repeated past W (the passes that start at x's first
 * line read them there: apply_rows_from_line, reduce_block_crossing). */
static void SFX(expand_wrap)(T *col, const fo_norm_plan *p, int64_t head) {
    SFX(expand)(col, p);
    for (int64_t c = 0; c < head; c++) col[p->W + c] = col[c];
}

static void SFX(apply_coefs)(const SFX(norm_scratch) *s, const fo_norm_plan *p,
                             int64_t head) {
    T *arr[4] = {s->cen, s->k1, s->k2, s->k3};
    for (int a = 0; a < 4; a++) SFX(expand_wrap)(arr[a], p, head);
}

/* The shift K of a channel's sums: its first element, or 0 if that is Inf
 * or NaN (an Inf K made the mean NaN where torch's is Inf). */
INLINE T SFX(shift_of)(T first) { return isfinite(first) ? first : (T)0; }

/* Per-channel statistics and apply coefficients, as loops over channels that
 * GCC vectorizes (restrict pointers, every condition outside its loop): as one
 * scalar loop, the divide and square root per channel took 14 us of a
 * (2, 1024) forward, more than its passes over the data.
 * training: mean and biased var from the shifted sums (K = shift_of the
 * channel's first element), running stats updated with the unbiased var;
 * else mean and var are the running stats. Then y = (x - cen)*k2 + k3 with cen = the mean
 * rounded to T (x - cen is then nearly exact; the rounding goes into k3).
 * mean and var come in holding sum1 and sum2 and are overwritten. */
FO_DISPATCH static void SFX(forward_coefs)(
    int64_t C, int64_t M, int64_t inner, const fo_batchnorm_args *a,
    double *restrict mean, double *restrict var, double *restrict scale, const T *restrict x,
    const T *restrict weight, const T *restrict bias, T *restrict save_mean,
    T *restrict save_invstd, T *restrict running_mean, T *restrict running_var,
    T *restrict cen, T *restrict k2, T *restrict k3) {
    const double invM = M ? 1.0 / (double)M : 0.0, mom = a->momentum;
    const double unbias = M > 1 ? (double)M / (double)(M - 1) : 1.0;
    if (a->training) {
        for (int64_t c = 0; c < C; c++) {
            double dm = mean[c] * invM, sq = var[c] * invM;
            /* biased; a sum of squares that overflowed stays Inf (Inf - dm*dm
             * was NaN where torch gives Inf, so y = 0), a NaN stays NaN; an
             * Inf in the data makes the variance NaN, as torch's */
            double v = !isfinite(dm) ? NAN : isinf(sq) ? sq : sq - dm * dm;
            var[c] = v < 0 ? 0 : v;
            mean[c] = (double)SFX(shift_of)(x[c * inner]) + dm;
        }
        if (running_mean)
            for (int64_t c = 0; c < C; c++)
                running_mean[c] = (T)((1.0 - mom) * (double)running_mean[c] + mom * mean[c]);
        if (running_var)
            for (int64_t c = 0; c < C; c++)
                running_var[c] =
                    (T)((1.0 - mom) * (double)running_var[c] + mom * (var[c] * unbias));
    } else {
        for (int64_t c = 0; c < C; c++) {
            mean[c] = (double)running_mean[c];
            var[c] = (double)running_var[c];
        }
    }
    for (int64_t c = 0; c < C; c++) scale[c] = 1.0 / sqrt(var[c] + a->eps);   /* invstd */
    if (save_mean)
        for (int64_t c = 0; c < C; c++) save_mean[c] = (T)mean[c];
    if (save_invstd)
        for (int64_t c = 0; c < C; c++) save_invstd[c] = (T)scale[c];
    if (weight)
        for (int64_t c = 0; c < C; c++) scale[c] *= (double)weight[c];
    for (int64_t c = 0; c < C; c++) {
        T m = (T)mean[c];
        cen[c] = m;
        k2[c] = (T)scale[c];
        var[c] = ((double)m - mean[c]) * scale[c];   /* the shift, before the bias */
    }
    if (bias)
        for (int64_t c = 0; c < C; c++) var[c] += (double)bias[c];
    for (int64_t c = 0; c < C; c++) k3[c] = (T)var[c];
}

/* Backward, per channel: dweight (+)= sum(dy*xhat), dbias (+)= sum(dy), and
 * dx = k1*dy + k2*(x - mean) + k3; training:
 * dx = w*invstd*(dy - mean(dy) - xhat*mean(dy*xhat)), eval: dx = w*invstd*dy.
 * kk is scratch. */
FO_DISPATCH static void SFX(backward_coefs)(
    int64_t C, int64_t M, const fo_batchnorm_backward_args *a,
    const double *restrict sum1, const double *restrict sum2, double *restrict kk,
    const T *restrict save_mean, const T *restrict save_invstd, const T *restrict weight,
    T *restrict dweight, T *restrict dbias, T *restrict cen, T *restrict k1,
    T *restrict k2, T *restrict k3) {
    const double invM = M ? 1.0 / (double)M : 0.0;
    if (dweight) {
        if (a->accumulate)
            for (int64_t c = 0; c < C; c++)
                dweight[c] = (T)((double)dweight[c] + sum2[c] * (double)save_invstd[c]);
        else
            for (int64_t c = 0; c < C; c++)
                dweight[c] = (T)(0.0 + sum2[c] * (double)save_invstd[c]);
    }
    if (dbias) {
        if (a->accumulate)
            for (int64_t c = 0; c < C; c++) dbias[c] = (T)((double)dbias[c] + sum1[c]);
        else
            for (int64_t c = 0; c < C; c++) dbias[c] = (T)(0.0 + sum1[c]);
    }
    if (weight)
        for (int64_t c = 0; c < C; c++) kk[c] = (double)weight[c] * (double)save_invstd[c];
    else
        for (int64_t c = 0; c < C; c++) kk[c] = (double)save_invstd[c];
    const int training = a->training;
    for (int64_t c = 0; c < C; c++) {
        double invstd = (double)save_invstd[c];
        cen[c] = save_mean[c];
        k1[c] = (T)kk[c];
        k2[c] = (T)(-kk[c] * (sum2[c] * invM * invstd * invstd));
        k3[c] = training ? (T)(-kk[c] * (sum1[c] * invM)) : 0;
    }
}

/* A pass's job over the call's scratch (streaming chosen later, per output). */
static SFX(norm_job) SFX(make_job)(const fo_norm_plan *p, const SFX(norm_scratch) *s,
                                   const T *x, const T *dy, T *out, int has_x,
                                   int stream, int64_t head) {
    SFX(norm_job) j;
    memset(&j, 0, sizeof j);
    j.plan = *p;
    j.x = x;
    j.dy = dy;
    j.out = out;
    j.partial = s->partial;
    j.lanes = s->lanes;
    j.center = s->center;
    j.cen = s->cen; j.k1 = s->k1; j.k2 = s->k2; j.k3 = s->k3;
    j.has_x = has_x;
    j.stream = stream;
    j.head = head;
    return j;
}

int SFX(fo_batchnorm_forward)(T *y, T *save_mean, T *save_invstd, T *running_mean,
                              T *running_var, const T *x, const T *weight, const T *bias,
                              int64_t outer, int64_t C, int64_t inner,
                              const fo_batchnorm_args *a) {
    if (outer < 0 || C < 0 || inner < 0) return -2;
    if (!a->training && (!running_mean || !running_var)) return -2;
    if (C == 0) return 0;
    /* an empty inner extent runs as the empty batch (outer 0, inner 1), the
     * same work: planned as it was, the per-column scratch held C*inner = 0
     * entries, and the per-channel setup wrote C past them ((2, 1000, 0): a
     * heap overflow) */
    if (inner == 0) outer = 0, inner = 1;
    fo_norm_plan p = fo_norm_make_plan(outer, C, inner);
    int stream = SFX(stream_mode)(&p, y);
    int64_t head = SFX(row_head)(&p, x, stream);
    SFX(norm_scratch) s;
    if (SFX(scratch_alloc)(&s, &p, head)) return -1;
    int64_t M = p.M;
    for (int64_t c = 0; c < C; c++) {
        s.k1[c] = 0;   /* forward: no dy term */
        if (a->training) {
            s.cen[c] = M ? SFX(shift_of)(x[c * inner]) : 0;   /* the shift K */
            s.center[c] = (double)s.cen[c];
        }
    }
    if (!a->training)
        SFX(forward_coefs)(C, M, inner, a, s.sum1, s.sum2, s.center, x, weight, bias,
                           save_mean, save_invstd, running_mean, running_var, s.cen, s.k2,
                           s.k3);
    SFX(norm_job) j = SFX(make_job)(&p, &s, x, 0, y, 1, stream, head);
    if (a->training && M == 0) {
        /* an empty batch: no statistics, running stats untouched (as torch); the
         * saved ones are 0, so that backward adds 0 to the parameter grads */
        for (int64_t c = 0; c < C; c++) {
            if (save_mean) save_mean[c] = 0;
            if (save_invstd) save_invstd[c] = 0;
        }
    }
    if (a->training && M > 0) {
        SFX(expand_d)(s.center, &p);
        SFX(expand_wrap)(s.cen, &p, head);
        SFX(reduce)(&j, s.sum1, s.sum2);
        SFX(forward_coefs)(C, M, inner, a, s.sum1, s.sum2, s.center, x, weight, bias,
                           save_mean, save_invstd, running_mean, running_var, s.cen, s.k2,
                           s.k3);
    }
    if (M > 0) {
        SFX(apply_coefs)(&s, &p, head);
        SFX(apply)(&j);
    }
    fo_scratch_free(s.block);
    return 0;
}

int SFX(fo_batchnorm_backward)(T *dx, T *dweight, T *dbias, const T *dy, const T *x,
                               const T *save_mean, const T *save_invstd, const T *weight,
                               int64_t outer, int64_t C, int64_t inner,
                               const fo_batchnorm_backward_args *a) {
    if (outer < 0 || C < 0 || inner < 0 || !save_mean || !save_invstd) return -2;
    if (C == 0) return 0;
    if (inner == 0) outer = 0, inner = 1;   /* as in forward */
    fo_norm_plan p = fo_norm_make_plan(outer, C, inner);
    int stream = dx ? SFX(stream_mode)(&p, dx) : 0;
    int64_t head = dx ? SFX(row_head)(&p, x, stream) : 0;
    SFX(norm_scratch) s;
    if (SFX(scratch_alloc)(&s, &p, head)) return -1;
    int64_t M = p.M;
    /* eval: dx = k1*dy, x not read (an Inf there stays out of dx) */
    SFX(norm_job) j = SFX(make_job)(&p, &s, x, dy, dx, a->training, stream, head);
    int need_sums = M > 0 && (a->training || dweight || dbias);
    for (int64_t c = 0; c < C; c++) {
        s.center[c] = (double)save_mean[c];
        s.cen[c] = save_mean[c];
        s.sum1[c] = s.sum2[c] = 0;
    }
    if (need_sums) {
        SFX(expand_d)(s.center, &p);
        SFX(expand_wrap)(s.cen, &p, head);   /* re-expanded after k1..k3 are set below */
        SFX(reduce)(&j, s.sum1, s.sum2);   /* sum(dy), sum(dy*(x - mean)) */
    }
    SFX(backward_coefs)(C, M, a, s.sum1, s.sum2, s.center, save_mean, save_invstd, weight,
                        dweight, dbias, s.cen, s.k1, s.k2, s.k3);
    if (dx && M > 0) {
        SFX(apply_coefs)(&s, &p, head);
        SFX(apply)(&j);
    }
    fo_scratch_free(s.block);
    return 0;
}

#undef INLINE
