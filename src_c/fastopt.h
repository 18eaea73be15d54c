/* fastopt.h -- the public C ABI of fastopt.
 *
 * Plain C99, no Python. Every kernel exists for float32 (_f32) and float64
 * (_f64); counts and indices are int64_t so arrays over 2^31 elements work.
 * Argument order: in-place/output buffers first, const inputs next, then
 * sizes, then a struct of hyperparameters.
 *
 * Optimizer kernels are multi-tensor: each pointer argument is a table of
 * `ntensors` pointers, tensor k having `numel[k]` elements, so that one call
 * updates a whole parameter group. A state table that an option does not use
 * (e.g. max_exp_avg_sq without amsgrad) may be NULL. No two arrays of a call
 * may overlap (params, grads and state are restrict pointers).
 *
 * Threads: kernels split their work over fo_get_num_threads() OpenMP threads
 * (1 when built without OpenMP). Element-wise kernels give bitwise identical
 * results for every thread count; reductions reduce fixed-size blocks in a
 * fixed order so that they do too. The thread count is one process-wide
 * setting; kernels may be called from several threads at once on separate
 * buffers. In a process forked after kernels ran on several threads, every
 * kernel runs on one thread (fo_get_num_threads() returns 1): GNU OpenMP's
 * thread pool does not survive fork(), and a parallel region there would hang.
 *
 * Return codes of the int kernels: 0; -1 when scratch memory cannot be
 * allocated; -2 when the arguments break a rule stated here (nothing is
 * written then). Batch norm and the recurrent layers take their scratch from
 * malloc; each calling thread keeps its largest scratch block of at most 8 MB
 * for its next call, freed when the thread exits.
 */
#ifndef FASTOPT_H
#define FASTOPT_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ---- threads ---------------------------------------------------------- */

void fo_set_num_threads(int n);  /* n < 1 is taken as 1; no upper clamp: n is used as given */
int fo_get_num_threads(void);
int fo_has_openmp(void);         /* 1 when built with OpenMP */

/* dst[0:nbytes] = src[0:nbytes] with the kernels' threads: the copy-bandwidth
 * baseline that the benchmarks measure against. */
void fo_copy(void *dst, const void *src, int64_t nbytes);
/* a[i] += b[i]: the in-place streaming baseline (reads 2 arrays, writes 1 in
 * place, the access pattern of an optimizer step). */
void fo_stream_add_f32(float *a, const float *b, int64_t n);
/* One thread, `rounds` x 384 float32 flops of independent multiply-adds (the
 * compute roof of the GEMM-bound kernels); returns a value to be ignored. */
float fo_fma_peak_f32(int64_t rounds);

/* ---- optimizers -------------------------------------------------------- */
/* Shared gradient preprocessing (PyTorch's order):
 *   g = maximize ? -g : g;  g += weight_decay*p (coupled);  g += l1*sign(p). */

typedef struct {
    double lr, momentum, dampening, weight_decay, l1;
    int nesterov, maximize;
    int first_step;          /* 1 on the first step: momentum_buffer = g */
} fo_sgd_args;

/* SGD: b = first ? g : momentum*b + (1-dampening)*g;
 *      g = nesterov ? g + momentum*b : b;  p -= lr*g.
 * momentum_buffer may be NULL when momentum == 0. */
void fo_sgd_step_f32(float *const *param, float *const *momentum_buffer,
                     const float *const *grad, const int64_t *numel,
                     int64_t ntensors, const fo_sgd_args *a);
void fo_sgd_step_f64(double *const *param, double *const *momentum_buffer,
                     const double *const *grad, const int64_t *numel,
                     int64_t ntensors, const fo_sgd_args *a);

typedef struct {
    double lr, lr_decay, weight_decay, eps, l1;
    int maximize;
    int64_t step;            /* 1-based count of this step */
} fo_adagrad_args;

/* Adagrad: clr = lr/(1+(step-1)*lr_decay); s += g*g; p -= clr*g/(sqrt(s)+eps). */
void fo_adagrad_step_f32(float *const *param, float *const *sum,
                         const float *const *grad, const int64_t *numel,
                         int64_t ntensors, const fo_adagrad_args *a);
void fo_adagrad_step_f64(double *const *param, double *const *sum,
                         const double *const *grad, const int64_t *numel,
                         int64_t ntensors, const fo_adagrad_args *a);

typedef struct {
    double lr, alpha, eps, weight_decay, momentum, l1;
    int centered, nesterov, maximize;
} fo_rmsprop_args;

/* RMSprop: s = alpha*s + (1-alpha)*g*g;
 *   centered: ga = alpha*ga + (1-alpha)*g, avg = sqrt(s - ga*ga) + eps
 *   else      avg = sqrt(s) + eps
 *   momentum > 0: b = momentum*b + g/avg;
 *                 p -= lr*(nesterov ? g/avg + momentum*b : b)
 *   else          p -= lr*g/avg.
 * grad_avg may be NULL unless centered, momentum_buffer unless momentum > 0. */
void fo_rmsprop_step_f32(float *const *param, float *const *square_avg,
                         float *const *grad_avg, float *const *momentum_buffer,
                         const float *const *grad, const int64_t *numel,
                         int64_t ntensors, const fo_rmsprop_args *a);
void fo_rmsprop_step_f64(double *const *param, double *const *square_avg,
                         double *const *grad_avg, double *const *momentum_buffer,
                         const double *const *grad, const int64_t *numel,
                         int64_t ntensors, const fo_rmsprop_args *a);

typedef struct {
    double lr, beta1, beta2, eps, weight_decay, l1;
    int amsgrad, maximize;
    int decoupled;           /* 1 = AdamW: p *= 1 - lr*wd, p -= lr*l1*sign(p) */
    int64_t step;            /* 1-based count of this step (bias corrections) */
} fo_adam_args;

/* Adam: m = b1*m + (1-b1)*g; v = b2*v + (1-b2)*g*g; amsgrad: vmax = max(vmax, v);
 *       denom = sqrt(amsgrad ? vmax : v)/sqrt(1-b2^t) + eps;
 *       p -= lr/(1-b1^t) * m/denom.
 * max_exp_avg_sq may be NULL unless amsgrad. */
void fo_adam_step_f32(float *const *param, float *const *exp_avg,
                      float *const *exp_avg_sq, float *const *max_exp_avg_sq,
                      const float *const *grad, const int64_t *numel,
                      int64_t ntensors, const fo_adam_args *a);
void fo_adam_step_f64(double *const *param, double *const *exp_avg,
                      double *const *exp_avg_sq, double *const *max_exp_avg_sq,
                      const double *const *grad, const int64_t *numel,
                      int64_t ntensors, const fo_adam_args *a);

/* ---- batch normalization (norm.c) ------------------------------------- */
/* Arrays are row-major (outer, C, inner): NCHW (N, C, *spatial) is outer = N,
 * inner = prod(spatial); (N, C) and channels-last (N, *spatial, C) are
 * outer = N*prod(spatial), inner = 1. Statistics of channel c run over its
 * M = outer*inner elements. Per-channel arrays have C entries. Reductions are
 * float64 and bitwise identical for any thread count. Kernels return 0, -1
 * when scratch memory (O(C*inner) plus at most 8 MB of partial sums) cannot be
 * allocated, or -2 for negative sizes. C == 0, outer == 0 or inner == 0 is no
 * work (training with M == 0 sets save_mean and save_invstd to 0 and leaves
 * the running statistics alone). */

typedef struct {
    double eps;
    double momentum;   /* running = (1-momentum)*running + momentum*batch */
    int training;      /* 1: batch statistics; 0: running statistics */
} fo_batchnorm_args;

/* training: mean, var = mean and biased variance of x per channel;
 *   save_mean = mean, save_invstd = 1/sqrt(var + eps);
 *   running_mean and running_var (each may be NULL: not updated) updated with
 *   momentum and the unbiased variance var*M/(M-1) (M == 1: the biased
 *   variance, 0; torch refuses M == 1 in training).
 * eval: mean, var = running_mean, running_var (both required, else -2); save_mean and
 *   save_invstd may be NULL, else they receive the same values as in training.
 * y = (x - mean)*invstd*weight + bias; weight and bias may be NULL (1 and 0). */
int fo_batchnorm_forward_f32(float *y, float *save_mean, float *save_invstd,
                             float *running_mean, float *running_var, const float *x,
                             const float *weight, const float *bias, int64_t outer,
                             int64_t C, int64_t inner, const fo_batchnorm_args *a);
int fo_batchnorm_forward_f64(double *y, double *save_mean, double *save_invstd,
                             double *running_mean, double *running_var, const double *x,
                             const double *weight, const double *bias, int64_t outer,
                             int64_t C, int64_t inner, const fo_batchnorm_args *a);

typedef struct {
    int training;      /* 1: the statistics depended on x (batch stats) */
    int accumulate;    /* 1: dweight += ..., dbias += ...; 0: overwrite */
} fo_batchnorm_backward_args;

/* With xhat = (x - save_mean)*save_invstd:
 *   dweight = sum(dy*xhat), dbias = sum(dy) per channel (either may be NULL);
 *   training: dx = weight*invstd*(dy - mean(dy) - xhat*mean(dy*xhat));
 *   eval:     dx = weight*invstd*dy.
 * dx may be NULL (only parameter gradients); weight NULL means 1; save_mean
 * and save_invstd are required (NULL: -2, nothing written). */
int fo_batchnorm_backward_f32(float *dx, float *dweight, float *dbias, const float *dy,
                              const float *x, const float *save_mean,
                              const float *save_invstd, const float *weight,
                              int64_t outer, int64_t C, int64_t inner,
                              const fo_batchnorm_backward_args *a);
int fo_batchnorm_backward_f64(double *dx, double *dweight, double *dbias, const double *dy,
                              const double *x, const double *save_mean,
                              const double *save_invstd, const double *weight,
                              int64_t outer, int64_t C, int64_t inner,
                              const fo_batchnorm_backward_args *a);

/* ---- dropout and noise (dropout.c, rng.h) ------------------------------ */
/* Random words come from Philox4x32-10 keyed by (seed, offset, element
 * index) (layout in rng.h): the same arguments give the same result for any
 * thread count, and a different offset gives an independent stream (a layer
 * advances it once per call). The mask is bit-packed, ceil(n/8) bytes: bit
 * i % 8 of byte i / 8 is 1 when element i is kept; unused high bits are 0. */

typedef struct {
    double p;          /* drop probability in [0, 1] */
    uint64_t seed, offset;
} fo_dropout_args;

/* y = x * (kept ? 1/(1-p) : 0), P(kept) = 1 - p; p = 0: y = x, p = 1: y = 0*x.
 * mask may be NULL (not stored). y may be x itself (in place; no partial overlap). */
void fo_dropout_forward_f32(float *y, uint8_t *mask, const float *x, int64_t n,
                            const fo_dropout_args *a);
void fo_dropout_forward_f64(double *y, uint8_t *mask, const double *x, int64_t n,
                            const fo_dropout_args *a);

/* dx = dy * (kept ? 1/(1-p) : 0), kept from mask, or when mask is NULL from
 * (seed, offset) regenerated exactly as forward drew it. dx may be dy. */
void fo_dropout_backward_f32(float *dx, const uint8_t *mask, const float *dy, int64_t n,
                             const fo_dropout_args *a);
void fo_dropout_backward_f64(double *dx, const uint8_t *mask, const double *dy, int64_t n,
                             const fo_dropout_args *a);

/* Testing hook: 1 = use the portable code even where the AVX-512 path runs
 * (both give identical results); 0 = choose by CPU (the default). */
void fo_dropout_use_portable(int on);

typedef struct {
    double std;
    uint64_t seed, offset;
} fo_noise_args;

/* y = x + std * z, z ~ N(0, 1) by Box-Muller from the same Philox stream
 * layout. y may be x itself (in place; no partial overlap). */
void fo_gaussian_noise_f32(float *y, const float *x, int64_t n, const fo_noise_args *a);
void fo_gaussian_noise_f64(double *y, const double *x, int64_t n, const fo_noise_args *a);

/* ---- recurrent layers (RNN, LSTM, GRU) --------------------------------- */
/* One layer, one direction, over a whole sequence, forward and backward
 * (backpropagation through time). Layouts are PyTorch's: gate g of a layer
 * with G gates occupies rows [g*H, (g+1)*H) of w_ih (G*H, I), w_hh (G*H, H),
 * b_ih and b_hh (G*H); gate order LSTM i, f, g, o; GRU r, z, n. Sequences are
 * time-major and C-contiguous: x (T, B, I), out (T, B, H).
 *
 * The matrix products come from a BLAS that the caller passes as a row-major
 * gemm callback: the input projection of all T steps is one GEMM, each step
 * does only the recurrent product, and the weight gradients are a few GEMMs
 * over the whole sequence. The pointwise gate math (activations and state
 * update; their derivatives) is one fused pass per step in rnn.c.
 *
 * Data pointers are void * so that one struct serves both precisions: they
 * point to float for the _f32 functions and to double for the _f64 ones. */

typedef enum {
    FO_RNN_TANH = 0,          /* h' = tanh(W_ih x + b_ih + W_hh h + b_hh)            G = 1 */
    FO_RNN_RELU = 1,          /* h' = relu(...)                                        G = 1 */
    FO_LSTM = 2,              /* c' = f*c + i*g, h' = o*tanh(c')                       G = 4 */
    FO_GRU = 3,               /* n = tanh(W_in x + b_in + r*(W_hn h + b_hn)) (torch)   G = 3 */
    FO_GRU_RESET_BEFORE = 4   /* n = tanh(W_in x + b_in + W_hn (r*h) + b_hn) (Cho)    G = 3 */
} fo_rnn_mode;

/* Row-major C = op(A) op(B) + beta*C, op(X) = X^T when trans_X; A is m x k
 * after op, B k x n, C m x n; lda/ldb/ldc are row strides. (cblas_sgemm with
 * CblasRowMajor and alpha = 1.) */
typedef void (*fo_gemm_f32_fn)(int trans_a, int trans_b, int64_t m, int64_t n, int64_t k,
                               const float *a, int64_t lda, const float *b, int64_t ldb,
                               float beta, float *c, int64_t ldc);
typedef void (*fo_gemm_f64_fn)(int trans_a, int trans_b, int64_t m, int64_t n, int64_t k,
                               const double *a, int64_t lda, const double *b, int64_t ldb,
                               double beta, double *c, int64_t ldc);

typedef struct {
    int mode;                        /* fo_rnn_mode */
    int64_t seq_len, batch, input_size, hidden_size;   /* T, B, I, H (I, H >= 1) */
    const void *w_ih, *w_hh;         /* (G*H, I), (G*H, S) with S the state width below */
    const void *b_ih, *b_hh;         /* (G*H) each, or both NULL (bias=False) */
    /* LSTM with projections (torch's proj_size): 0 < P < H, h_t = W_hr (o*tanh(c_t))
     * of width P, and the state width S = P; 0 = none (S = H, w_hr unused). Last,
     * so that initializers written before them leave them 0. */
    int64_t proj_size;
    const void *w_hr;                /* (P, H) */
} fo_rnn_layer;

/* What forward reads and writes; backward reads it back (the saved tensors). */
typedef struct {
    const void *x;                   /* (T, B, I) */
    const void *h0, *c0;             /* (B, S), (B, H) initial state, NULL = zeros; c0: LSTM only */
    void *out;                       /* (T, B, S) OUT: h_t of every step */
    void *c_all;                     /* (T, B, H) OUT, LSTM: c_t of every step; else NULL */
    void *gates;                     /* (T, B, G*H) OUT: activated gates (RNN: scratch) */
    void *extra;                     /* (T, B, H) OUT, GRU: W_hn h + b_hn (reset_after),
                                        r*h (reset before); LSTM with proj_size: o*tanh(c_t)
                                        before the projection; else NULL */
} fo_rnn_forward_io;

typedef struct {
    const void *dout;                /* (T, B, S) gradient of out, or NULL = zeros */
    const void *dh_n, *dc_n;         /* (B, S), (B, H) gradient of the final state, or NULL = zeros */
    void *dx;                        /* (T, B, I) OUT, or NULL: not computed */
    void *dh0, *dc0;                 /* (B, S), (B, H) OUT, or NULL: not stored */
    void *dw_ih, *dw_hh;             /* accumulated: += */
    void *db_ih, *db_hh;             /* accumulated: +=; NULL without bias */
    void *dgates;                    /* (T*B rows, ld_dgates apart) scratch: gate
                                        pre-activation grads */
    void *dgates_hh;                 /* the same shape, scratch for FO_GRU, else NULL */
    void *dw_hr;                     /* accumulated: +=; with proj_size only (last, so that
                                        initializers written before it stay valid) */
    int64_t ld_dgates;               /* row stride of dgates/dgates_hh, >= G*H; 0 = G*H.
                                        fo_rnn_dgates_ld gives the fastest. */
} fo_rnn_backward_io;

/* Forward over the whole sequence. Returns 0; -1 when scratch memory (B*G*H
 * elements, plus about G*H*S for a packed or transposed copy of w_hh when
 * T >= 4) cannot be allocated; -2 for an unknown mode, T or B < 0, I or H < 1,
 * one of b_ih and b_hh without the other, or a proj_size other than 0
 * outside an LSTM (P must be in [1, H) there). */
int fo_rnn_forward_f32(const fo_rnn_layer *layer, const fo_rnn_forward_io *io, fo_gemm_f32_fn gemm);
int fo_rnn_forward_f64(const fo_rnn_layer *layer, const fo_rnn_forward_io *io, fo_gemm_f64_fn gemm);
/* Backward through the whole sequence, newest step first, from the buffers
 * that the matching forward filled. Returns 0, -1 out of memory (scratch of
 * O(B*G*H) elements, plus T*B*P with a projection, plus about G*H*(S + I) for
 * packed copies of w_hh and w_ih when T >= 4), or -2 as forward and for
 * an ld_dgates below G*H (other than 0). */
int fo_rnn_backward_f32(const fo_rnn_layer *layer, const fo_rnn_forward_io *saved,
                        const fo_rnn_backward_io *io, fo_gemm_f32_fn gemm);
int fo_rnn_backward_f64(const fo_rnn_layer *layer, const fo_rnn_forward_io *saved,
                        const fo_rnn_backward_io *io, fo_gemm_f64_fn gemm);
/* Number of gates G of a mode (1, 4 or 3), 0 for an unknown mode. */
int fo_rnn_num_gates(int mode);
/* The row stride for backward's dgates that runs its weight-gradient GEMMs
 * fastest: G*H, or 64 bytes more when rows of G*H elements of elem_size
 * (4 or 8) bytes would be a multiple of 4 KiB apart (rows that far apart share
 * L1 sets: oneDNN's dW = dgates^T x ran 10-18% slower for LSTM H = 256, 512).
 * 0 for an unknown mode or a hidden_size below 1. */
int64_t fo_rnn_dgates_ld(int mode, int64_t hidden_size, int64_t elem_size);

/* Testing hook: 1 = the steps' recurrent products go through the caller's GEMM
 * even where fastopt's packed AVX-512 kernel runs them (results agree to
 * rounding, not bitwise); 0 = choose by CPU (the default). */
void fo_rnn_use_portable(int on);

#ifdef __cplusplus
}
#endif

#endif /* FASTOPT_H */
