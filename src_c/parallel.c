/* parallel.c -- thread count, the shared work splitter, the optimizers'
 * prefetch choice, and the baselines the benchmarks measure against (a
 * threaded copy and stream, the FMA peak). */
#include <stdlib.h>
#include <string.h>
#ifdef __SSE2__
#include <emmintrin.h>
#endif

#include "fastopt.h"
#include "parallel.h"

#ifdef _OPENMP
#include <omp.h>
#endif

/* Below this many elements per thread, an extra thread costs more than it saves
 * (a parallel region is a few microseconds). */
#define FO_MIN_PER_THREAD 32768
/* Split points fall on multiples of 16 elements: whole cache lines for float32. */
#define FO_ALIGN 16

/* Each thread keeps the largest block it released, up to FO_SCRATCH_KEEP
 * bytes, for its next call: a recurrent cell's step (about 1 ms of work here)
 * took 0.8 MB of scratch a call, and when malloc served that from fresh pages
 * (mmap'ed, or a heap top trimmed at each free; its state depends on what the
 * process allocated before) their page faults made the step 1.5x slower at
 * 2 threads, up to 4x in full benchmark runs. A block starts with its usable
 * size; the arrays start on the first 64-byte line after that. */
#define FO_SCRATCH_KEEP ((size_t)8 << 20)
#define FO_SCRATCH_HEAD 64

#if defined(__unix__) || defined(__APPLE__)
#include <pthread.h>
static pthread_key_t fo_scratch_key;
static int fo_scratch_key_ok = 0;
static pthread_once_t fo_scratch_once = PTHREAD_ONCE_INIT;
static void fo_scratch_key_init(void) {
    fo_scratch_key_ok = pthread_key_create(&fo_scratch_key, free) == 0;   /* freed at exit */
}
static void *fo_scratch_kept(void) {
    pthread_once(&fo_scratch_once, fo_scratch_key_init);
    return fo_scratch_key_ok ? pthread_getspecific(fo_scratch_key) : NULL;
}
static int fo_scratch_keep(void *block) {
    return fo_scratch_key_ok && pthread_setspecific(fo_scratch_key, block) == 0;
}
#else
static void *fo_scratch_kept(void) { return NULL; }
static int fo_scratch_keep(void *block) { (void)block; return 0; }
#endif

static size_t fo_scratch_size(const void *block) { return *(const size_t *)block; }

void *fo_scratch_alloc(const size_t *bytes, void **ptr, int n) {
    size_t total = 0;
    for (int i = 0; i < n; i++) total += (bytes[i] + 63) / 64 * 64;
    void *block = fo_scratch_kept();
    if (block && fo_scratch_size(block) >= total) {
        fo_scratch_keep(NULL);
    } else {
        block = malloc(FO_SCRATCH_HEAD + 63 + total);
        if (!block) return NULL;
        *(size_t *)block = total;
    }
    char *p = (char *)(((uintptr_t)block + FO_SCRATCH_HEAD + 63) & ~(uintptr_t)63);
    for (int i = 0; i < n; i++) {
        ptr[i] = p;
        p += (bytes[i] + 63) / 64 * 64;
    }
    return block;
}

void fo_scratch_free(void *block) {
    if (!block) return;
    void *kept = fo_scratch_kept();
    if (fo_scratch_size(block) <= FO_SCRATCH_KEEP &&
        (!kept || fo_scratch_size(kept) < fo_scratch_size(block)) && fo_scratch_keep(block)) {
        free(kept);
        return;
    }
    free(block);
}

/* 0 = not yet set: OpenMP's default. Atomic (relaxed): embedders may call
 * kernels from several threads at once, and the first calls race to set it. */
static int fo_threads = 0;

void fo_set_num_threads(int n) { __atomic_store_n(&fo_threads, n < 1 ? 1 : n, __ATOMIC_RELAXED); }

#if defined(_OPENMP) && (defined(__unix__) || defined(__APPLE__))
#include <pthread.h>
/* GNU OpenMP's thread pool does not survive fork(): a process forked after
 * fastopt ran on several threads (a DataLoader or multiprocessing worker)
 * would wait forever for the parent's threads at its first parallel region.
 * Such a child runs every kernel on one thread. */
static int fo_multithreaded = 0;   /* more than one thread was handed out */
static int fo_forked_child = 0;

static void fo_after_fork_in_child(void) {
    if (__atomic_load_n(&fo_multithreaded, __ATOMIC_RELAXED))
        __atomic_store_n(&fo_forked_child, 1, __ATOMIC_RELAXED);
}

__attribute__((constructor)) static void fo_watch_fork(void) {
    pthread_atfork(0, 0, fo_after_fork_in_child);
}
#define FO_WATCH_FORK 1
#endif

int fo_prefetch_pages(void) {
    static int cached = -1;   /* atomic: first calls may come from several threads */
    int v = __atomic_load_n(&cached, __ATOMIC_RELAXED);
    if (v < 0) {
        const char *env = getenv("FASTOPT_PAGE_PREFETCH");
        if (env && (env[0] == '0' || env[0] == '1') && env[1] == 0) {
            v = env[0] == '1';
        } else {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
            __builtin_cpu_init();
            v = __builtin_cpu_is("intel");
#else
            v = 0;
#endif
        }
        __atomic_store_n(&cached, v, __ATOMIC_RELAXED);
    }
    return v;
}

int fo_get_num_threads(void) {
#ifdef _OPENMP
#ifdef FO_WATCH_FORK
    if (__atomic_load_n(&fo_forked_child, __ATOMIC_RELAXED)) return 1;
#endif
    int n = __atomic_load_n(&fo_threads, __ATOMIC_RELAXED);
    if (n == 0) {
        int zero = 0;
        n = omp_get_max_threads();
        if (!__atomic_compare_exchange_n(&fo_threads, &zero, n, 0, __ATOMIC_RELAXED,
                                         __ATOMIC_RELAXED))
            n = zero;   /* another thread set it first */
    }
#ifdef FO_WATCH_FORK
    if (n > 1) __atomic_store_n(&fo_multithreaded, 1, __ATOMIC_RELAXED);
#endif
    return n;
#else
    return 1;
#endif
}

int fo_has_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

/* ---------------------------------------------------------- parallel parts */

void fo_parallel_parts(int nthreads, fo_part_fn body, void *ctx) {
    if (nthreads <= 1) {   /* no OpenMP region: even a one-thread region costs a futex call */
        body(ctx, 0, 1);
        return;
    }
#ifdef _OPENMP
#pragma omp parallel num_threads(nthreads)
    body(ctx, omp_get_thread_num(), omp_get_num_threads());
#else
    body(ctx, 0, 1);
#endif
}

/* Run body over the global element range [lo, hi) of the concatenated tensors. */
static void run_range(const int64_t *numel, int64_t ntensors, fo_chunk_fn body,
                      void *ctx, int64_t lo, int64_t hi) {
    int64_t base = 0;
    for (int64_t k = 0; k < ntensors && base < hi; k++) {
        int64_t b = lo > base ? lo - base : 0;
        int64_t e = hi - base < numel[k] ? hi - base : numel[k];
        if (b < e) body(ctx, k, b, e);
        base += numel[k];
    }
}

typedef struct {
    const int64_t *numel;
    int64_t ntensors;
    fo_chunk_fn body;
    void *ctx;
    int64_t total;
} foreach_job;

/* one contiguous, cache-line aligned range per thread */
static void foreach_part(void *vjob, int t, int n) {
    const foreach_job *j = (const foreach_job *)vjob;
    int64_t lo = (j->total / n * t) / FO_ALIGN * FO_ALIGN;
    int64_t hi = t == n - 1 ? j->total : (j->total / n * (t + 1)) / FO_ALIGN * FO_ALIGN;
    run_range(j->numel, j->ntensors, j->body, j->ctx, lo, hi);
}

void fo_parallel_foreach(const int64_t *numel, int64_t ntensors,
                         fo_chunk_fn body, void *ctx) {
    fo_parallel_foreach_grain(numel, ntensors, body, ctx, FO_MIN_PER_THREAD);
}

void fo_parallel_foreach_grain(const int64_t *numel, int64_t ntensors,
                               fo_chunk_fn body, void *ctx, int64_t grain) {
    int64_t total = 0;
    for (int64_t k = 0; k < ntensors; k++) total += numel[k];
    if (total == 0) return;
    int64_t nt = fo_get_num_threads();
    if (nt > total / grain) nt = total / grain;
    foreach_job job = {numel, ntensors, body, ctx, total};
    fo_parallel_parts(nt < 1 ? 1 : (int)nt, foreach_part, &job);   /* 1: on this thread */
}

typedef struct { char *dst; const char *src; } copy_ctx;

/* Streaming (non-temporal) stores: the fastest copy measured here, about 1.5x
 * glibc's memcpy on large buffers when measured (rep movsb, on an AMD host). */
static void copy_body(void *c, int64_t tensor, int64_t b, int64_t e) {
    (void)tensor;
    copy_ctx *x = (copy_ctx *)c;
    char *d = x->dst + 4 * b;
    const char *s = x->src + 4 * b;
    int64_t n = 4 * (e - b);
#ifdef __SSE2__
    int64_t head = (int64_t)((16 - ((uintptr_t)d & 15)) & 15);
    if (head > n) head = n;
    memcpy(d, s, (size_t)head);
    int64_t i = head;
    for (; i + 64 <= n; i += 64) {
        __m128i v0 = _mm_loadu_si128((const __m128i *)(s + i));
        __m128i v1 = _mm_loadu_si128((const __m128i *)(s + i + 16));
        __m128i v2 = _mm_loadu_si128((const __m128i *)(s + i + 32));
        __m128i v3 = _mm_loadu_si128((const __m128i *)(s + i + 48));
        _mm_stream_si128((__m128i *)(d + i), v0);
        _mm_stream_si128((__m128i *)(d + i + 16), v1);
        _mm_stream_si128((__m128i *)(d + i + 32), v2);
        _mm_stream_si128((__m128i *)(d + i + 48), v3);
    }
    _mm_sfence();
    memcpy(d + i, s + i, (size_t)(n - i));
#else
    memcpy(d, s, (size_t)n);
#endif
}

void fo_copy(void *dst, const void *src, int64_t nbytes) {
    copy_ctx c = {(char *)dst, (const char *)src};
    /* counted in 4-byte units so that the split matches a float32 kernel's */
    int64_t n4 = nbytes / 4;
    fo_parallel_foreach(&n4, 1, copy_body, &c);
    memcpy(c.dst + n4 * 4, c.src + n4 * 4, (size_t)(nbytes - n4 * 4));
}

typedef struct { float *a; const float *b; } add_ctx;

static void add_body(void *c, int64_t tensor, int64_t lo, int64_t hi) {
    (void)tensor;
    float *restrict a = ((add_ctx *)c)->a;
    const float *restrict b = ((add_ctx *)c)->b;
    for (int64_t i = lo; i < hi; i++) a[i] += b[i];
}

void fo_stream_add_f32(float *a, const float *b, int64_t n) {
    add_ctx c = {a, b};
    fo_parallel_foreach(&n, 1, add_body, &c);
}

typedef float fo_v16f __attribute__((vector_size(64)));

/* 12 independent chains of a = a*b + c on 64-byte vectors, `rounds` times:
 * enough chains to fill both FMA pipes whatever their latency, so the time
 * gives one core's float32 multiply-add peak. Returns a sum of every chain,
 * so that none is optimized away. */
FO_DISPATCH static float fma_peak(int64_t rounds) {
    fo_v16f a[12], b, c;
    FO_SPLAT(b, 0.999999f);
    FO_SPLAT(c, 1e-7f);
    for (int i = 0; i < 12; i++) FO_SPLAT(a[i], (float)i);
    for (int64_t n = 0; n < rounds; n++)
        for (int i = 0; i < 12; i++) a[i] = a[i] * b + c;
    float s = 0;
    for (int i = 0; i < 12; i++)
        for (int l = 0; l < 16; l++) s += a[i][l];
    return s;
}

/* exported apart: clang 14 names an unreferenced target_clones ifunc "f.ifunc" */
float fo_fma_peak_f32(int64_t rounds) { return fma_peak(rounds); }
