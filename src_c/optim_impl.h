/* optim_impl.h -- the optimizer kernels, written once for both precisions.
 * optim.c includes this file twice, with
 *   T        float or double
 *   SFX(x)   x ## _f32 or x ## _f64
 *
 * Each family has: a context struct (pointer tables and per-step scalars,
 * computed once in double by the driver), an inline loop specialized by
 * constant flags for the options that change which arrays are touched (so
 * that every variant is one branch-free, vectorizable pass), a dispatched
 * chunk function, and the public driver. Options that only change arithmetic
 * are selects inside the loop. */

#define SIGN(x) ((T)((x) > 0) - (T)((x) < 0))
/* torch's lerp(a, b, w): a + w*(b - a) for |w| < 0.5, else b + (w - 1)*(b - a),
 * so that w = 1 (beta1 = 0) gives b exactly; coeff is w or w - 1 (in T). */
#define LERP(a, b, coeff, from_end) (((from_end) ? (b) : (a)) + (coeff) * ((b) - (a)))
#define INLINE static inline __attribute__((always_inline))
/* Before each element loop: its arrays never overlap (the binding refuses
 * aliases). GCC takes that from the restrict locals; clang honours restrict
 * only on parameters, and past its budget of run-time overlap checks left
 * RMSprop's five-array loop scalar (2.2x slower at 1e6). */
#ifdef __clang__
#define ELEMENTWISE _Pragma("clang loop vectorize(assume_safety)")
#else
#define ELEMENTWISE
#endif

/* The loops run in blocks of PF_BLOCK elements, each first prefetching the
 * elements of every array that lie one page (PF_AHEAD) further on: the
 * hardware prefetchers stop at each 4 KiB page and restart cold on the next.
 * Interleaved A/B, 1e7 float32 in one array or in 150 tensors, 1 and 2
 * threads (Xeon with AVX-512, 2026-11): Adam, Adagrad and RMSprop took
 * 0.89-0.96 of the time without, SGD-momentum 0.94-0.95 on one array and
 * about the same on 150 tensors; two pages ahead gave nothing, half a page
 * the same as one. On AMD Zen 4 it costs instead (fo_prefetch_pages says
 * where it runs). A block is 1 KiB of each array whatever T: with 256
 * float64 elements (2 KiB, twice the prefetches per burst) Adam 1.6e7 float64
 * took 46.5 ms at 1 thread against 34.8 with 128 (torch fused: 43 ms), Adagrad
 * 28.3 against 26.7; SGD and RMSprop the same. */
#define PF_BLOCK (1024 / (int64_t)sizeof(T))
#define PF_AHEAD (4096 / (int64_t)sizeof(T))
#define PF_ARRAYS 5

/* the lines of [b0, b0 + PF_BLOCK) + PF_AHEAD, short of hi, of each array */
INLINE void SFX(prefetch_ahead)(const T *const *arrays, int64_t b0, int64_t hi) {
    const int64_t end = b0 + PF_BLOCK + PF_AHEAD < hi ? b0 + PF_BLOCK + PF_AHEAD : hi;
    for (int64_t i = b0 + PF_AHEAD; i < end; i += 64 / (int64_t)sizeof(T))
        for (int a = 0; a < PF_ARRAYS; a++)
            if (arrays[a]) __builtin_prefetch(arrays[a] + i);
}

/* STMT for the blocks [b0, b1) of [lo, hi), each after prefetch_ahead of the
 * arrays (NULL: unused) on the CPUs where that pays (fo_prefetch_pages) */
#define IN_BLOCKS(arrays, lo, hi, STMT)                                        \
    do {                                                                      \
        const int prefetch = fo_prefetch_pages();                             \
        for (int64_t b0 = (lo); b0 < (hi); b0 += PF_BLOCK) {                  \
            const int64_t b1 = b0 + PF_BLOCK < (hi) ? b0 + PF_BLOCK : (hi);   \
            if (prefetch) SFX(prefetch_ahead)(arrays, b0, hi);                \
            STMT;                                                             \
        }                                                                     \
    } while (0)

/* ------------------------------------------------------------------ SGD */

typedef struct {
    T *const *p, *const *b;
    const T *const *g;
    T lr, momentum, one_minus_dampening, wd, l1;
    int nesterov, maximize, first_step, has_momentum;
} SFX(sgd_ctx);

INLINE void SFX(sgd_loop)(const SFX(sgd_ctx) *c, int64_t k, int64_t lo, int64_t hi,
                          const int has_momentum) {
    T *restrict p = c->p[k];
    T *restrict b = has_momentum ? c->b[k] : 0;
    const T *restrict g = c->g[k];
    const T lr = c->lr, mom = c->momentum, omd = c->one_minus_dampening;
    const T wd = c->wd, l1 = c->l1;
    const int nesterov = c->nesterov, maximize = c->maximize, first = c->first_step;
    const int has_wd = wd != 0;
    ELEMENTWISE for (int64_t i = lo; i < hi; i++) {
        T pi = p[i];
        T gi = maximize ? -g[i] : g[i];
        gi = has_wd ? gi + wd * pi : gi;   /* select: 0*inf would be NaN */
        gi += l1 * SIGN(pi);
        if (has_momentum) {
            T bi = first ? gi : mom * b[i] + omd * gi;
            b[i] = bi;
            gi = nesterov ? gi + mom * bi : bi;
        }
        p[i] = pi - lr * gi;
    }
}

FO_DISPATCH static void SFX(sgd_chunk)(void *vc, int64_t k, int64_t lo, int64_t hi) {
    const SFX(sgd_ctx) *c = (const SFX(sgd_ctx) *)vc;
    const T *arrays[PF_ARRAYS] = {c->p[k], c->g[k], c->has_momentum ? c->b[k] : NULL};
    IN_BLOCKS(arrays, lo, hi,
              if (c->has_momentum) SFX(sgd_loop)(c, k, b0, b1, 1);
              else SFX(sgd_loop)(c, k, b0, b1, 0));
}

void SFX(fo_sgd_step)(T *const *param, T *const *momentum_buffer,
                      const T *const *grad, const int64_t *numel,
                      int64_t ntensors, const fo_sgd_args *a) {
    SFX(sgd_ctx) c = {param, momentum_buffer, grad,
                      (T)a->lr, (T)a->momentum, (T)(1.0 - a->dampening),
                      (T)a->weight_decay, (T)a->l1,
                      a->nesterov, a->maximize, a->first_step, a->momentum != 0};
    fo_parallel_foreach(numel, ntensors, SFX(sgd_chunk), &c);
}

/* -------------------------------------------------------------- Adagrad */

typedef struct {
    T *const *p, *const *s;
    const T *const *g;
    T clr, wd, l1, eps;
    int maximize;
} SFX(adagrad_ctx);

INLINE void SFX(adagrad_loop)(const SFX(adagrad_ctx) *c, int64_t k, int64_t lo, int64_t hi) {
    T *restrict p = c->p[k];
    T *restrict s = c->s[k];
    const T *restrict g = c->g[k];
    const T clr = c->clr, wd = c->wd, l1 = c->l1, eps = c->eps;
    const int maximize = c->maximize, has_wd = wd != 0;
    ELEMENTWISE for (int64_t i = lo; i < hi; i++) {
        T pi = p[i];
        T gi = maximize ? -g[i] : g[i];
        gi = has_wd ? gi + wd * pi : gi;
        gi += l1 * SIGN(pi);
        T si = s[i] + gi * gi;
        s[i] = si;
        p[i] = pi - clr * (gi / (SQRT(si) + eps));
    }
}

FO_DISPATCH static void SFX(adagrad_chunk)(void *vc, int64_t k, int64_t lo, int64_t hi) {
    const SFX(adagrad_ctx) *c = (const SFX(adagrad_ctx) *)vc;
    const T *arrays[PF_ARRAYS] = {c->p[k], c->s[k], c->g[k]};
    IN_BLOCKS(arrays, lo, hi, SFX(adagrad_loop)(c, k, b0, b1));
}

void SFX(fo_adagrad_step)(T *const *param, T *const *sum, const T *const *grad,
                          const int64_t *numel, int64_t ntensors,
                          const fo_adagrad_args *a) {
    double clr = a->lr / (1.0 + (double)(a->step - 1) * a->lr_decay);
    SFX(adagrad_ctx) c = {param, sum, grad, (T)clr, (T)a->weight_decay, (T)a->l1,
                          (T)a->eps, a->maximize};
    fo_parallel_foreach(numel, ntensors, SFX(adagrad_chunk), &c);
}

/* LERP's scalars for a weight w given in double (torch rounds it to T first) */
static inline int SFX(lerp_from_end)(double w) { return !(fabs((double)(T)w) < 0.5); }
static inline T SFX(lerp_coeff)(double w) {
    return SFX(lerp_from_end)(w) ? (T)w - (T)1 : (T)w;
}

/* -------------------------------------------------------------- RMSprop */

typedef struct {
    T *const *p, *const *s, *const *ga, *const *b;
    const T *const *g;
    T lr, alpha, one_minus_alpha, eps, wd, momentum, l1;
    T lerp_coeff;       /* grad_avg's lerp towards g: 1 - alpha or -alpha (LERP) */
    int lerp_from_end, centered, nesterov, maximize, has_momentum;
} SFX(rmsprop_ctx);

INLINE void SFX(rmsprop_loop)(const SFX(rmsprop_ctx) *c, int64_t k, int64_t lo,
                              int64_t hi, const int centered, const int has_momentum) {
    T *restrict p = c->p[k];
    T *restrict s = c->s[k];
    T *restrict ga = centered ? c->ga[k] : 0;
    T *restrict b = has_momentum ? c->b[k] : 0;
    const T *restrict g = c->g[k];
    const T lr = c->lr, alpha = c->alpha, oma = c->one_minus_alpha, eps = c->eps;
    const T wd = c->wd, mom = c->momentum, l1 = c->l1, lerp_coeff = c->lerp_coeff;
    const int lerp_from_end = c->lerp_from_end;
    const int nesterov = c->nesterov, maximize = c->maximize, has_wd = wd != 0;
    ELEMENTWISE for (int64_t i = lo; i < hi; i++) {
        T pi = p[i];
        T gi = maximize ? -g[i] : g[i];
        gi = has_wd ? gi + wd * pi : gi;
        gi += l1 * SIGN(pi);
        T si = alpha * s[i] + oma * gi * gi;
        s[i] = si;
        T avg;
        if (centered) {
            T gai = LERP(ga[i], gi, lerp_coeff, lerp_from_end);
            ga[i] = gai;
            avg = SQRT(si - gai * gai) + eps;
        } else {
            avg = SQRT(si) + eps;
        }
        T step = gi / avg;
        if (has_momentum) {
            T bi = mom * b[i] + step;
            b[i] = bi;
            step = nesterov ? step + mom * bi : bi;
        }
        p[i] = pi - lr * step;
    }
}

FO_DISPATCH static void SFX(rmsprop_chunk)(void *vc, int64_t k, int64_t lo, int64_t hi) {
    const SFX(rmsprop_ctx) *c = (const SFX(rmsprop_ctx) *)vc;
    const T *arrays[PF_ARRAYS] = {c->p[k], c->s[k], c->g[k], c->centered ? c->ga[k] : NULL,
                                  c->has_momentum ? c->b[k] : NULL};
    IN_BLOCKS(arrays, lo, hi,
              if (c->centered && c->has_momentum) SFX(rmsprop_loop)(c, k, b0, b1, 1, 1);
              else if (c->centered) SFX(rmsprop_loop)(c, k, b0, b1, 1, 0);
              else if (c->has_momentum) SFX(rmsprop_loop)(c, k, b0, b1, 0, 1);
              else SFX(rmsprop_loop)(c, k, b0, b1, 0, 0));
}

void SFX(fo_rmsprop_step)(T *const *param, T *const *square_avg, T *const *grad_avg,
                          T *const *momentum_buffer, const T *const *grad,
                          const int64_t *numel, int64_t ntensors,
                          const fo_rmsprop_args *a) {
    SFX(rmsprop_ctx) c = {param, square_avg, grad_avg, momentum_buffer, grad,
                          (T)a->lr, (T)a->alpha, (T)(1.0 - a->alpha), (T)a->eps,
                          (T)a->weight_decay, (T)a->momentum, (T)a->l1,
                          SFX(lerp_coeff)(1.0 - a->alpha), SFX(lerp_from_end)(1.0 - a->alpha),
                          a->centered, a->nesterov, a->maximize, a->momentum > 0};
    fo_parallel_foreach(numel, ntensors, SFX(rmsprop_chunk), &c);
}

/* ----------------------------------------------------------------- Adam */

typedef struct {
    T *const *p, *const *m, *const *v, *const *vmax;
    const T *const *g;
    T lerp_coeff, beta2, one_minus_beta2, eps, wd, l1;   /* lerp_coeff: m's (LERP) */
    T step_size, inv_bc2_sqrt, decay, lr_l1;
    int lerp_from_end, amsgrad, maximize;
} SFX(adam_ctx);

INLINE void SFX(adam_loop)(const SFX(adam_ctx) *c, int64_t k, int64_t lo, int64_t hi,
                           const int amsgrad) {
    T *restrict p = c->p[k];
    T *restrict m = c->m[k];
    T *restrict v = c->v[k];
    T *restrict vmax = amsgrad ? c->vmax[k] : 0;
    const T *restrict g = c->g[k];
    const T lerp_coeff = c->lerp_coeff, b2 = c->beta2, omb2 = c->one_minus_beta2;
    const T eps = c->eps, wd = c->wd, l1 = c->l1, step_size = c->step_size;
    const T inv_bc2_sqrt = c->inv_bc2_sqrt, decay = c->decay, lr_l1 = c->lr_l1;
    const int maximize = c->maximize, has_wd = wd != 0, lerp_from_end = c->lerp_from_end;
    ELEMENTWISE for (int64_t i = lo; i < hi; i++) {
        T pi = p[i];
        T gi = maximize ? -g[i] : g[i];
        gi = has_wd ? gi + wd * pi : gi;        /* coupled (Adam) only */
        gi += l1 * SIGN(pi);
        pi = pi * decay - lr_l1 * SIGN(pi);     /* decoupled (AdamW); else 1, 0 */
        T mi = LERP(m[i], gi, lerp_coeff, lerp_from_end);
        T vi = b2 * v[i] + omb2 * gi * gi;
        m[i] = mi;
        v[i] = vi;
        if (amsgrad) {
            T vm = vmax[i];
            vm = (vi > vm || vi != vi) ? vi : vm;   /* NaN propagates, as torch.maximum */
            vmax[i] = vm;
            vi = vm;
        }
        T denom = SQRT(vi) * inv_bc2_sqrt + eps;   /* one division per element, not two */
        p[i] = pi - step_size * (mi / denom);
    }
}

FO_DISPATCH static void SFX(adam_chunk)(void *vc, int64_t k, int64_t lo, int64_t hi) {
    const SFX(adam_ctx) *c = (const SFX(adam_ctx) *)vc;
    const T *arrays[PF_ARRAYS] = {c->p[k], c->m[k], c->v[k], c->g[k],
                                  c->amsgrad ? c->vmax[k] : NULL};
    IN_BLOCKS(arrays, lo, hi,
              if (c->amsgrad) SFX(adam_loop)(c, k, b0, b1, 1);
              else SFX(adam_loop)(c, k, b0, b1, 0));
}

void SFX(fo_adam_step)(T *const *param, T *const *exp_avg, T *const *exp_avg_sq,
                       T *const *max_exp_avg_sq, const T *const *grad,
                       const int64_t *numel, int64_t ntensors, const fo_adam_args *a) {
    /* per-step scalars in double, once, outside the element loop */
    double bc1 = 1.0 - pow(a->beta1, (double)a->step);
    double bc2 = 1.0 - pow(a->beta2, (double)a->step);
    int dec = a->decoupled;
    SFX(adam_ctx) c = {param, exp_avg, exp_avg_sq, max_exp_avg_sq, grad,
                       SFX(lerp_coeff)(1.0 - a->beta1), (T)a->beta2, (T)(1.0 - a->beta2),
                       (T)a->eps,
                       dec ? 0 : (T)a->weight_decay, dec ? 0 : (T)a->l1,
                       (T)(a->lr / bc1), (T)(1.0 / sqrt(bc2)),
                       dec ? (T)(1.0 - a->lr * a->weight_decay) : 1,
                       dec ? (T)(a->lr * a->l1) : 0,
                       SFX(lerp_from_end)(1.0 - a->beta1), a->amsgrad, a->maximize};
    fo_parallel_foreach(numel, ntensors, SFX(adam_chunk), &c);
}

#undef SIGN
#undef LERP
#undef INLINE
#undef PF_BLOCK
#undef PF_AHEAD
#undef PF_ARRAYS
#undef IN_BLOCKS
