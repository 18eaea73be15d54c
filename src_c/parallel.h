/* parallel.h -- internal: the one work splitter that every element-wise
 * kernel family uses, the run-time instruction-set dispatch macro, and the
 * kernels' scratch allocator. */
#ifndef FASTOPT_PARALLEL_H
#define FASTOPT_PARALLEL_H

#include <stddef.h>
#include <stdint.h>

/* Process elements [begin, end) of tensor `tensor`. */
typedef void (*fo_chunk_fn)(void *ctx, int64_t tensor, int64_t begin, int64_t end);

/* Calls body over every element of a list of tensors (numel[k] elements each),
 * splitting the concatenated index space into one contiguous, cache-line
 * aligned range per thread. Small jobs run on the calling thread: a parallel
 * region costs microseconds, more than a 10^4-element update. */
/* internal to the library: not exported from a shared object */
#if defined(__GNUC__)
#define FO_INTERNAL __attribute__((visibility("hidden")))
#else
#define FO_INTERNAL
#endif
FO_INTERNAL void fo_parallel_foreach(const int64_t *numel, int64_t ntensors,
                                     fo_chunk_fn body, void *ctx);
/* The same with `grain` elements per thread at least, for kernels that spend
 * much more than a memory pass on an element (the recurrent gate math). */
FO_INTERNAL void fo_parallel_foreach_grain(const int64_t *numel, int64_t ntensors,
                                           fo_chunk_fn body, void *ctx, int64_t grain);

/* body(ctx, t, n) on each thread t of a region of n <= nthreads (the
 * calling thread is t = 0), returning when all are done: the one place that
 * opens a parallel region. */
typedef void (*fo_part_fn)(void *ctx, int t, int n);
FO_INTERNAL void fo_parallel_parts(int nthreads, fo_part_fn body, void *ctx);

/* Whether the optimizer loops prefetch one page ahead (optim_impl.h). Intel's
 * L2 streamer stops at each 4 KiB page, and there the prefetch paid (Adam,
 * Adagrad, RMSprop 4-11% faster on a Xeon); on AMD Zen 4 the same prefetches
 * made all four take 1.3-1.7x the time at 1 thread (bench/page_prefetch.py),
 * and one prefetch per page and array still 1.1-1.2x. So: on Intel x86 CPUs
 * only, unless FASTOPT_PAGE_PREFETCH=0 or 1 says otherwise (read once, at the
 * first optimizer step). */
FO_INTERNAL int fo_prefetch_pages(void);

/* One block of scratch holding n arrays of bytes[i] bytes, each starting on
 * a 64-byte line (at malloc's 16-byte alignment, a vector load splits across
 * two lines; such loads of per-column coefficients made the batch-norm apply
 * pass 1.5x slower), not zeroed. Sets ptr[i]; returns the block for
 * fo_scratch_free, or NULL. */
FO_INTERNAL void *fo_scratch_alloc(const size_t *bytes, void **ptr, int n);
/* Releases a block of fo_scratch_alloc (NULL: none); the calling thread may
 * keep it for its next fo_scratch_alloc (see parallel.c). */
FO_INTERNAL void fo_scratch_free(void *block);

/* Compile a function for baseline x86-64, AVX2+FMA and AVX-512, picked at
 * load time by the CPU (an ifunc), so one build is fast on every x86-64 and
 * never executes an instruction the CPU lacks. clang (14) reads "arch=" as a
 * CPU name, which never matched (every kernel ran its baseline clone here:
 * SGD-momentum 1e6 4.7x slower), so its clones go by feature: "avx2" (no
 * FMA; these loops are memory-bound), not "avx512f", whose RMSprop loop took
 * 2.2x the time of the AVX2 one on the Xeon. */
#if defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define FO_DISPATCH __attribute__((target_clones("default", "avx2")))
#elif defined(__GNUC__) && defined(__x86_64__) && defined(__linux__)
#define FO_DISPATCH __attribute__((target_clones("default", "arch=x86-64-v3", "arch=x86-64-v4")))
#else
#define FO_DISPATCH
#endif
/* clang refuses noinline beside target_clones (and never inlines clones) */
#ifdef __clang__
#define FO_NOINLINE
#else
#define FO_NOINLINE __attribute__((noinline))
#endif

/* vec = v in every lane of a vector-extension variable. Not `(vec_t){0} + v`:
 * with x87 excess precision (32-bit x86, -std=c99) v is long double there, and
 * GCC refuses to narrow it into a vector. */
#define FO_SPLAT(vec, v)                                                          \
    for (int fo_lane = 0; fo_lane < (int)(sizeof(vec) / sizeof((vec)[0])); fo_lane++) \
        (vec)[fo_lane] = (v)

#endif
