/* test_rnn.c -- the recurrent-layer C ABI used with no Python: every mode
 * (RNN tanh/relu, LSTM, GRU with the reset gate after and before W_hn) and
 * the LSTM with a projection (proj_size), float64 and float32, with a naive GEMM as the BLAS callback. Forward is
 * checked against a scalar reference written here from the formulas; backward
 * against central finite differences of that reference. Build and run:
 *   cc -std=c99 -O2 -fopenmp -fno-math-errno -Isrc_c tests/c/test_rnn.c \
 *      (every .c file in src_c) -lm -o test_rnn && ./test_rnn
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fastopt.h"

enum { T = 3, B = 2, I = 3, H = 4, GMAX = 4 };
static int failures = 0;
static int P = 0;   /* the LSTM's proj_size in the test at hand (0: none); h is S wide */
#define S (P ? P : H)

static void check(const char *what, int mode, double got, double want, double rtol) {
    if (!(fabs(got - want) <= rtol * (1.0 + fabs(want)))) {
        printf("FAIL mode %d %s: got %.12g, want %.12g\n", mode, what, got, want);
        failures++;
    }
}

/* Naive row-major C = op(A) op(B) + beta*C, one source for both precisions. */
#define NAIVE_GEMM(T_, NAME)                                                             \
    static void NAME(int ta, int tb, int64_t m, int64_t n, int64_t k, const T_ *a,        \
                     int64_t lda, const T_ *b, int64_t ldb, T_ beta, T_ *c, int64_t ldc) { \
        for (int64_t i = 0; i < m; i++)                                                   \
            for (int64_t j = 0; j < n; j++) {                                             \
                double s = 0;                                                             \
                for (int64_t p = 0; p < k; p++)                                           \
                    s += (double)(ta ? a[p * lda + i] : a[i * lda + p]) *                 \
                         (double)(tb ? b[j * ldb + p] : b[p * ldb + j]);                  \
                c[i * ldc + j] = (T_)(s + (beta != 0 ? (double)beta * c[i * ldc + j] : 0)); \
            }                                                                             \
    }
NAIVE_GEMM(double, gemm_f64)
NAIVE_GEMM(float, gemm_f32)

static double sig(double v) { return 1 / (1 + exp(-v)); }

/* All inputs and parameters of one small layer, in double. */
typedef struct {
    double x[T * B * I], h0[B * H], c0[B * H];
    double w_ih[GMAX * H * I], w_hh[GMAX * H * H], b_ih[GMAX * H], b_hh[GMAX * H];
    double w_hr[H * H];   /* (P, H) */
    double dout[T * B * H], dhn[B * H], dcn[B * H];
} layer_data;

/* The reference forward from the formulas; returns the loss
 * sum(out*dout) + sum(h_T*dhn) (+ sum(c_T*dcn) for the LSTM). With P, the
 * state h = W_hr (o*tanh(c)) is S = P wide (out too). */
static double ref_forward(int mode, const layer_data *d, double *out) {
    double h[B * H], c[B * H], hn[B * H];
    memcpy(h, d->h0, sizeof h);
    memcpy(c, d->c0, sizeof c);
    double loss = 0;
    for (int t = 0; t < T; t++) {
        for (int b = 0; b < B; b++)
            for (int j = 0; j < H; j++) {
                /* pre-activation of gate g: W_i[g] x + b_i[g] and W_h[g] h + b_h[g] */
                double px[GMAX], ph[GMAX];
                for (int g = 0; g < GMAX; g++) {
                    int row = g * H + j;
                    px[g] = ph[g] = 0;
                    if (g >= fo_rnn_num_gates(mode)) continue;
                    px[g] = d->b_ih[row];
                    ph[g] = d->b_hh[row];
                    for (int p = 0; p < I; p++) px[g] += d->w_ih[row * I + p] * d->x[(t * B + b) * I + p];
                    for (int p = 0; p < S; p++) ph[g] += d->w_hh[row * S + p] * h[b * S + p];
                }
                double hp = h[b * S + j], v;
                if (mode == FO_RNN_TANH) v = tanh(px[0] + ph[0]);
                else if (mode == FO_RNN_RELU) v = fmax(px[0] + ph[0], 0);
                else if (mode == FO_LSTM) {
                    double cj = sig(px[1] + ph[1]) * c[b * H + j] + sig(px[0] + ph[0]) * tanh(px[2] + ph[2]);
                    c[b * H + j] = cj;   /* c of unit j only feeds unit j: safe in place */
                    v = sig(px[3] + ph[3]) * tanh(cj);
                } else {
                    double r = sig(px[0] + ph[0]), z = sig(px[1] + ph[1]), n;
                    if (mode == FO_GRU) n = tanh(px[2] + r * ph[2]);
                    else {   /* reset before: W_hn (r*h) + b_hn, r of every unit */
                        n = px[2] + d->b_hh[2 * H + j];
                        double acc = 0;
                        for (int p = 0; p < H; p++) {
                            double pre_r = d->b_ih[p] + d->b_hh[p];
                            for (int q = 0; q < I; q++) pre_r += d->w_ih[p * I + q] * d->x[(t * B + b) * I + q];
                            for (int q = 0; q < H; q++) pre_r += d->w_hh[p * H + q] * h[b * H + q];
                            acc += d->w_hh[(2 * H + j) * H + p] * sig(pre_r) * h[b * H + p];
                        }
                        n = tanh(n + acc);
                    }
                    v = (1 - z) * n + z * hp;
                }
                hn[b * H + j] = v;
            }
        if (P)   /* h = W_hr hn */
            for (int b = 0; b < B; b++)
                for (int q = 0; q < P; q++) {
                    h[b * P + q] = 0;
                    for (int j = 0; j < H; j++) h[b * P + q] += d->w_hr[q * H + j] * hn[b * H + j];
                }
        else
            memcpy(h, hn, sizeof h);
        for (int k = 0; k < B * S; k++) {
            out[t * B * S + k] = h[k];
            loss += h[k] * d->dout[t * B * S + k];
        }
    }
    for (int k = 0; k < B * S; k++) loss += h[k] * d->dhn[k];
    if (mode == FO_LSTM)
        for (int k = 0; k < B * H; k++) loss += c[k] * d->dcn[k];
    return loss;
}

static void fill(double *a, int n, double phase) {
    for (int i = 0; i < n; i++) a[i] = 0.8 * sin(1.7 * i + phase);
}

static void test_mode(int mode) {
    const int G = fo_rnn_num_gates(mode);
    layer_data d;
    memset(&d, 0, sizeof d);
    fill(d.x, T * B * I, 0.1); fill(d.h0, B * H, 0.2); fill(d.c0, B * H, 0.3);
    fill(d.w_ih, G * H * I, 0.4); fill(d.w_hh, G * H * S, 0.5);
    fill(d.b_ih, G * H, 0.6); fill(d.b_hh, G * H, 0.7); fill(d.w_hr, P * H, 1.1);
    fill(d.dout, T * B * H, 0.8); fill(d.dhn, B * H, 0.9); fill(d.dcn, B * H, 1.0);
    double ref_out[T * B * H];
    ref_forward(mode, &d, ref_out);

    /* float64 forward and backward through the C ABI */
    double out[T * B * H], c_all[T * B * H], gates[T * B * GMAX * H], extra[T * B * H];
    fo_rnn_layer L = {mode, T, B, I, H, d.w_ih, d.w_hh, d.b_ih, d.b_hh, P, d.w_hr};
    fo_rnn_forward_io io = {d.x, d.h0, mode == FO_LSTM ? d.c0 : NULL, out,
                            mode == FO_LSTM ? c_all : NULL, gates, G == 3 || P ? extra : NULL};
    if (fo_rnn_forward_f64(&L, &io, gemm_f64)) { printf("FAIL forward rc\n"); failures++; }
    for (int k = 0; k < T * B * S; k++) check("out f64", mode, out[k], ref_out[k], 1e-12);

    double dx[T * B * I], dh0[B * H], dc0[B * H], dgates[T * B * GMAX * H], dgh[T * B * GMAX * H];
    double dw_ih[GMAX * H * I] = {0}, dw_hh[GMAX * H * H] = {0}, db_ih[GMAX * H] = {0},
           db_hh[GMAX * H] = {0}, dw_hr[H * H] = {0};
    fo_rnn_backward_io bw = {d.dout, d.dhn, mode == FO_LSTM ? d.dcn : NULL, dx, dh0,
                             mode == FO_LSTM ? dc0 : NULL, dw_ih, dw_hh, db_ih, db_hh, dgates,
                             mode == FO_GRU ? dgh : NULL, P ? dw_hr : NULL};
    if (fo_rnn_backward_f64(&L, &io, &bw, gemm_f64)) { printf("FAIL backward rc\n"); failures++; }

    /* central differences of the reference loss */
    struct { double *arr, *grad; int n; const char *name; } wrt[] = {
        {d.x, dx, T * B * I, "dx"}, {d.h0, dh0, B * S, "dh0"}, {d.c0, dc0, B * H, "dc0"},
        {d.w_ih, dw_ih, G * H * I, "dw_ih"}, {d.w_hh, dw_hh, G * H * S, "dw_hh"},
        {d.b_ih, db_ih, G * H, "db_ih"}, {d.b_hh, db_hh, G * H, "db_hh"},
        {d.w_hr, dw_hr, P * H, "dw_hr"}};
    double scratch[T * B * H];
    for (size_t w = 0; w < sizeof wrt / sizeof wrt[0]; w++) {
        if (wrt[w].grad == dc0 && mode != FO_LSTM) continue;
        for (int i = 0; i < wrt[w].n; i++) {
            double keep = wrt[w].arr[i], eps = 1e-6;
            wrt[w].arr[i] = keep + eps;
            double up = ref_forward(mode, &d, scratch);
            wrt[w].arr[i] = keep - eps;
            double down = ref_forward(mode, &d, scratch);
            wrt[w].arr[i] = keep;
            check(wrt[w].name, mode, wrt[w].grad[i], (up - down) / (2 * eps), 1e-6);
        }
    }

    /* the same backward with gate-gradient rows 3 elements wider than G*H
     * (ld_dgates): the same gradients */
    enum { LD_MAX = GMAX * H + 3 };
    const int ld = G * H + 3;
    double wdx[T * B * I], wdh0[B * H], wdc0[B * H], wdg[T * B * LD_MAX], wdgh[T * B * LD_MAX];
    double wdw_ih[GMAX * H * I] = {0}, wdw_hh[GMAX * H * H] = {0}, wdb_ih[GMAX * H] = {0},
           wdb_hh[GMAX * H] = {0}, wdw_hr[H * H] = {0};
    fo_rnn_backward_io wbw = {d.dout, d.dhn, mode == FO_LSTM ? d.dcn : NULL, wdx, wdh0,
                              mode == FO_LSTM ? wdc0 : NULL, wdw_ih, wdw_hh, wdb_ih, wdb_hh, wdg,
                              mode == FO_GRU ? wdgh : NULL, P ? wdw_hr : NULL, ld};
    if (fo_rnn_backward_f64(&L, &io, &wbw, gemm_f64)) {
        printf("FAIL wide backward rc\n");
        failures++;
    }
    /* in wrt's order */
    const double *wide[] = {wdx, wdh0, wdc0, wdw_ih, wdw_hh, wdb_ih, wdb_hh, wdw_hr};
    for (size_t w = 0; w < sizeof wrt / sizeof wrt[0]; w++) {
        if (wrt[w].grad == dc0 && mode != FO_LSTM) continue;
        for (int i = 0; i < wrt[w].n; i++)
            check(wrt[w].name, mode, wide[w][i], wrt[w].grad[i], 1e-12);
    }

    /* float32 forward: the same layer, rounded inputs */
    float fx[T * B * I], fh0[B * H], fc0[B * H], fw_ih[GMAX * H * I], fw_hh[GMAX * H * H],
          fb_ih[GMAX * H], fb_hh[GMAX * H], fw_hr[H * H], fout[T * B * H], fc_all[T * B * H],
          fgates[T * B * GMAX * H], fextra[T * B * H];
#define TO_F32(dst, src, n) for (int k = 0; k < (n); k++) (dst)[k] = (float)(src)[k]
    TO_F32(fx, d.x, T * B * I); TO_F32(fh0, d.h0, B * S); TO_F32(fc0, d.c0, B * H);
    TO_F32(fw_ih, d.w_ih, G * H * I); TO_F32(fw_hh, d.w_hh, G * H * S);
    TO_F32(fb_ih, d.b_ih, G * H); TO_F32(fb_hh, d.b_hh, G * H); TO_F32(fw_hr, d.w_hr, P * H);
    fo_rnn_layer Lf = {mode, T, B, I, H, fw_ih, fw_hh, fb_ih, fb_hh, P, fw_hr};
    fo_rnn_forward_io iof = {fx, fh0, mode == FO_LSTM ? fc0 : NULL, fout,
                             mode == FO_LSTM ? fc_all : NULL, fgates, G == 3 || P ? fextra : NULL};
    if (fo_rnn_forward_f32(&Lf, &iof, gemm_f32)) { printf("FAIL forward f32 rc\n"); failures++; }
    for (int k = 0; k < T * B * S; k++) check("out f32", mode, fout[k], ref_out[k], 2e-6);
}

/* Layers that fastopt.h forbids are refused with -2 before anything runs:
 * an unknown mode (it once returned 0 with out unwritten), a projection
 * outside an LSTM (it once overran the state buffers) and one bias without
 * the other (it once read through the NULL one). */
static void test_refused_layers(void) {
    float w[64] = {0}, x[8] = {0}, out[8] = {0}, gates[32] = {0};
    fo_rnn_layer bad_mode = {7, 1, 1, 1, 2, w, w, NULL, NULL, 0, NULL};
    fo_rnn_layer gru_proj = {FO_GRU, 1, 1, 1, 4, w, w, NULL, NULL, 2, w};
    fo_rnn_layer one_bias = {FO_LSTM, 1, 1, 1, 2, w, w, w, NULL, 0, NULL};
    fo_rnn_forward_io io = {x, NULL, NULL, out, NULL, gates, gates};
    fo_rnn_backward_io bio = {0};
    int rcs[6] = {fo_rnn_forward_f32(&bad_mode, &io, gemm_f32),
                  fo_rnn_forward_f32(&gru_proj, &io, gemm_f32),
                  fo_rnn_forward_f32(&one_bias, &io, gemm_f32),
                  fo_rnn_backward_f32(&bad_mode, &io, &bio, gemm_f32),
                  fo_rnn_backward_f32(&gru_proj, &io, &bio, gemm_f32),
                  fo_rnn_backward_f32(&one_bias, &io, &bio, gemm_f32)};
    for (int k = 0; k < 6; k++)
        if (rcs[k] != -2) { printf("FAIL refused layer %d: rc %d\n", k, rcs[k]); failures++; }
    /* gate-gradient rows narrower than G*H */
    fo_rnn_layer rnn = {FO_RNN_TANH, 1, 1, 1, 4, w, w, NULL, NULL, 0, NULL};
    fo_rnn_backward_io narrow = {0};
    narrow.dgates = gates;
    narrow.ld_dgates = 3;
    if (fo_rnn_backward_f32(&rnn, &io, &narrow, gemm_f32) != -2) {
        printf("FAIL ld_dgates below G*H accepted\n");
        failures++;
    }
    /* the stride the layers use: 64 bytes more where rows would be 4 KiB apart */
    struct { int mode; int64_t h, elem, want; } lds[] = {
        {FO_LSTM, 256, 4, 1040}, {FO_LSTM, 255, 4, 1020}, {FO_LSTM, 128, 8, 520},
        {FO_GRU, 1024, 4, 3088}, {FO_RNN_RELU, 100, 4, 100}, {9, 256, 4, 0}, {FO_LSTM, 0, 4, 0}};
    for (size_t k = 0; k < sizeof lds / sizeof lds[0]; k++) {
        int64_t got = fo_rnn_dgates_ld(lds[k].mode, lds[k].h, lds[k].elem);
        if (got != lds[k].want) {
            printf("FAIL fo_rnn_dgates_ld case %zu: %lld, want %lld\n", k, (long long)got,
                   (long long)lds[k].want);
            failures++;
        }
    }
}

int main(void) {
    test_refused_layers();
    for (int nt = 1; nt <= 2; nt++) {
        fo_set_num_threads(nt);
        for (int mode = FO_RNN_TANH; mode <= FO_GRU_RESET_BEFORE; mode++) test_mode(mode);
        P = 2;   /* an LSTM with a projection to 2 of its 4 units */
        test_mode(FO_LSTM);
        P = 0;
    }
    printf("%s: C recurrent-layer tests (OpenMP %s)\n", failures ? "FAILED" : "ok",
           fo_has_openmp() ? "on" : "off");
    return failures != 0;
}
