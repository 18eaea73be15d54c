/* rng.h -- internal: Philox4x32-10 (Salmon, Moraes, Dror, Shaw: "Parallel
 * random numbers: as easy as 1, 2, 3", SC 2011), the counter-based RNG of
 * dropout and noise injection.
 *
 * A random word is a pure function of (seed, offset, element index), so a
 * kernel can start anywhere: threads split the work freely and get the same
 * numbers, and backward regenerates dropout's mask instead of storing it.
 *
 * Element layout. Elements come in groups of 64; element i lies in group
 * g = i / 64 at position e = i % 64, and takes word e / 16 of the Philox
 * block with counter (16*g + e % 16 as 64 bits, offset as 64 bits) and key
 * seed (low word first):
 *     r(i) = philox4x32_10(ctr = {lo(b), hi(b), lo(offset), hi(offset)},
 *                          key = {lo(seed), hi(seed)})[e / 16],  b = 16*g + e % 16.
 * So one group is 16 independent Philox blocks, word w of block l being
 * element 16*w + l: the 16 blocks run side by side in vector lanes and the
 * words land in element order with no shuffle. (This is the layout of
 * Gaussian noise; dropout splits word q of group g into four 8-bit draws for
 * elements 256*g + 4*q .. 256*g + 4*q + 3, see dropout.c.) */
#ifndef FASTOPT_RNG_H
#define FASTOPT_RNG_H

#include <stdint.h>

#define FO_PHILOX_M0 0xD2511F53u
#define FO_PHILOX_M1 0xCD9E8D57u
#define FO_PHILOX_W0 0x9E3779B9u   /* golden ratio */
#define FO_PHILOX_W1 0xBB67AE85u   /* sqrt(3) - 1 */
#define FO_RNG_LANES 16
#define FO_RNG_GROUP 64

/* One Philox4x32-10 block, scalar: the textbook form (and the reference the
 * test program checks against the published known-answer vectors). */
static inline void fo_philox4x32_10(uint32_t ctr[4], const uint32_t key[2]) {
    uint32_t k0 = key[0], k1 = key[1];
    for (int round = 0; round < 10; round++) {
        uint64_t p0 = (uint64_t)FO_PHILOX_M0 * ctr[0];
        uint64_t p1 = (uint64_t)FO_PHILOX_M1 * ctr[2];
        uint32_t c0 = (uint32_t)(p1 >> 32) ^ ctr[1] ^ k0;
        uint32_t c2 = (uint32_t)(p0 >> 32) ^ ctr[3] ^ k1;
        ctr[1] = (uint32_t)p1;
        ctr[3] = (uint32_t)p0;
        ctr[0] = c0;
        ctr[2] = c2;
        k0 += FO_PHILOX_W0;
        k1 += FO_PHILOX_W1;
    }
}

/* The 64 words of group g: r[e] for element 64*g + e. The loop runs over the
 * 16 blocks with the 10 rounds inside, so that GCC vectorizes it across blocks
 * (32x32->64-bit products become vpmuludq). */
static inline __attribute__((always_inline))
void fo_philox_group(uint32_t r[FO_RNG_GROUP], uint64_t g, uint64_t seed, uint64_t offset) {
    const uint64_t k0 = (uint32_t)seed, k1 = seed >> 32;
    for (int l = 0; l < FO_RNG_LANES; l++) {
        /* 32-bit words held in 64-bit lanes: the products are then plain
         * vpmuludq (GCC leaves 32-bit lanes to slower widening shuffles) */
        uint64_t b = g * FO_RNG_LANES + (uint64_t)l;
        uint64_t c0 = (uint32_t)b, c1 = b >> 32, c2 = (uint32_t)offset, c3 = offset >> 32;
        for (uint32_t round = 0; round < 10; round++) {
            uint64_t p0 = FO_PHILOX_M0 * (c0 & 0xffffffffu);
            uint64_t p1 = FO_PHILOX_M1 * (c2 & 0xffffffffu);
            uint64_t n0 = (p1 >> 32) ^ c1 ^ ((k0 + round * FO_PHILOX_W0) & 0xffffffffu);
            uint64_t n2 = (p0 >> 32) ^ c3 ^ ((k1 + round * FO_PHILOX_W1) & 0xffffffffu);
            c1 = p1 & 0xffffffffu;
            c3 = p0 & 0xffffffffu;
            c0 = n0;
            c2 = n2;
        }
        r[l] = (uint32_t)c0;
        r[FO_RNG_LANES + l] = (uint32_t)c1;
        r[2 * FO_RNG_LANES + l] = (uint32_t)c2;
        r[3 * FO_RNG_LANES + l] = (uint32_t)c3;
    }
}

#endif
