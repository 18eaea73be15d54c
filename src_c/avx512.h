/* avx512.h -- internal: the run-time chosen AVX-512 code paths (dropout's RNG,
 * streaming stores of large outputs) and their shared helpers.
 *
 * Functions carry AVX512_TARGET and are only called when have_avx512() says
 * the CPU has AVX-512 F/BW/DQ/VL, so the build needs no -mavx512*.
 * FO_AVX512 is defined where this compiler can build them (GCC or clang, x86-64). */
#ifndef FASTOPT_AVX512_H
#define FASTOPT_AVX512_H

#include <stdint.h>

#if defined(__GNUC__) && defined(__x86_64__)
#define FO_AVX512 1
#include <immintrin.h>
#define AVX512_TARGET __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl")))

static inline int fo_cpu_has_avx512(void) {
    static int cached = -1;   /* atomic: first calls may come from several threads */
    int v = __atomic_load_n(&cached, __ATOMIC_RELAXED);
    if (v < 0) {
        __builtin_cpu_init();
        v = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
            __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
        __atomic_store_n(&cached, v, __ATOMIC_RELAXED);
    }
    return v;
}

/* Large outputs go out with streaming stores, which skip reading each
 * destination line before writing it: measured here, a streaming multiply
 * dx = dy*s over 64 MB runs at copy speed with them and ~25% slower without.
 * Below FO_STREAM_MIN_BYTES the output stays in cache for its next reader.
 * Modes: 2 = 64-byte aligned, one 64-byte store per vector; 1 = 16-byte
 * aligned (what NumPy guarantees), four 16-byte stores; 0 = ordinary stores. */
#ifndef FO_STREAM_MIN_BYTES   /* -D to compare (bench/dropout_reader.py) */
#define FO_STREAM_MIN_BYTES ((int64_t)16 << 20)
#endif

static inline int fo_stream_mode(const void *out, int64_t nbytes) {
    if (nbytes < FO_STREAM_MIN_BYTES) return 0;
    if (((uintptr_t)out & 63) == 0) return 2;
    return ((uintptr_t)out & 15) == 0 ? 1 : 0;
}

AVX512_TARGET static inline void fo_store64(void *dst, __m512i v, int stream) {
    if (stream == 2) {
        _mm512_stream_si512((__m512i *)dst, v);
    } else if (stream == 1) {
        __m128i *d = (__m128i *)dst;
        _mm_stream_si128(d, _mm512_castsi512_si128(v));
        _mm_stream_si128(d + 1, _mm512_extracti32x4_epi32(v, 1));
        _mm_stream_si128(d + 2, _mm512_extracti32x4_epi32(v, 2));
        _mm_stream_si128(d + 3, _mm512_extracti32x4_epi32(v, 3));
    } else {
        _mm512_storeu_si512(dst, v);
    }
}

/* A sequence of 64-byte vectors streamed to consecutive addresses from dst.
 * Mode 1 (dst 16-, 32- or 48-byte aligned) realigns them: each 64-byte line
 * is the end of one vector and the start of the next, stored whole, and the
 * first and last partial lines go out as masked ordinary stores. Four 16-byte
 * streaming stores per vector instead cost dropout 20-25% when the input's
 * alignment differs from the output's (1.6e7 float32 at 1 thread, x 64-byte
 * and y 16-byte aligned: 3.8-3.95 ms, realigned 3.1-3.2; the same offset for
 * both, as NumPy's large arrays have, 3.2-3.3 ms either way). */
typedef struct {
    char *dst;       /* where the next vector's bytes go */
    __m512i prev;    /* mode 1: the last vector, its end not yet stored */
    __m512i idx;     /* mode 1: dword k + i of (prev, next) makes dword i of a line */
    __mmask16 head;  /* mode 1: the dwords of a first vector before the first line */
    __mmask16 tail;  /* mode 1: the dwords of the last vector past the last line */
    int mode, started;
} fo_stream_writer;

AVX512_TARGET static inline void fo_writer_init(fo_stream_writer *w, void *dst, int mode) {
    w->dst = (char *)dst;
    w->mode = mode;
    w->started = 0;
    w->prev = _mm512_setzero_si512();
    int k = (int)((64 - ((uintptr_t)dst & 63)) & 63) / 4;   /* dwords to the first line */
    w->idx = _mm512_add_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13,
                                                14, 15), _mm512_set1_epi32(k));
    w->head = (__mmask16)((1u << k) - 1);
    w->tail = (__mmask16)((1u << (16 - k)) - 1);
}

AVX512_TARGET static inline void fo_writer_put(fo_stream_writer *w, __m512i v) {
    if (w->mode != 1) {
        fo_store64(w->dst, v, w->mode);
    } else {
        if (w->started) {   /* the line from the end of prev to the start of v */
            char *line = (char *)((uintptr_t)w->dst & ~(uintptr_t)63);
            _mm512_stream_si512((__m512i *)line, _mm512_permutex2var_epi32(w->prev, w->idx, v));
        } else {
            _mm512_mask_storeu_epi32(w->dst, w->head, v);
            w->started = 1;
        }
        w->prev = v;
    }
    w->dst += 64;
}

/* Stores what is left (mode 1: the end of the last vector). */
AVX512_TARGET static inline void fo_writer_finish(fo_stream_writer *w) {
    if (w->mode == 1 && w->started) {
        char *line = (char *)((uintptr_t)w->dst & ~(uintptr_t)63);
        _mm512_mask_storeu_epi32(line, w->tail,
                                 _mm512_permutex2var_epi32(w->prev, w->idx,
                                                           _mm512_setzero_si512()));
        w->started = 0;
    }
}

/* The first nbytes (a multiple of 16) of v, streamed (mode 1 or 2 address). */
AVX512_TARGET static inline void fo_store_part16(void *dst, __m512i v, int64_t nbytes) {
    __m128i *d = (__m128i *)dst;
    if (nbytes >= 16) _mm_stream_si128(d, _mm512_castsi512_si128(v));
    if (nbytes >= 32) _mm_stream_si128(d + 1, _mm512_extracti32x4_epi32(v, 1));
    if (nbytes >= 48) _mm_stream_si128(d + 2, _mm512_extracti32x4_epi32(v, 2));
}
#endif

#endif
