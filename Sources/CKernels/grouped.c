// Q4_0 rows read in octets (st_octet_q4_0), the two grouped layouts of specs/FORMAT.md:
// - row_major_x8: eight rows side by side, one octet per block column, so one 32-byte load feeds
//   eight rows at once and their scales load as one vector (dense matrices, expert gate rows);
// - row_major_b8: one row at a time, each run of eight blocks one octet, read against activations
//   interleaved to match (st_interleave_q8_0_b8), so eight blocks' integer sums land in eight
//   lanes and their scales apply as one vector (expert up rows, read only for active neurons).
#include "internal.h"

// The b8 kernels' token i: which[i] when they are given a list, else i.
#define B8_TOKEN(i) (which ? (size_t)which[i] : (size_t)(i))

// ---------------------------------------------------------------- portable

ST_DOT_X8(st_dot_q4_0_x8_portable) {
    (void)xsum;
    for (int t = 0; t < tokens; t++) {
        const st_octet_q4_0 *o = group;
        const float *s = xs + (size_t)t * blocks;
        const int8_t *x = xq + (size_t)t * blocks * ST_QK;
        float sum[8] = {0};
        for (int b = 0; b < blocks; b++, o++) {
            for (int i = 0; i < 8; i++) {
                int32_t acc = 0;
                for (int c = 0; c < 4; c++) {
                    for (int j = 0; j < 4; j++) {
                        const uint8_t q = o->qs[c][4 * i + j];
                        acc += ((q & 0x0F) - 8) * x[b * ST_QK + 4 * c + j];
                        acc += ((q >> 4) - 8) * x[b * ST_QK + 16 + 4 * c + j];
                    }
                }
                sum[i] += st_fp16_to_fp32(o->d[i]) * s[b] * (float)acc;
            }
        }
        for (int i = 0; i < 8; i++) out[(size_t)t * out_stride + i] = sum[i];
    }
}

// One row_major_b8 row against interleaved activations: per octet g, eight 32-byte vectors, 0..3
// for the low nibbles of chunks 0..3 and 4..7 for the high ones, lane k of each holding the four
// values of block 8g+k that meet that lane's weight bytes.
static void dot_q4_0_b8_row_portable(const void *row, const float *xs, const int8_t *xr, int blocks, int tokens,
                                     const int32_t *which, float *out, int out_stride) {
    for (int i = 0; i < tokens; i++) {
        const size_t t = B8_TOKEN(i);
        const st_octet_q4_0 *o = row;
        const float *s = xs + t * blocks;
        const int8_t *x = xr + t * blocks * ST_QK;
        float sum = 0;
        for (int g = 0; g < blocks / 8; g++, o++, x += 8 * ST_QK) {
            for (int k = 0; k < 8; k++) {
                int32_t acc = 0;
                for (int c = 0; c < 4; c++) {
                    for (int j = 0; j < 4; j++) {
                        const uint8_t q = o->qs[c][4 * k + j];
                        acc += ((q & 0x0F) - 8) * x[32 * c + 4 * k + j];
                        acc += ((q >> 4) - 8) * x[128 + 32 * c + 4 * k + j];
                    }
                }
                sum += st_fp16_to_fp32(o->d[k]) * s[8 * g + k] * (float)acc;
            }
        }
        out[t * out_stride] = sum;
    }
}

ST_DOT_B8(st_dot_q4_0_b8_portable) {
    (void)xsum;
    for (int r = 0; r < rows; r++)
        dot_q4_0_b8_row_portable((const uint8_t *)row + (size_t)r * row_bytes, xs, xr, blocks, tokens, which, out + r, out_stride);
}

// Tiers without a form of their own ask for the whole row at `ahead` at once, then read this one.
#define B8_AHEAD_VIA(name, ATTR, dot)                                                                     \
    ATTR ST_DOT_B8_AHEAD(name) {                                                                          \
        float v;                                                                                          \
        st_prefetch_l1(ahead, ahead ? blocks * (int)sizeof(st_block_q4_0) : 0);                           \
        dot(row, 0, 1, xs, xr, xsum, blocks, 1, NULL, &v, 1);                                             \
        return v;                                                                                         \
    }
B8_AHEAD_VIA(st_dot_q4_0_b8_ahead_portable, , st_dot_q4_0_b8_portable)

#ifdef ST_X86
// ---------------------------------------------------------------- shared by AVX2 and AVX-512

// The nibbles of an octet's four chunks: lo[c] the low nibbles of chunk c, hi[c] the high ones,
// as bytes 0..15.
ST_AVX2 static inline void octet_nibbles(const st_octet_q4_0 *o, __m256i lo[4], __m256i hi[4]) {
    const __m256i mask = _mm256_set1_epi8(0x0F);
    for (int c = 0; c < 4; c++) {
        const __m256i v = _mm256_loadu_si256((const __m256i *)o->qs[c]);
        lo[c] = _mm256_and_si256(v, mask);
        hi[c] = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
    }
}

// How far ahead of the octet it reads the one-token x8 kernel asks for the weights (bytes; the
// three lines an octet spans). A decoded token streams the output head (219 MB at the 21B
// width), the attention matrices and the experts' gate rows through this kernel, and the
// hardware prefetcher alone kept too few lines in flight. On a 2-core Zen 5 with the AVX2 tier
// forced, decode of the 4-layer 21B-width model ran a median 1.04-1.21x as fast as without it
// in four sets of 6-10 alternating runs (AVX-512 tier: 1.23x in six); 2 KiB ahead gained less
// and 8-16 KiB no more. A few tokens (several sequences decoding in one step) stream the weights
// just the same, so the first pass over a group asks ahead for up to X8_AHEAD_TOKENS tokens;
// a prompt's many tokens reuse each octet from the cache and need no help.
#define X8_AHEAD 4096
#define X8_AHEAD_TOKENS 16

// Eight grouped rows against G tokens: each chunk's nibbles are unpacked once for all tokens, and
// BLOCK_DOT(lo, hi, x, seed) gives the eight rows' integer sums for one token's block (seeded
// with −8·Σx: unsigned nibbles 0..15 against signed activations, the seed removes the offset of
// 8 for all eight rows at once). Expanded inside functions compiled for AVX2 or AVX-512.
#define X8_TOKENS(G, BLOCK_DOT)                                                                             \
    for (; t + G <= tokens; t += G) {                                                                       \
        const st_octet_q4_0 *o = group;                                                                     \
        __m256 acc[G];                                                                                      \
        for (int k = 0; k < G; k++) acc[k] = _mm256_setzero_ps();                                          \
        for (int b = 0; b < blocks; b++, o++) {                                                             \
            if (t == 0 && tokens <= X8_AHEAD_TOKENS) st_prefetch_l1((const char *)o + X8_AHEAD, (int)sizeof *o); \
            __m256i lo[4], hi[4];                                                                           \
            octet_nibbles(o, lo, hi);                                                                       \
            const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)o->d));                      \
            for (int k = 0; k < G; k++) {                                                                   \
                const size_t base = (size_t)(t + k) * blocks + b;                                           \
                const __m256i sums = BLOCK_DOT(lo, hi, (const int32_t *)(xq + base * ST_QK), -8 * xsum[base]); \
                acc[k] = _mm256_fmadd_ps(_mm256_mul_ps(d, _mm256_set1_ps(xs[base])), _mm256_cvtepi32_ps(sums), acc[k]); \
            }                                                                                               \
        }                                                                                                   \
        for (int k = 0; k < G; k++) _mm256_storeu_ps(out + (size_t)(t + k) * out_stride, acc[k]);          \
    }

// Eight blocks of one row against G tokens' interleaved activations: each chunk's nibbles are
// unpacked once for all tokens, and BLOCK_DOT(lo, hi, x, seed) gives the eight blocks' integer
// sums (seeded with −8·Σx of each block). One token asks for the row at `ahead` (when not NULL)
// an octet per octet read (dot_q4_0_b8_ahead).
#define B8_TOKENS(G, BLOCK_DOT)                                                                             \
    for (; t + G <= tokens; t += G) {                                                                       \
        const st_octet_q4_0 *o = row;                                                                       \
        __m256 acc[G];                                                                                      \
        for (int k = 0; k < G; k++) acc[k] = _mm256_setzero_ps();                                          \
        for (int g = 0; g < blocks / 8; g++, o++) {                                                         \
            if (G == 1 && ahead) st_prefetch_l1((const st_octet_q4_0 *)ahead + g, (int)sizeof *o);          \
            __m256i lo[4], hi[4];                                                                           \
            octet_nibbles(o, lo, hi);                                                                       \
            const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)o->d));                      \
            for (int k = 0; k < G; k++) {                                                                   \
                const size_t base = B8_TOKEN(t + k) * blocks + 8 * g;                                       \
                const __m256i seed = _mm256_sub_epi32(zero, _mm256_slli_epi32(_mm256_loadu_si256((const __m256i *)(xsum + base)), 3)); \
                const __m256i sums = BLOCK_DOT(lo, hi, xr + base * ST_QK, seed);                            \
                acc[k] = _mm256_fmadd_ps(_mm256_mul_ps(d, _mm256_loadu_ps(xs + base)), _mm256_cvtepi32_ps(sums), acc[k]); \
            }                                                                                               \
        }                                                                                                   \
        for (int k = 0; k < G; k++) out[B8_TOKEN(t + k) * out_stride] = st_hsum256(acc[k]);                \
    }

// ---------------------------------------------------------------- AVX2 (+FMA, F16C)

// AVX2 has no byte dot product into 32 bits: maddubs gives pairs in 16 bits, and the eight chunk
// halves of a block sum without overflow there (8 · 2 · 15 · 127 < 32768).
ST_AVX2 static inline __m256i x8_block_avx2(const __m256i lo[4], const __m256i hi[4], const int32_t *x, int32_t seed) {
    __m256i s16 = _mm256_maddubs_epi16(lo[0], _mm256_set1_epi32(x[0]));
    for (int c = 1; c < 4; c++) s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(lo[c], _mm256_set1_epi32(x[c])));
    for (int c = 0; c < 4; c++) s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(hi[c], _mm256_set1_epi32(x[4 + c])));
    return _mm256_add_epi32(_mm256_madd_epi16(s16, _mm256_set1_epi16(1)), _mm256_set1_epi32(seed));
}

ST_AVX2 ST_DOT_X8(st_dot_q4_0_x8_avx2) {
    int t = 0;
    X8_TOKENS(4, x8_block_avx2)
    X8_TOKENS(2, x8_block_avx2)
    X8_TOKENS(1, x8_block_avx2)
}

ST_AVX2 static inline __m256i b8_block_avx2(const __m256i lo[4], const __m256i hi[4], const int8_t *x, __m256i seed) {
    __m256i s16 = _mm256_maddubs_epi16(lo[0], _mm256_loadu_si256((const __m256i *)x));
    for (int c = 1; c < 4; c++) s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(lo[c], _mm256_loadu_si256((const __m256i *)(x + 32 * c))));
    for (int c = 0; c < 4; c++) {
        s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(hi[c], _mm256_loadu_si256((const __m256i *)(x + 128 + 32 * c))));
    }
    return _mm256_add_epi32(_mm256_madd_epi16(s16, _mm256_set1_epi16(1)), seed);
}

ST_AVX2 static void dot_q4_0_b8_row_avx2(const void *row, const float *xs, const int8_t *xr, const int32_t *xsum, int blocks,
                                         int tokens, const int32_t *which, float *out, int out_stride, const void *ahead) {
    const __m256i zero = _mm256_setzero_si256();
    int t = 0;
    B8_TOKENS(4, b8_block_avx2)
    B8_TOKENS(1, b8_block_avx2)
}

ST_AVX2 ST_DOT_B8(st_dot_q4_0_b8_avx2) {
    for (int r = 0; r < rows; r++)
        dot_q4_0_b8_row_avx2((const uint8_t *)row + (size_t)r * row_bytes, xs, xr, xsum, blocks, tokens, which, out + r, out_stride,
                             NULL);
}

ST_AVX2 ST_DOT_B8_AHEAD(st_dot_q4_0_b8_ahead_avx2) {
    float v;
    dot_q4_0_b8_row_avx2(row, xs, xr, xsum, blocks, 1, NULL, &v, 1, ahead);
    return v;
}

// ---------------------------------------------------------------- AVX-512 VNNI (256-bit VL forms)

// The VNNI form: one vpdpbusd per chunk half.
ST_AVX512 static inline __m256i x8_block_vnni(const __m256i lo[4], const __m256i hi[4], const int32_t *x, int32_t seed) {
    __m256i a0 = _mm256_set1_epi32(seed), a1 = _mm256_setzero_si256();
    for (int c = 0; c < 4; c++) {
        a0 = _mm256_dpbusd_epi32(a0, lo[c], _mm256_set1_epi32(x[c]));
        a1 = _mm256_dpbusd_epi32(a1, hi[c], _mm256_set1_epi32(x[4 + c]));
    }
    return _mm256_add_epi32(a0, a1);
}

ST_AVX512 ST_DOT_X8(st_dot_q4_0_x8_avx512) {
    int t = 0;
    X8_TOKENS(8, x8_block_vnni)
    X8_TOKENS(4, x8_block_vnni)
    X8_TOKENS(2, x8_block_vnni)
    X8_TOKENS(1, x8_block_vnni)
}

ST_AVX512 static inline __m256i b8_block_vnni(const __m256i lo[4], const __m256i hi[4], const int8_t *x, __m256i seed) {
    __m256i a0 = seed, a1 = _mm256_setzero_si256();
    for (int c = 0; c < 4; c++) {
        a0 = _mm256_dpbusd_epi32(a0, lo[c], _mm256_loadu_si256((const __m256i *)(x + 32 * c)));
        a1 = _mm256_dpbusd_epi32(a1, hi[c], _mm256_loadu_si256((const __m256i *)(x + 128 + 32 * c)));
    }
    return _mm256_add_epi32(a0, a1);
}

// Two rows against G tokens: each token's activations, seeds and scales are loaded once for both.
#define B8_PAIR_TOKENS(G)                                                                                   \
    for (; t + G <= tokens; t += G) {                                                                       \
        const st_octet_q4_0 *o0 = row, *o1 = (const st_octet_q4_0 *)((const uint8_t *)row + row_bytes);    \
        __m256 acc0[G], acc1[G];                                                                            \
        for (int k = 0; k < G; k++) acc0[k] = acc1[k] = _mm256_setzero_ps();                               \
        for (int g = 0; g < blocks / 8; g++, o0++, o1++) {                                                  \
            __m256i lo0[4], hi0[4], lo1[4], hi1[4];                                                         \
            octet_nibbles(o0, lo0, hi0);                                                                    \
            octet_nibbles(o1, lo1, hi1);                                                                    \
            const __m256 d0 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)o0->d));                    \
            const __m256 d1 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)o1->d));                    \
            for (int k = 0; k < G; k++) {                                                                   \
                const size_t base = B8_TOKEN(t + k) * blocks + 8 * g;                                       \
                const int8_t *x = xr + base * ST_QK;                                                        \
                __m256i a0 = _mm256_sub_epi32(zero, _mm256_slli_epi32(_mm256_loadu_si256((const __m256i *)(xsum + base)), 3)); \
                __m256i a1 = a0, b0 = zero, b1 = zero;                                                      \
                for (int c = 0; c < 4; c++) {                                                               \
                    const __m256i xl = _mm256_loadu_si256((const __m256i *)(x + 32 * c));                   \
                    const __m256i xh = _mm256_loadu_si256((const __m256i *)(x + 128 + 32 * c));             \
                    a0 = _mm256_dpbusd_epi32(a0, lo0[c], xl);                                               \
                    a1 = _mm256_dpbusd_epi32(a1, lo1[c], xl);                                               \
                    b0 = _mm256_dpbusd_epi32(b0, hi0[c], xh);                                               \
                    b1 = _mm256_dpbusd_epi32(b1, hi1[c], xh);                                               \
                }                                                                                           \
                const __m256 sx = _mm256_loadu_ps(xs + base);                                               \
                acc0[k] = _mm256_fmadd_ps(_mm256_mul_ps(d0, sx), _mm256_cvtepi32_ps(_mm256_add_epi32(a0, b0)), acc0[k]); \
                acc1[k] = _mm256_fmadd_ps(_mm256_mul_ps(d1, sx), _mm256_cvtepi32_ps(_mm256_add_epi32(a1, b1)), acc1[k]); \
            }                                                                                               \
        }                                                                                                   \
        for (int k = 0; k < G; k++) {                                                                       \
            out[B8_TOKEN(t + k) * out_stride] = st_hsum256(acc0[k]);                                        \
            out[B8_TOKEN(t + k) * out_stride + 1] = st_hsum256(acc1[k]);                                    \
        }                                                                                                   \
    }

ST_AVX512 static void dot_q4_0_b8_row_avx512(const void *row, const float *xs, const int8_t *xr, const int32_t *xsum, int blocks,
                                             int tokens, const int32_t *which, float *out, int out_stride, const void *ahead) {
    const __m256i zero = _mm256_setzero_si256();
    int t = 0;
    B8_TOKENS(8, b8_block_vnni)
    B8_TOKENS(4, b8_block_vnni)
    B8_TOKENS(1, b8_block_vnni)
}

ST_AVX512 ST_DOT_B8(st_dot_q4_0_b8_avx512) {
    if (rows == 1) {
        dot_q4_0_b8_row_avx512(row, xs, xr, xsum, blocks, tokens, which, out, out_stride, NULL);
        return;
    }
    const __m256i zero = _mm256_setzero_si256();
    int t = 0;
    B8_PAIR_TOKENS(4)
    B8_PAIR_TOKENS(1)
}

ST_AVX512 ST_DOT_B8_AHEAD(st_dot_q4_0_b8_ahead_avx512) {
    float v;
    dot_q4_0_b8_row_avx512(row, xs, xr, xsum, blocks, 1, NULL, &v, 1, ahead);
    return v;
}
#endif

// ---------------------------------------------------------------- drivers (every tier)

void st_matmul_q4_0_x8(const void *packed, int blocks, int first_group, int last_group, const float *xs, const int8_t *xq,
                       const int32_t *xsum, int tokens, float *out, int out_stride) {
    const st_kernel_table *k = st_table();
    const st_octet_q4_0 *groups = packed;
    for (int g = first_group; g < last_group; g++)
        k->dot_q4_0_x8(groups + (size_t)g * blocks, xs, xq, xsum, blocks, tokens, out + (size_t)g * 8, out_stride);
}

void st_matmul_q4_0_b8(const void *rows, int row_bytes, int first, int last, const float *xs, const int8_t *xr, const int32_t *xsum,
                       int blocks, int tokens, const int32_t *which, float *out, int out_stride) {
    const st_kernel_table *k = st_table();
    const uint8_t *base = rows;
    int r = first;
    for (; r + 2 <= last; r += 2) {
        k->dot_q4_0_b8(base + (size_t)r * row_bytes, row_bytes, 2, xs, xr, xsum, blocks, tokens, which, out + r, out_stride);
    }
    if (r < last) k->dot_q4_0_b8(base + (size_t)r * row_bytes, row_bytes, 1, xs, xr, xsum, blocks, tokens, which, out + r, out_stride);
}

void st_interleave_q8_0_b8(const int8_t *xq, int8_t *xr, int blocks) {
    for (int g = 0; g < blocks / 8; g++, xq += 8 * ST_QK, xr += 8 * ST_QK) {
        for (int c = 0; c < 8; c++) {
            // Vector c: lane k holds values 4c..4c+3 (c < 4: low nibbles) or 16+4(c−4).. of block k.
            const int from = c < 4 ? 4 * c : 16 + 4 * (c - 4);
            for (int k = 0; k < 8; k++) memcpy(xr + 32 * c + 4 * k, xq + ST_QK * k + from, 4);
        }
    }
}

#ifdef ST_ARM
// ---------------------------------------------------------------- NEON, and NEON with SDOT

// Both layouts keep four weight bytes per row (x8) or per block (b8) together, SDOT's own
// granularity: each 16-byte half of a chunk gives four lanes' integer sums at once.
#define NEON_DOT_X8(name, ATTR, SDOT)                                                                     \
    ATTR ST_DOT_X8(name) {                                                                                \
        (void)xsum;                                                                                       \
        for (int t = 0; t < tokens; t++) {                                                                \
            const st_octet_q4_0 *o = group;                                                               \
            const float *s = xs + (size_t)t * blocks;                                                     \
            const int8_t *x = xq + (size_t)t * blocks * ST_QK;                                            \
            float32x4_t sum03 = vdupq_n_f32(0), sum47 = vdupq_n_f32(0);                                   \
            for (int b = 0; b < blocks; b++, o++) {                                                       \
                int32x4_t acc03 = vdupq_n_s32(0), acc47 = vdupq_n_s32(0);                                 \
                for (int c = 0; c < 4; c++) {                                                             \
                    int32_t low, high;                                                                    \
                    memcpy(&low, x + b * ST_QK + 4 * c, 4);                                               \
                    memcpy(&high, x + b * ST_QK + 16 + 4 * c, 4);                                         \
                    const int8x16_t xl = vreinterpretq_s8_s32(vdupq_n_s32(low));                          \
                    const int8x16_t xh = vreinterpretq_s8_s32(vdupq_n_s32(high));                         \
                    int8x16_t lo, hi;                                                                     \
                    st_nibbles_neon(o->qs[c], &lo, &hi);                                               \
                    acc03 = SDOT(SDOT(acc03, lo, xl), hi, xh);                                            \
                    st_nibbles_neon(o->qs[c] + 16, &lo, &hi);                                          \
                    acc47 = SDOT(SDOT(acc47, lo, xl), hi, xh);                                            \
                }                                                                                         \
                float32x4_t d03, d47;                                                                     \
                st_fp16x8_to_fp32(o->d, &d03, &d47);                                                      \
                sum03 = vaddq_f32(sum03, vmulq_f32(vmulq_n_f32(d03, s[b]), vcvtq_f32_s32(acc03)));        \
                sum47 = vaddq_f32(sum47, vmulq_f32(vmulq_n_f32(d47, s[b]), vcvtq_f32_s32(acc47)));        \
            }                                                                                             \
            float lanes[8];                                                                               \
            vst1q_f32(lanes, sum03);                                                                      \
            vst1q_f32(lanes + 4, sum47);                                                                  \
            for (int i = 0; i < 8; i++) out[(size_t)t * out_stride + i] = lanes[i];                       \
        }                                                                                                 \
    }

#define NEON_DOT_B8(name, ATTR, SDOT)                                                                     \
    ATTR ST_DOT_B8(name) {                                                                                \
        (void)xsum;                                                                                       \
        for (int r = 0; r < rows; r++) {                                                                  \
            for (int i = 0; i < tokens; i++) {                                                            \
                const size_t t = B8_TOKEN(i);                                                             \
                const st_octet_q4_0 *o = (const void *)((const uint8_t *)row + (size_t)r * row_bytes);    \
                const float *s = xs + t * blocks;                                                         \
                const int8_t *x = xr + t * blocks * ST_QK;                                                \
                float32x4_t sum = vdupq_n_f32(0);                                                         \
                for (int g = 0; g < blocks / 8; g++, o++, x += 8 * ST_QK) {                               \
                    int32x4_t acc03 = vdupq_n_s32(0), acc47 = vdupq_n_s32(0);                             \
                    for (int c = 0; c < 4; c++) {                                                         \
                        int8x16_t lo, hi;                                                                 \
                        st_nibbles_neon(o->qs[c], &lo, &hi);                                           \
                        acc03 = SDOT(SDOT(acc03, lo, vld1q_s8(x + 32 * c)), hi, vld1q_s8(x + 128 + 32 * c)); \
                        st_nibbles_neon(o->qs[c] + 16, &lo, &hi);                                      \
                        acc47 = SDOT(SDOT(acc47, lo, vld1q_s8(x + 32 * c + 16)), hi, vld1q_s8(x + 144 + 32 * c)); \
                    }                                                                                     \
                    float32x4_t d03, d47;                                                                 \
                    st_fp16x8_to_fp32(o->d, &d03, &d47);                                                  \
                    sum = vaddq_f32(sum, vmulq_f32(vmulq_f32(d03, vld1q_f32(s + 8 * g)), vcvtq_f32_s32(acc03))); \
                    sum = vaddq_f32(sum, vmulq_f32(vmulq_f32(d47, vld1q_f32(s + 8 * g + 4)), vcvtq_f32_s32(acc47))); \
                }                                                                                         \
                out[t * out_stride + r] = vaddvq_f32(sum);                                                \
            }                                                                                             \
        }                                                                                                 \
    }

NEON_DOT_X8(st_dot_q4_0_x8_neon, ST_NEON, st_sdot_neon)
NEON_DOT_X8(st_dot_q4_0_x8_dotprod, ST_DOTPROD, st_sdot_dotprod)
NEON_DOT_B8(st_dot_q4_0_b8_neon, ST_NEON, st_sdot_neon)
NEON_DOT_B8(st_dot_q4_0_b8_dotprod, ST_DOTPROD, st_sdot_dotprod)
B8_AHEAD_VIA(st_dot_q4_0_b8_ahead_neon, ST_NEON, st_dot_q4_0_b8_neon)
B8_AHEAD_VIA(st_dot_q4_0_b8_ahead_dotprod, ST_DOTPROD, st_dot_q4_0_b8_dotprod)
#endif
