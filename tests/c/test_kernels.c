/* test_kernels.c -- the C ABI used with no Python: a few steps of every
 * optimizer kernel, float32 and float64, multi-tensor, against a scalar
 * reference written here from the formulas; batch norm and dropout. Build and run (as .ci/run does):
 *   cc -std=c99 -O2 -fopenmp -fno-math-errno -Isrc_c tests/c/test_kernels.c \
 *      (every .c file in src_c) -lm -o test_kernels && ./test_kernels
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#include "fastopt.h"

static int failures = 0;

static void check(const char *what, double got, double want, double rtol) {
    if (!(fabs(got - want) <= rtol * (1.0 + fabs(want)))) {
        printf("FAIL %s: got %.9g, want %.9g\n", what, got, want);
        failures++;
    }
}

static double grad_value(int t, int64_t i) { return sin(0.37 * (double)i + 1.3 * t); }
static double init_value(int64_t i) { return cos(0.11 * (double)i) * 2.0; }

/* Scalar double references, one element. */
static void ref_adam(double *p, double g, double *m, double *v, double *vmax, int t,
                     const fo_adam_args *a) {
    if (a->decoupled) *p *= 1 - a->lr * a->weight_decay;
    else g += a->weight_decay * *p;
    *m = a->beta1 * *m + (1 - a->beta1) * g;
    *v = a->beta2 * *v + (1 - a->beta2) * g * g;
    double vv = *v;
    if (a->amsgrad) { if (*v > *vmax) *vmax = *v; vv = *vmax; }
    double denom = sqrt(vv) / sqrt(1 - pow(a->beta2, t)) + a->eps;
    *p -= a->lr / (1 - pow(a->beta1, t)) * *m / denom;
}

static void ref_sgd(double *p, double g, double *b, int t, const fo_sgd_args *a) {
    g += a->weight_decay * *p;
    *b = t == 1 ? g : a->momentum * *b + (1 - a->dampening) * g;
    g = a->nesterov ? g + a->momentum * *b : *b;
    *p -= a->lr * g;
}

static void ref_adagrad(double *p, double g, double *s, int t, const fo_adagrad_args *a) {
    *s += g * g;
    *p -= a->lr / (1 + (t - 1) * a->lr_decay) * g / (sqrt(*s) + a->eps);
}

static void ref_rmsprop(double *p, double g, double *s, double *ga, double *b,
                        const fo_rmsprop_args *a) {
    *s = a->alpha * *s + (1 - a->alpha) * g * g;
    *ga = a->alpha * *ga + (1 - a->alpha) * g;
    double avg = sqrt(*s - *ga * *ga) + a->eps;
    *b = a->momentum * *b + g / avg;
    *p -= a->lr * *b;
}

#define NT 3
static const int64_t numel[NT] = {1, 1000, 70001};   /* odd sizes: vector tails */

/* One test per precision from one body, as the library itself does. */
#define DEFINE_TEST(T, SFX, RTOL)                                                   \
static void test_##SFX(void) {                                                      \
    T *p[NT], *s1[NT], *s2[NT], *s3[NT], *g[NT];                                    \
    double *rp[NT], *r1[NT], *r2[NT], *r3[NT];                                      \
    for (int opt = 0; opt < 4; opt++) {                                             \
        for (int k = 0; k < NT; k++) {                                              \
            size_t n = (size_t)numel[k];                                            \
            p[k] = malloc(n * sizeof(T)); g[k] = malloc(n * sizeof(T));             \
            s1[k] = calloc(n, sizeof(T)); s2[k] = calloc(n, sizeof(T));             \
            s3[k] = calloc(n, sizeof(T));                                           \
            rp[k] = malloc(n * sizeof(double)); r1[k] = calloc(n, sizeof(double));  \
            r2[k] = calloc(n, sizeof(double)); r3[k] = calloc(n, sizeof(double));   \
            for (int64_t i = 0; i < numel[k]; i++) p[k][i] = (T)(rp[k][i] = init_value(i)); \
        }                                                                           \
        fo_adam_args aa = {1e-2, 0.9, 0.999, 1e-8, 0.1, 0, 1, 0, opt == 3, 0};      \
        fo_sgd_args sa = {1e-2, 0.9, 0.1, 0.01, 0, 1, 0, 0};                        \
        fo_adagrad_args ga = {1e-2, 0.01, 0, 1e-10, 0, 0, 0};                       \
        fo_rmsprop_args ra = {1e-2, 0.9, 1e-8, 0, 0.5, 0, 1, 0, 0};                 \
        for (int t = 1; t <= 5; t++) {                                              \
            for (int k = 0; k < NT; k++)                                            \
                for (int64_t i = 0; i < numel[k]; i++) g[k][i] = (T)grad_value(t, i); \
            if (opt == 0) {                                                         \
                sa.nesterov = 1; sa.dampening = 0; sa.first_step = t == 1;          \
                fo_sgd_step_##SFX(p, s1, (const T *const *)g, numel, NT, &sa);      \
            } else if (opt == 1) {                                                  \
                ga.step = t;                                                        \
                fo_adagrad_step_##SFX(p, s1, (const T *const *)g, numel, NT, &ga);  \
            } else if (opt == 2) {                                                  \
                fo_rmsprop_step_##SFX(p, s1, s2, s3, (const T *const *)g, numel, NT, &ra); \
            } else {                                                                \
                aa.step = t;                                                        \
                fo_adam_step_##SFX(p, s1, s2, s3, (const T *const *)g, numel, NT, &aa); \
            }                                                                       \
            for (int k = 0; k < NT; k++)                                            \
                for (int64_t i = 0; i < numel[k]; i++) {                            \
                    double gi = (T)grad_value(t, i);                                \
                    if (opt == 0) ref_sgd(&rp[k][i], gi, &r1[k][i], t, &sa);        \
                    else if (opt == 1) ref_adagrad(&rp[k][i], gi, &r1[k][i], t, &ga); \
                    else if (opt == 2) ref_rmsprop(&rp[k][i], gi, &r1[k][i], &r2[k][i], &r3[k][i], &ra); \
                    else ref_adam(&rp[k][i], gi, &r1[k][i], &r2[k][i], &r3[k][i], t, &aa); \
                }                                                                   \
        }                                                                           \
        static const char *names[4] = {"sgd-nesterov", "adagrad", "rmsprop-centered-momentum", "adamw-amsgrad"}; \
        char what[96];                                                              \
        for (int k = 0; k < NT; k++) {                                              \
            for (int64_t i = 0; i < numel[k]; i += 1 + numel[k] / 97) {             \
                snprintf(what, sizeof what, "%s %s tensor %d [%lld]", names[opt], #SFX, k, (long long)i); \
                check(what, p[k][i], rp[k][i], RTOL);                               \
            }                                                                       \
            free(p[k]); free(g[k]); free(s1[k]); free(s2[k]); free(s3[k]);          \
            free(rp[k]); free(r1[k]); free(r2[k]); free(r3[k]);                     \
        }                                                                           \
    }                                                                               \
}

DEFINE_TEST(float, f32, 1e-4)
DEFINE_TEST(double, f64, 1e-10)

/* ---- batch norm and dropout -------------------------------------------- */

/* Batch norm on (outer, C, inner) = (5, 3, 7) with a large mean: batch
 * statistics against a two-pass double reference; backward's dbias = sum(dy). */
static void test_batchnorm(void) {
    enum { O = 5, C = 3, I = 7, N = O * C * I };
    float x[N], y[N], dy[N], dx[N], mean[C], invstd[C], rm[C] = {0}, rv[C] = {1, 1, 1};
    float dw[C], db[C];
    for (int i = 0; i < N; i++) {
        x[i] = (float)(1e4 + init_value(i));
        dy[i] = (float)grad_value(1, i);
    }
    fo_batchnorm_args a = {1e-5, 0.1, 1};
    check("batchnorm_forward rc", fo_batchnorm_forward_f32(y, mean, invstd, rm, rv, x, NULL,
                                                           NULL, O, C, I, &a), 0, 0);
    fo_batchnorm_backward_args ba = {1, 0};
    fo_batchnorm_backward_f32(dx, dw, db, dy, x, mean, invstd, NULL, O, C, I, &ba);
    for (int c = 0; c < C; c++) {
        double m = 0, v = 0, ys = 0, yss = 0, sdy = 0;
        for (int o = 0; o < O; o++)
            for (int i = 0; i < I; i++) m += x[(o * C + c) * I + i];
        m /= O * I;
        for (int o = 0; o < O; o++)
            for (int i = 0; i < I; i++) {
                int k = (o * C + c) * I + i;
                v += (x[k] - m) * (x[k] - m);
                ys += y[k];
                yss += (double)y[k] * y[k];
                sdy += dy[k];
            }
        v /= O * I;
        check("batchnorm mean", mean[c], m, 1e-6);
        check("batchnorm invstd", invstd[c], 1 / sqrt(v + 1e-5), 1e-4);
        check("batchnorm running_var", rv[c], 0.9 + 0.1 * v * O * I / (O * I - 1), 1e-4);
        check("batchnorm y mean", ys / (O * I), 0, 1e-4);
        check("batchnorm y var", yss / (O * I), 1, 1e-3);
        check("batchnorm dbias", db[c], sdy, 1e-5);
    }
}

/* Dropout: the Random123 known-answer vector through the documented layout
 * (element e < 4 keeps iff byte e of philox(ctr 0, key seed) word 0 is above
 * the threshold's top 8 bits), p = 0 / 1, and backward from the mask = backward
 * from (seed, offset). */
static void test_dropout(void) {
    enum { N = 1000 };
    static float x[N], y[N], d1[N], d2[N];
    static uint8_t mask[(N + 7) / 8];
    for (int i = 0; i < N; i++) x[i] = (float)init_value(i);
    fo_dropout_args a = {0.5, 0, 0};
    fo_dropout_forward_f32(y, mask, x, N, &a);
    /* philox4x32-10(ctr 0, key 0) word 0 = 0x6627e8d5: bytes d5, e8 > 0x80
     * (kept), 27, 66 < 0x80 (dropped) */
    check("dropout elements 0-3", mask[0] & 15, 3, 0);
    int kept = 0;
    for (int i = 0; i < N; i++) {
        int k = (mask[i / 8] >> (i % 8)) & 1;
        kept += k;
        check("dropout value", y[i], k ? 2.0 * x[i] : 0.0, 1e-7);
    }
    check("dropout keep rate", kept, N / 2, 0.1);
    fo_dropout_backward_f32(d1, mask, x, N, &a);
    fo_dropout_backward_f32(d2, NULL, x, N, &a);
    for (int i = 0; i < N; i++) check("dropout backward", d1[i], d2[i], 0);
    a.p = 0;
    fo_dropout_forward_f32(y, mask, x, N, &a);
    for (int i = 0; i < N; i++) check("dropout p=0", y[i], x[i], 0);
    a.p = 1;
    fo_dropout_forward_f32(y, mask, x, N, &a);
    for (int i = 0; i < N; i++) check("dropout p=1", y[i], 0, 0);
}

/* The header's edge rules: C == 0 is no work (it divided by zero once);
 * running_mean and running_var are each optional in training, both required
 * in eval (-2, nothing written); an empty batch saves zeros; n < 1 threads
 * is taken as 1. */
static void test_edges(void) {
    float x[8] = {1, 2, 3, 4, 5, 6, 7, 8}, y[8] = {0}, sm[2] = {9, 9}, si[2] = {9, 9};
    float rm[2] = {0, 0}, rv[2] = {1, 1};
    fo_batchnorm_args tr = {1e-5, 0.5, 1}, ev = {1e-5, 0.5, 0};
    fo_batchnorm_backward_args ba = {1, 0};
    check("bn C=0 forward", fo_batchnorm_forward_f32(y, sm, si, rm, rv, x, NULL, NULL, 4, 0, 1, &tr), 0, 0);
    check("bn C=0 backward", fo_batchnorm_backward_f32(y, NULL, NULL, x, x, sm, si, NULL, 4, 0, 1, &ba), 0, 0);
    check("bn running_var alone", fo_batchnorm_forward_f32(y, sm, si, NULL, rv, x, NULL, NULL, 4, 2, 1, &tr), 0, 0);
    check("bn running_var updated", rv[0], 0.5 + 0.5 * (20.0 / 3.0), 1e-6);   /* x[::2] = 1,3,5,7 */
    check("bn running_mean untouched", rm[0], 0, 0);
    check("bn eval without running_var", fo_batchnorm_forward_f32(y, NULL, NULL, rm, NULL, x, NULL, NULL, 4, 2, 1, &ev), -2, 0);
    check("bn negative size", fo_batchnorm_forward_f32(y, sm, si, rm, rv, x, NULL, NULL, -1, 2, 1, &tr), -2, 0);
    y[0] = 42;   /* backward needs the saved statistics (it dereferenced NULL once) */
    check("bn backward without save_mean", fo_batchnorm_backward_f32(y, NULL, NULL, x, x, NULL, si, NULL, 4, 2, 1, &ba), -2, 0);
    check("bn backward without save_invstd", fo_batchnorm_backward_f32(y, NULL, NULL, x, x, sm, NULL, NULL, 4, 2, 1, &ba), -2, 0);
    check("bn refused backward wrote nothing", y[0], 42, 0);
    check("bn empty batch", fo_batchnorm_forward_f32(y, sm, si, rm, rv, x, NULL, NULL, 0, 2, 1, &tr), 0, 0);
    check("bn empty batch save_invstd", si[1], 0, 0);
    {   /* (2, C, 0): no elements, like the empty batch; the per-channel setup
         * wrote C entries past scratch sized for C*inner = 0 */
        enum { WIDE = 4096 };
        float *m = calloc(4 * WIDE, sizeof(float));
        float *wsm = m, *wsi = m + WIDE, *wrm = m + 2 * WIDE, *wrv = m + 3 * WIDE;
        for (int c = 0; c < WIDE; c++) wsm[c] = wsi[c] = 9, wrv[c] = 3;
        check("bn inner 0 training", fo_batchnorm_forward_f32(y, wsm, wsi, wrm, wrv, x, NULL, NULL, 2, WIDE, 0, &tr), 0, 0);
        check("bn inner 0 training save_invstd", wsi[WIDE - 1], 0, 0);
        check("bn inner 0 running_var untouched", wrv[WIDE - 1], 3, 0);
        check("bn inner 0 eval", fo_batchnorm_forward_f32(y, wsm, wsi, wrm, wrv, x, NULL, NULL, 2, WIDE, 0, &ev), 0, 0);
        check("bn inner 0 eval save_invstd", wsi[WIDE - 1], 1 / sqrt(3 + 1e-5), 1e-6);
        check("bn inner 0 backward", fo_batchnorm_backward_f32(y, NULL, NULL, x, x, wsm, wsi, NULL, 2, WIDE, 0, &ba), 0, 0);
        free(m);
    }
    int nt = fo_get_num_threads();
    fo_set_num_threads(-5);
    check("threads n < 1", fo_get_num_threads(), 1, 0);
    fo_set_num_threads(nt);
}

int main(void) {
    for (int nt = 1; nt <= 2; nt++) {
        fo_set_num_threads(nt);
        test_f32();
        test_f64();
        test_batchnorm();
        test_dropout();
        test_edges();
    }
    printf("%s: C kernel tests (OpenMP %s)\n", failures ? "FAILED" : "ok",
           fo_has_openmp() ? "on" : "off");
    return failures != 0;
}
