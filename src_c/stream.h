/* stream.h -- internal: copy a small buffer that a kernel just computed (in
 * L1) to its destination with non-temporal stores.
 *
 * Why: an ordinary store to a line that is not in cache first reads the line
 * (read-for-ownership), so a kernel writing a large output moves 3 bytes for
 * every 2 a copy moves. Streaming stores skip that read. They pay only when
 * the output does not fit in cache anyway, so kernels use them above
 * FO_STREAM_MIN_BYTES. GCC's vectorizer never emits them, hence the
 * compute-into-a-tile-then-stream pattern. SSE2 (baseline x86-64) stores are
 * used in every target_clones variant: 16-byte streaming stores fill whole
 * lines in the write-combining buffers as fast as wider ones (fo_copy, the
 * bandwidth baseline, uses the same). */
#ifndef FASTOPT_STREAM_H
#define FASTOPT_STREAM_H

#include <stdint.h>
#include <string.h>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

/* outputs at least this large are written with streaming stores */
#define FO_STREAM_MIN_BYTES ((int64_t)16 << 20)
/* elements of a tile computed in L1 before it is streamed out */
#define FO_TILE 1024

static inline void fo_stream_store(void *dst, const void *src, int64_t nbytes) {
#if defined(__SSE2__)
    char *d = (char *)dst;
    const char *s = (const char *)src;
    int64_t head = (int64_t)((16 - ((uintptr_t)d & 15)) & 15);
    if (head > nbytes) head = nbytes;
    memcpy(d, s, (size_t)head);
    int64_t i = head;
    for (; i + 64 <= nbytes; i += 64) {
        __m128i v0 = _mm_loadu_si128((const __m128i *)(s + i));
        __m128i v1 = _mm_loadu_si128((const __m128i *)(s + i + 16));
        __m128i v2 = _mm_loadu_si128((const __m128i *)(s + i + 32));
        __m128i v3 = _mm_loadu_si128((const __m128i *)(s + i + 48));
        _mm_stream_si128((__m128i *)(d + i), v0);
        _mm_stream_si128((__m128i *)(d + i + 16), v1);
        _mm_stream_si128((__m128i *)(d + i + 32), v2);
        _mm_stream_si128((__m128i *)(d + i + 48), v3);
    }
    for (; i + 16 <= nbytes; i += 16)
        _mm_stream_si128((__m128i *)(d + i), _mm_loadu_si128((const __m128i *)(s + i)));
    memcpy(d + i, s + i, (size_t)(nbytes - i));
#else
    memcpy(dst, src, (size_t)nbytes);
#endif
}

/* Order the streaming stores before anything a later reader does (called once
 * per thread at the end of a kernel). */
static inline void fo_stream_fence(void) {
#if defined(__SSE2__)
    _mm_sfence();
#endif
}

#endif
