// Row kernels: a portable C version of each, plus AVX2 and AVX-512 VNNI versions compiled with
// function-level target attributes, so one binary runs everywhere and uses what the CPU has.
#include "ckernels.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#if defined(__x86_64__) || defined(__i386__)
#define ST_X86 1
#include <immintrin.h>
#endif

static inline float fp16_to_fp32(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exponent = (h >> 10) & 0x1F;
    uint32_t mantissa = h & 0x3FF;
    uint32_t bits;
    if (exponent == 0) {
        if (mantissa == 0) {
            bits = sign;
        } else {  // subnormal: normalise
            exponent = 127 - 15 + 1;
            while ((mantissa & 0x400) == 0) { mantissa <<= 1; exponent--; }
            mantissa &= 0x3FF;
            bits = sign | (exponent << 23) | (mantissa << 13);
        }
    } else if (exponent == 0x1F) {
        bits = sign | 0x7F800000 | (mantissa << 13);
    } else {
        bits = sign | ((exponent + 127 - 15) << 23) | (mantissa << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline float bf16_to_fp32(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline uint16_t load_u16(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return v; }

// Asks for `bytes` at `p` in L2 (prefetcht1): rows a later step of the same kernel reads, where
// fetching them into L1 measured slower.
static inline void prefetch_l2(const void *p, int bytes) {
    const char *c = p;
    for (int i = 0; i < bytes; i += 64) __builtin_prefetch(c + i, 0, 2);
}

// ---------------------------------------------------------------- portable

static float dot_q4_0_portable(const void *row, const float *xs, const int8_t *xq, const int32_t *xsum, int blocks) {
    (void)xsum;
    const uint8_t *w = row;
    float sum = 0;
    for (int b = 0; b < blocks; b++, w += 18) {
        const float d = fp16_to_fp32(load_u16(w));
        int32_t acc = 0;
        for (int j = 0; j < 16; j++) {
            acc += ((w[2 + j] & 0x0F) - 8) * xq[b * 32 + j];
            acc += ((w[2 + j] >> 4) - 8) * xq[b * 32 + j + 16];
        }
        sum += d * xs[b] * (float)acc;
    }
    return sum;
}

static float dot_q8_0_portable(const void *row, const float *xs, const int8_t *xq, const int32_t *xsum, int blocks) {
    (void)xsum;
    const uint8_t *w = row;
    float sum = 0;
    for (int b = 0; b < blocks; b++, w += 34) {
        const float d = fp16_to_fp32(load_u16(w));
        const int8_t *q = (const int8_t *)(w + 2);
        int32_t acc = 0;
        for (int j = 0; j < 32; j++) acc += q[j] * xq[b * 32 + j];
        sum += d * xs[b] * (float)acc;
    }
    return sum;
}

static float dot_f32_portable(const float *row, const float *x, int n) {
    float sum = 0;
    for (int i = 0; i < n; i++) sum += row[i] * x[i];
    return sum;
}

static float dot_bf16_portable(const uint16_t *row, const float *x, int n) {
    float sum = 0;
    for (int i = 0; i < n; i++) sum += bf16_to_fp32(row[i]) * x[i];
    return sum;
}

static float dot_f16_portable(const uint16_t *row, const float *x, int n) {
    float sum = 0;
    for (int i = 0; i < n; i++) sum += fp16_to_fp32(row[i]) * x[i];
    return sum;
}

static void axpy_q4_0_portable(const void *row, float a, float *y, int n) {
    const uint8_t *w = row;
    for (int b = 0; b < n / 32; b++, w += 18) {
        const float s = a * fp16_to_fp32(load_u16(w));
        for (int j = 0; j < 16; j++) {
            y[b * 32 + j] += s * (float)((w[2 + j] & 0x0F) - 8);
            y[b * 32 + j + 16] += s * (float)((w[2 + j] >> 4) - 8);
        }
    }
}

static void axpy_q8_0_portable(const void *row, float a, float *y, int n) {
    const uint8_t *w = row;
    for (int b = 0; b < n / 32; b++, w += 34) {
        const float s = a * fp16_to_fp32(load_u16(w));
        const int8_t *q = (const int8_t *)(w + 2);
        for (int j = 0; j < 32; j++) y[b * 32 + j] += s * (float)q[j];
    }
}

static void axpy_f32_portable(const float *row, float a, float *y, int n) {
    for (int i = 0; i < n; i++) y[i] += a * row[i];
}

static void axpy_bf16_portable(const uint16_t *row, float a, float *y, int n) {
    for (int i = 0; i < n; i++) y[i] += a * bf16_to_fp32(row[i]);
}

static void axpy_f16_portable(const uint16_t *row, float a, float *y, int n) {
    for (int i = 0; i < n; i++) y[i] += a * fp16_to_fp32(row[i]);
}

static void quantize_q8_0_portable(const float *x, float *scales, int8_t *q, int32_t *sums, int n) {
    for (int b = 0; b < n / 32; b++) {
        float amax = 0;
        for (int j = 0; j < 32; j++) amax = fmaxf(amax, fabsf(x[b * 32 + j]));
        const float d = amax / 127.0f;
        const float id = d != 0 ? 1.0f / d : 0.0f;
        scales[b] = d;
        int32_t sum = 0;
        for (int j = 0; j < 32; j++) {
            q[b * 32 + j] = (int8_t)roundf(x[b * 32 + j] * id);
            sum += q[b * 32 + j];
        }
        sums[b] = sum;
    }
}

// Q4_0 rows in groups of eight (the row_major_x8 layout of specs/FORMAT.md): for each block
// column, the eight rows' float16 scales (16 bytes), then their nibbles in four 32-byte chunks,
// chunk c holding bytes 4c..4c+3 of each row's block in row order. A 32-byte load then feeds eight rows at once, and
// the scales load as one vector.

static void dot_q4_0_x8_portable(const void *group, const float *xs, const int8_t *xq, const int32_t *xsum, int blocks,
                                 int tokens, float *out, int out_stride) {
    (void)xsum;
    for (int t = 0; t < tokens; t++) {
        const uint8_t *p = group;
        const float *s = xs + (size_t)t * blocks;
        const int8_t *x = xq + (size_t)t * blocks * 32;
        float sum[8] = {0};
        for (int b = 0; b < blocks; b++, p += 144) {
            for (int i = 0; i < 8; i++) {
                int32_t acc = 0;
                for (int c = 0; c < 4; c++) {
                    for (int j = 0; j < 4; j++) {
                        const uint8_t q = p[16 + 32 * c + 4 * i + j];
                        acc += ((q & 0x0F) - 8) * x[b * 32 + 4 * c + j];
                        acc += ((q >> 4) - 8) * x[b * 32 + 16 + 4 * c + j];
                    }
                }
                sum[i] += fp16_to_fp32(load_u16(p + 2 * i)) * s[b] * (float)acc;
            }
        }
        for (int i = 0; i < 8; i++) out[(size_t)t * out_stride + i] = sum[i];
    }
}

// A Q4_0 row in the row_major_b8 layout (each group of eight blocks as one octet: eight scales,
// then four 32-byte chunks, chunk c holding quant bytes 4c..4c+3 of each block) against
// activations interleaved to match (st_interleave_q8_0_b8): per group g of 256 values, eight
// 32-byte vectors, 0..3 for the low nibbles of chunks 0..3 and 4..7 for the high ones, lane k
// of each holding the four values of block 8g+k that meet that lane's weight bytes. The integer
// sums of eight blocks then land in eight lanes, and their eight scales apply as one vector.
static void dot_q4_0_b8_row_portable(const void *row, const float *xs, const int8_t *xr, const int32_t *xsum, int blocks,
                                     int tokens, float *out, int out_stride) {
    (void)xsum;
    for (int t = 0; t < tokens; t++) {
        const uint8_t *p = row;
        const float *s = xs + (size_t)t * blocks;
        const int8_t *x = xr + (size_t)t * blocks * 32;
        float sum = 0;
        for (int g = 0; g < blocks / 8; g++, p += 144, x += 256) {
            for (int k = 0; k < 8; k++) {
                int32_t acc = 0;
                for (int c = 0; c < 4; c++) {
                    for (int j = 0; j < 4; j++) {
                        const uint8_t q = p[16 + 32 * c + 4 * k + j];
                        acc += ((q & 0x0F) - 8) * x[32 * c + 4 * k + j];
                        acc += ((q >> 4) - 8) * x[128 + 32 * c + 4 * k + j];
                    }
                }
                sum += fp16_to_fp32(load_u16(p + 2 * k)) * s[8 * g + k] * (float)acc;
            }
        }
        out[(size_t)t * out_stride] = sum;
    }
}

// `rows` (1 or 2) rows, row_bytes apart, one after the other.
#define B8_ROWS_VIA_ROW(name, one)                                                                          \
    static void name(const void *row, int row_bytes, int rows, const float *xs, const int8_t *xr, const int32_t *xsum, \
                     int blocks, int tokens, float *out, int out_stride) {                                   \
        for (int r = 0; r < rows; r++)                                                                      \
            one((const uint8_t *)row + (size_t)r * row_bytes, xs, xr, xsum, blocks, tokens, out + r, out_stride); \
    }
B8_ROWS_VIA_ROW(dot_q4_0_b8_portable, dot_q4_0_b8_row_portable)

// y += Σ_a coefficients[a] · row rows[a] of a Q4_0 matrix (the active neurons of a down matrix).
// This work is bound by arithmetic, not memory: the caller's next input, `next_bytes` at `next`
// (may be NULL), is prefetched into L2 a little at a time alongside it, so the memory system
// stays busy without a burst that would stall the core.
#define AXPY_ROWS_VIA_AXPY(name, axpy)                                                                   \
    static void name(const void *base, int row_bytes, const int *rows, const float *coefficients, int count, float *y, int n, \
                     const void *next, int next_bytes) {                                                 \
        const char *ahead = next;                                                                        \
        const int per_row = next && count > 0 ? next_bytes / count : 0;                                  \
        for (int a = 0; a < count; a++) {                                                                \
            prefetch_l2(ahead, per_row);                                                                 \
            ahead += per_row;                                                                            \
            axpy((const uint8_t *)base + (size_t)rows[a] * row_bytes, coefficients[a], y, n);           \
        }                                                                                                \
    }
AXPY_ROWS_VIA_AXPY(axpy_rows_q4_0_portable, axpy_q4_0_portable)

// Two outputs over one row list: y0 += Σ c0[a]·row, y1 += Σ c1[a]·row (a zero coefficient adds
// nothing). Tiers without a fused form add the rows for each output in turn.
#define AXPY_ROWS2_VIA_AXPY(name, axpy)                                                                  \
    static void name(const void *base, int row_bytes, const int *rows, const float *c0, const float *c1, int count, \
                     float *y0, float *y1, int n) {                                                      \
        for (int a = 0; a < count; a++) {                                                                \
            const uint8_t *w = (const uint8_t *)base + (size_t)rows[a] * row_bytes;                      \
            if (c0[a] != 0) axpy(w, c0[a], y0, n);                                                       \
            if (c1[a] != 0) axpy(w, c1[a], y1, n);                                                       \
        }                                                                                                \
    }
AXPY_ROWS2_VIA_AXPY(axpy_rows2_q4_0_portable, axpy_q4_0_portable)

// Attention for `heads` query heads sharing one key/value head (grouped-query attention), over
// cached positions first...last (slot j % capacity, `stride` floats per slot): for each head,
// softmax(q·k_j · scale) weighted sum of v_j, in one pass with a running maximum (no score vector;
// partial sums are rescaled when a larger score arrives). The heads' queries, and their outputs,
// are `head_dim` floats apart.
static void attend_portable(const float *queries, int heads, const float *keys, const float *values, int capacity, int stride,
                            int first, int last, int head_dim, float scale, float *outs) {
    for (int h = 0; h < heads; h++) {
        const float *q = queries + (size_t)h * head_dim;
        float *out = outs + (size_t)h * head_dim;
        for (int i = 0; i < head_dim; i++) out[i] = 0;
        float max_score = -INFINITY, sum = 0;
        for (int j = first; j <= last; j++) {
            const float *k = keys + (size_t)(j % capacity) * stride, *v = values + (size_t)(j % capacity) * stride;
            float s = 0;
            for (int i = 0; i < head_dim; i++) s += q[i] * k[i];
            s *= scale;
            if (s > max_score) {
                const float rescale = expf(max_score - s);
                for (int i = 0; i < head_dim; i++) out[i] *= rescale;
                sum *= rescale;
                max_score = s;
            }
            const float w = expf(s - max_score);
            sum += w;
            for (int i = 0; i < head_dim; i++) out[i] += w * v[i];
        }
        const float inverse = 1 / sum;
        for (int i = 0; i < head_dim; i++) out[i] *= inverse;
    }
}

// For the vector attentions' blocks of `width` positions from j0 (`count` of them real): each
// position's key and value rows (ring slot j % capacity, `stride` floats apart) into k and v, the
// rest padded with the first one's; and the next block's rows fetched while this one computes
// (positions are a row of the cache apart, a stride the hardware prefetchers follow too slowly
// from memory).
static inline void attention_block(const float *keys, const float *values, int capacity, int stride, int j0, int count, int width,
                                   int last, int head_dim, const float **k, const float **v) {
    for (int p = 0; p < width; p++) {
        const size_t slot = (size_t)((j0 + (p < count ? p : 0)) % capacity) * stride;
        k[p] = keys + slot;
        v[p] = values + slot;
    }
    for (int p = j0 + width; p <= last && p < j0 + 2 * width; p++) {
        const size_t slot = (size_t)(p % capacity) * stride;
        for (int i = 0; i < head_dim; i += 16) {
            __builtin_prefetch(keys + slot + i, 0, 3);
            __builtin_prefetch(values + slot + i, 0, 3);
        }
    }
}

#define TOKENS_VIA_DOT(name, dot)                                                                        \
    static void name(const void *row, const float *xs, const int8_t *xq, const int32_t *xsum, int blocks, \
                     int tokens, float *out, int out_stride) {                                          \
        for (int t = 0; t < tokens; t++)                                                                \
            out[(size_t)t * out_stride] = dot(row, xs + (size_t)t * blocks, xq + (size_t)t * blocks * 32,  \
                                              xsum + (size_t)t * blocks, blocks);                         \
    }
TOKENS_VIA_DOT(dot_q4_0_tokens_portable, dot_q4_0_portable)
TOKENS_VIA_DOT(dot_q8_0_tokens_portable, dot_q8_0_portable)

// ---------------------------------------------------------------- AVX2 (+FMA, F16C)

// The vector exps' shared core, for any width: r = x − n·ln2 (ln2 in two parts, so r is exact to
// float rounding), then p = e^r by its Taylor series to r^7 in Horner form (truncation below 1e-8
// relative for |r| ≤ ln2/2). The caller scales p by 2^n.
#define EXP_REDUCED(x, n, r, p, FMADD, FNMADD, SET1)                 \
    do {                                                             \
        r = FNMADD(n, SET1(0.693145751953125f), x);                  \
        r = FNMADD(n, SET1(1.42860682030941723212e-6f), r);          \
        p = SET1(1.0f / 5040);                                       \
        p = FMADD(p, r, SET1(1.0f / 720));                           \
        p = FMADD(p, r, SET1(1.0f / 120));                           \
        p = FMADD(p, r, SET1(1.0f / 24));                            \
        p = FMADD(p, r, SET1(1.0f / 6));                             \
        p = FMADD(p, r, SET1(0.5f));                                 \
        p = FMADD(p, r, SET1(1.0f));                                 \
        p = FMADD(p, r, SET1(1.0f));                                 \
    } while (0)

#ifdef ST_X86
#define AVX2 __attribute__((target("avx2,fma,f16c")))

AVX2 static inline float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/// 32 nibbles of a Q4_0 block as bytes 0..15: low nibbles first, then high.
AVX2 static inline __m256i unpack_nibbles(const uint8_t *qs) {
    const __m128i packed = _mm_loadu_si128((const __m128i *)qs);
    const __m256i both = _mm256_set_m128i(_mm_srli_epi16(packed, 4), packed);
    return _mm256_and_si256(both, _mm256_set1_epi8(0x0F));
}

AVX2 static float dot_q4_0_avx2(const void *row, const float *xs, const int8_t *xq, const int32_t *xsum, int blocks) {
    (void)xsum;
    const uint8_t *w = row;
    __m256 acc = _mm256_setzero_ps();
    const __m256i eight = _mm256_set1_epi8(8);
    const __m256i ones = _mm256_set1_epi16(1);
    for (int b = 0; b < blocks; b++, w += 18) {
        const __m256i wq = _mm256_sub_epi8(unpack_nibbles(w + 2), eight);
        const __m256i x = _mm256_loadu_si256((const __m256i *)(xq + b * 32));
        // maddubs needs unsigned × signed: |w| × (x with w's sign).
        const __m256i products = _mm256_maddubs_epi16(_mm256_sign_epi8(wq, wq), _mm256_sign_epi8(x, wq));
        const __m256i sums = _mm256_madd_epi16(products, ones);
        const __m256 scale = _mm256_set1_ps(_cvtsh_ss(load_u16(w)) * xs[b]);
        acc = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(sums), acc);
    }
    return hsum256(acc);
}

AVX2 static float dot_q8_0_avx2(const void *row, const float *xs, const int8_t *xq, const int32_t *xsum, int blocks) {
    (void)xsum;
    const uint8_t *w = row;
    __m256 acc = _mm256_setzero_ps();
    const __m256i ones = _mm256_set1_epi16(1);
    for (int b = 0; b < blocks; b++, w += 34) {
        const __m256i wq = _mm256_loadu_si256((const __m256i *)(w + 2));
        const __m256i x = _mm256_loadu_si256((const __m256i *)(xq + b * 32));
        const __m256i products = _mm256_maddubs_epi16(_mm256_sign_epi8(wq, wq), _mm256_sign_epi8(x, wq));
        const __m256i sums = _mm256_madd_epi16(products, ones);
        const __m256 scale = _mm256_set1_ps(_cvtsh_ss(load_u16(w)) * xs[b]);
        acc = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(sums), acc);
    }
    return hsum256(acc);
}

AVX2 static float dot_f32_avx2(const float *row, const float *x, int n) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    int i = 0;
    for (; i + 16 <= n; i += 16) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(row + i), _mm256_loadu_ps(x + i), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(row + i + 8), _mm256_loadu_ps(x + i + 8), a1);
    }
    float sum = hsum256(_mm256_add_ps(a0, a1));
    for (; i < n; i++) sum += row[i] * x[i];
    return sum;
}

AVX2 static inline __m256 load_bf16x8(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}

AVX2 static float dot_bf16_avx2(const uint16_t *row, const float *x, int n) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    int i = 0;
    for (; i + 16 <= n; i += 16) {
        a0 = _mm256_fmadd_ps(load_bf16x8(row + i), _mm256_loadu_ps(x + i), a0);
        a1 = _mm256_fmadd_ps(load_bf16x8(row + i + 8), _mm256_loadu_ps(x + i + 8), a1);
    }
    float sum = hsum256(_mm256_add_ps(a0, a1));
    for (; i < n; i++) sum += bf16_to_fp32(row[i]) * x[i];
    return sum;
}

AVX2 static float dot_f16_avx2(const uint16_t *row, const float *x, int n) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    int i = 0;
    for (; i + 16 <= n; i += 16) {
        a0 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(row + i))), _mm256_loadu_ps(x + i), a0);
        a1 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(row + i + 8))), _mm256_loadu_ps(x + i + 8), a1);
    }
    float sum = hsum256(_mm256_add_ps(a0, a1));
    for (; i < n; i++) sum += fp16_to_fp32(row[i]) * x[i];
    return sum;
}

// The nibbles of an octet's four 32-byte chunks (one block of eight rows, or eight blocks of one
// row): lo[c] the low nibbles of chunk c, hi[c] the high ones, as bytes 0..15.
AVX2 static inline void octet_nibbles(const uint8_t *octet, __m256i lo[4], __m256i hi[4]) {
    const __m256i mask = _mm256_set1_epi8(0x0F);
    for (int c = 0; c < 4; c++) {
        const __m256i v = _mm256_loadu_si256((const __m256i *)(octet + 16 + 32 * c));
        lo[c] = _mm256_and_si256(v, mask);
        hi[c] = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
    }
}

// Eight grouped rows against G tokens: each chunk's nibbles are unpacked once for all tokens, and
// BLOCK_DOT(lo, hi, x, seed) gives the eight rows' integer sums for one token's block (seeded
// with −8·Σx: unsigned nibbles 0..15 against signed activations, the seed removes the offset of
// 8 for all eight rows at once). Expanded inside functions compiled for AVX2 or AVX-512.
#define X8_TOKENS(G, BLOCK_DOT)                                                                             \
    for (; t + G <= tokens; t += G) {                                                                       \
        const uint8_t *p = group;                                                                           \
        __m256 acc[G];                                                                                      \
        for (int k = 0; k < G; k++) acc[k] = _mm256_setzero_ps();                                          \
        for (int b = 0; b < blocks; b++, p += 144) {                                                        \
            __m256i lo[4], hi[4];                                                                           \
            octet_nibbles(p, lo, hi);                                                                       \
            const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));                         \
            for (int k = 0; k < G; k++) {                                                                   \
                const size_t base = (size_t)(t + k) * blocks + b;                                           \
                const __m256i sums = BLOCK_DOT(lo, hi, (const int32_t *)(xq + base * 32), -8 * xsum[base]); \
                acc[k] = _mm256_fmadd_ps(_mm256_mul_ps(d, _mm256_set1_ps(xs[base])), _mm256_cvtepi32_ps(sums), acc[k]); \
            }                                                                                               \
        }                                                                                                   \
        for (int k = 0; k < G; k++) _mm256_storeu_ps(out + (size_t)(t + k) * out_stride, acc[k]);          \
    }

// AVX2 has no byte dot product into 32 bits: maddubs gives pairs in 16 bits, and the eight chunk
// halves of a block sum without overflow there (8 · 2 · 15 · 127 < 32768).
AVX2 static inline __m256i x8_block_avx2(const __m256i lo[4], const __m256i hi[4], const int32_t *x, int32_t seed) {
    __m256i s16 = _mm256_maddubs_epi16(lo[0], _mm256_set1_epi32(x[0]));
    for (int c = 1; c < 4; c++) s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(lo[c], _mm256_set1_epi32(x[c])));
    for (int c = 0; c < 4; c++) s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(hi[c], _mm256_set1_epi32(x[4 + c])));
    return _mm256_add_epi32(_mm256_madd_epi16(s16, _mm256_set1_epi16(1)), _mm256_set1_epi32(seed));
}

AVX2 static void dot_q4_0_x8_avx2(const void *group, const float *xs, const int8_t *xq, const int32_t *xsum, int blocks,
                                  int tokens, float *out, int out_stride) {
    int t = 0;
    X8_TOKENS(4, x8_block_avx2)
    X8_TOKENS(1, x8_block_avx2)
}

// Eight blocks of one row against G tokens' interleaved activations: each chunk's nibbles are
// unpacked once for all tokens, and BLOCK_DOT(lo, hi, x, seed) gives the eight blocks' integer
// sums (seeded with −8·Σx of each block).
#define B8_TOKENS(G, BLOCK_DOT)                                                                             \
    for (; t + G <= tokens; t += G) {                                                                       \
        const uint8_t *p = row;                                                                             \
        __m256 acc[G];                                                                                      \
        for (int k = 0; k < G; k++) acc[k] = _mm256_setzero_ps();                                          \
        for (int g = 0; g < blocks / 8; g++, p += 144) {                                                    \
            __m256i lo[4], hi[4];                                                                           \
            octet_nibbles(p, lo, hi);                                                                       \
            const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));                         \
            for (int k = 0; k < G; k++) {                                                                   \
                const size_t base = (size_t)(t + k) * blocks + 8 * g;                                       \
                const __m256i seed = _mm256_sub_epi32(zero, _mm256_slli_epi32(_mm256_loadu_si256((const __m256i *)(xsum + base)), 3)); \
                const __m256i sums = BLOCK_DOT(lo, hi, xr + base * 32, seed);                               \
                acc[k] = _mm256_fmadd_ps(_mm256_mul_ps(d, _mm256_loadu_ps(xs + base)), _mm256_cvtepi32_ps(sums), acc[k]); \
            }                                                                                               \
        }                                                                                                   \
        for (int k = 0; k < G; k++) out[(size_t)(t + k) * out_stride] = hsum256(acc[k]);                   \
    }

AVX2 static inline __m256i b8_block_avx2(const __m256i lo[4], const __m256i hi[4], const int8_t *x, __m256i seed) {
    __m256i s16 = _mm256_maddubs_epi16(lo[0], _mm256_loadu_si256((const __m256i *)x));
    for (int c = 1; c < 4; c++) s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(lo[c], _mm256_loadu_si256((const __m256i *)(x + 32 * c))));
    for (int c = 0; c < 4; c++) s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(hi[c], _mm256_loadu_si256((const __m256i *)(x + 128 + 32 * c))));
    return _mm256_add_epi32(_mm256_madd_epi16(s16, _mm256_set1_epi16(1)), seed);
}

AVX2 static void dot_q4_0_b8_row_avx2(const void *row, const float *xs, const int8_t *xr, const int32_t *xsum, int blocks,
                                      int tokens, float *out, int out_stride) {
    const __m256i zero = _mm256_setzero_si256();
    int t = 0;
    B8_TOKENS(4, b8_block_avx2)
    B8_TOKENS(1, b8_block_avx2)
}
B8_ROWS_VIA_ROW(dot_q4_0_b8_avx2, dot_q4_0_b8_row_avx2)

AVX2 static void axpy_q4_0_avx2(const void *row, float a, float *y, int n) {
    const uint8_t *w = row;
    const __m256i eight = _mm256_set1_epi8(8);
    for (int b = 0; b < n / 32; b++, w += 18) {
        const __m256 s = _mm256_set1_ps(a * _cvtsh_ss(load_u16(w)));
        const __m256i q = _mm256_sub_epi8(unpack_nibbles(w + 2), eight);
        const __m128i lo = _mm256_castsi256_si128(q), hi = _mm256_extracti128_si256(q, 1);
        float *o = y + b * 32;
        _mm256_storeu_ps(o, _mm256_fmadd_ps(s, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo)), _mm256_loadu_ps(o)));
        _mm256_storeu_ps(o + 8, _mm256_fmadd_ps(s, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(lo, 8))), _mm256_loadu_ps(o + 8)));
        _mm256_storeu_ps(o + 16, _mm256_fmadd_ps(s, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi)), _mm256_loadu_ps(o + 16)));
        _mm256_storeu_ps(o + 24, _mm256_fmadd_ps(s, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(hi, 8))), _mm256_loadu_ps(o + 24)));
    }
}

// Four rows at a time, so each 32-float slice of y is loaded and stored once per four rows (as the
// AVX-512 version). Nibbles become floats by zero extension and conversion, without the −8: each
// row's −8·scale is summed over the tile and added once per slice. Two lines of `next` are
// prefetched per block step.
AVX2 static inline void axpy_block_avx2(const uint8_t *w, float c, __m256 acc[4], float *bias) {
    const float s = c * _cvtsh_ss(load_u16(w));
    const __m256 vs = _mm256_set1_ps(s);
    const __m256i mask = _mm256_set1_epi32(0x0F);
    const __m256i b0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(w + 2)));
    const __m256i b1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(w + 10)));
    acc[0] = _mm256_fmadd_ps(vs, _mm256_cvtepi32_ps(_mm256_and_si256(b0, mask)), acc[0]);  // values 0..7
    acc[1] = _mm256_fmadd_ps(vs, _mm256_cvtepi32_ps(_mm256_and_si256(b1, mask)), acc[1]);  // 8..15
    acc[2] = _mm256_fmadd_ps(vs, _mm256_cvtepi32_ps(_mm256_srli_epi32(b0, 4)), acc[2]);    // 16..23
    acc[3] = _mm256_fmadd_ps(vs, _mm256_cvtepi32_ps(_mm256_srli_epi32(b1, 4)), acc[3]);    // 24..31
    *bias -= 8 * s;
}

// Two tokens' rows in one pass (a prompt's tokens that chose the same expert share most of its
// active neurons): each row block is unpacked once for both, and each output's 32-float slice is
// loaded and stored once per four rows.
AVX2 static void axpy_rows2_q4_0_avx2(const void *base, int row_bytes, const int *rows, const float *c0, const float *c1, int count,
                                      float *y0, float *y1, int n) {
    const uint8_t *m = base;
    const int blocks = n / 32;
    const __m256i mask = _mm256_set1_epi32(0x0F);
    for (int a = 0; a < count; a += 4) {
        const int tile = count - a < 4 ? count - a : 4;
        const uint8_t *w[4];
        for (int k = 0; k < tile; k++) w[k] = m + (size_t)rows[a + k] * row_bytes;
        for (int k = 4; k < 8 && a + k < count; k++) prefetch_l2(m + (size_t)rows[a + k] * row_bytes, row_bytes);
        for (int b = 0; b < blocks; b++) {
            float *o0 = y0 + b * 32, *o1 = y1 + b * 32;
            __m256 p[4], q[4];
            for (int v = 0; v < 4; v++) { p[v] = _mm256_loadu_ps(o0 + 8 * v); q[v] = _mm256_loadu_ps(o1 + 8 * v); }
            float bias0 = 0, bias1 = 0;
            for (int k = 0; k < tile; k++) {
                const uint8_t *wb = w[k] + (size_t)b * 18;
                const float d = _cvtsh_ss(load_u16(wb));
                const float s0 = c0[a + k] * d, s1 = c1[a + k] * d;
                const __m256i b0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(wb + 2)));
                const __m256i b1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(wb + 10)));
                const __m256 f[4] = {_mm256_cvtepi32_ps(_mm256_and_si256(b0, mask)), _mm256_cvtepi32_ps(_mm256_and_si256(b1, mask)),
                                     _mm256_cvtepi32_ps(_mm256_srli_epi32(b0, 4)), _mm256_cvtepi32_ps(_mm256_srli_epi32(b1, 4))};
                const __m256 v0 = _mm256_set1_ps(s0), v1 = _mm256_set1_ps(s1);
                for (int v = 0; v < 4; v++) { p[v] = _mm256_fmadd_ps(v0, f[v], p[v]); q[v] = _mm256_fmadd_ps(v1, f[v], q[v]); }
                bias0 -= 8 * s0;
                bias1 -= 8 * s1;
            }
            const __m256 e0 = _mm256_set1_ps(bias0), e1 = _mm256_set1_ps(bias1);
            for (int v = 0; v < 4; v++) {
                _mm256_storeu_ps(o0 + 8 * v, _mm256_add_ps(p[v], e0));
                _mm256_storeu_ps(o1 + 8 * v, _mm256_add_ps(q[v], e1));
            }
        }
    }
}

AVX2 static void axpy_rows_q4_0_avx2(const void *base, int row_bytes, const int *rows, const float *coefficients, int count,
                                     float *y, int n, const void *next, int next_bytes) {
    const uint8_t *m = base;
    const char *ahead = next, *ahead_end = next ? (const char *)next + next_bytes : NULL;
    const int blocks = n / 32;
    int a = 0;
    for (; a < count; a += 4) {
        const int tile = count - a < 4 ? count - a : 4;
        const uint8_t *w[4];
        for (int k = 0; k < tile; k++) w[k] = m + (size_t)rows[a + k] * row_bytes;
        for (int k = 4; k < 8 && a + k < count; k++) prefetch_l2(m + (size_t)rows[a + k] * row_bytes, row_bytes);
        for (int b = 0; b < blocks; b++) {
            float *o = y + b * 32;
            if (ahead < ahead_end) { prefetch_l2(ahead, tile == 4 ? 128 : 64); ahead += tile == 4 ? 128 : 64; }
            __m256 acc[4] = {_mm256_loadu_ps(o), _mm256_loadu_ps(o + 8), _mm256_loadu_ps(o + 16), _mm256_loadu_ps(o + 24)};
            float bias = 0;
            if (tile == 4) {
                axpy_block_avx2(w[0] + (size_t)b * 18, coefficients[a], acc, &bias);
                axpy_block_avx2(w[1] + (size_t)b * 18, coefficients[a + 1], acc, &bias);
                axpy_block_avx2(w[2] + (size_t)b * 18, coefficients[a + 2], acc, &bias);
                axpy_block_avx2(w[3] + (size_t)b * 18, coefficients[a + 3], acc, &bias);
            } else {
                for (int k = 0; k < tile; k++) axpy_block_avx2(w[k] + (size_t)b * 18, coefficients[a + k], acc, &bias);
            }
            const __m256 vb = _mm256_set1_ps(bias);
            for (int k = 0; k < 4; k++) _mm256_storeu_ps(o + 8 * k, _mm256_add_ps(acc[k], vb));
        }
    }
}

AVX2 static void axpy_q8_0_avx2(const void *row, float a, float *y, int n) {
    const uint8_t *w = row;
    for (int b = 0; b < n / 32; b++, w += 34) {
        const __m256 s = _mm256_set1_ps(a * _cvtsh_ss(load_u16(w)));
        float *o = y + b * 32;
        for (int k = 0; k < 4; k++) {
            const __m256 q = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(w + 2 + 8 * k))));
            _mm256_storeu_ps(o + 8 * k, _mm256_fmadd_ps(s, q, _mm256_loadu_ps(o + 8 * k)));
        }
    }
}

AVX2 static void axpy_f32_avx2(const float *row, float a, float *y, int n) {
    const __m256 s = _mm256_set1_ps(a);
    int i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(s, _mm256_loadu_ps(row + i), _mm256_loadu_ps(y + i)));
    for (; i < n; i++) y[i] += a * row[i];
}

AVX2 static void axpy_bf16_avx2(const uint16_t *row, float a, float *y, int n) {
    const __m256 s = _mm256_set1_ps(a);
    int i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(s, load_bf16x8(row + i), _mm256_loadu_ps(y + i)));
    for (; i < n; i++) y[i] += a * bf16_to_fp32(row[i]);
}

AVX2 static void axpy_f16_avx2(const uint16_t *row, float a, float *y, int n) {
    const __m256 s = _mm256_set1_ps(a);
    int i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(s, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(row + i))), _mm256_loadu_ps(y + i)));
    for (; i < n; i++) y[i] += a * fp16_to_fp32(row[i]);
}

// e^x for x ≤ 0, eight lanes (EXP_REDUCED), scaled by 2^n built in the exponent bits (x is
// clamped at −87, where e^x is below 2e−38).
AVX2 static inline __m256 exp_nonpositive_avx2(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r, p;
    EXP_REDUCED(x, n, r, p, _mm256_fmadd_ps, _mm256_fnmadd_ps, _mm256_set1_ps);
    const __m256i scale = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(scale));
}

// Lane i: the sum of the eight lanes of v[i] (two rounds of horizontal adds within each half,
// then the halves added).
AVX2 static inline __m256 sum8(const __m256 v[8]) {
    const __m256 b0 = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
    const __m256 b1 = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
    return _mm256_add_ps(_mm256_permute2f128_ps(b0, b1, 0x20), _mm256_permute2f128_ps(b0, b1, 0x31));
}

AVX2 static inline float hmax256(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    return _mm_cvtss_f32(m);
}

// The AVX-512 attention's shape at eight positions a block: each block's keys and values are
// read from memory once for every head of the group, a head's eight scores go through one
// vector exp, and its running output is rescaled once per block. head_dim a multiple of 8.
AVX2 static void attend_avx2(const float *queries, int heads, const float *keys, const float *values, int capacity, int stride,
                             int first, int last, int head_dim, float scale, float *outs) {
    if (head_dim % 8 != 0 || heads > 64) {
        attend_portable(queries, heads, keys, values, capacity, stride, first, last, head_dim, scale, outs);
        return;
    }
    float maxima[64], sums[64];
    for (int h = 0; h < heads; h++) {
        maxima[h] = -INFINITY;
        sums[h] = 0;
        for (int i = 0; i < head_dim; i++) outs[(size_t)h * head_dim + i] = 0;
    }
    const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    for (int j0 = first; j0 <= last; j0 += 8) {
        const int count = last - j0 + 1 < 8 ? last - j0 + 1 : 8;
        const __m256 valid = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(count), lanes));
        const float *k[8], *v[8];
        attention_block(keys, values, capacity, stride, j0, count, 8, last, head_dim, k, v);
        for (int h = 0; h < heads; h++) {
            const float *q = queries + (size_t)h * head_dim;
            float *out = outs + (size_t)h * head_dim;
            __m256 dots[8];
            for (int p = 0; p < 8; p++) dots[p] = _mm256_setzero_ps();
            for (int c = 0; c < head_dim; c += 8) {
                const __m256 qc = _mm256_loadu_ps(q + c);
                for (int p = 0; p < 8; p++) dots[p] = _mm256_fmadd_ps(qc, _mm256_loadu_ps(k[p] + c), dots[p]);
            }
            const __m256 s = _mm256_blendv_ps(_mm256_set1_ps(-INFINITY), _mm256_mul_ps(sum8(dots), _mm256_set1_ps(scale)), valid);
            const float block_max = hmax256(s);
            const float new_max = block_max > maxima[h] ? block_max : maxima[h];
            const float rescale = expf(maxima[h] - new_max);
            const __m256 w = _mm256_and_ps(valid, exp_nonpositive_avx2(_mm256_sub_ps(s, _mm256_set1_ps(new_max))));
            sums[h] = sums[h] * rescale + hsum256(w);
            maxima[h] = new_max;
            float weights[8];
            _mm256_storeu_ps(weights, w);
            const __m256 r = _mm256_set1_ps(rescale);
            for (int c = 0; c < head_dim; c += 8) {
                __m256 acc = _mm256_mul_ps(_mm256_loadu_ps(out + c), r);
                for (int p = 0; p < count; p++) acc = _mm256_fmadd_ps(_mm256_set1_ps(weights[p]), _mm256_loadu_ps(v[p] + c), acc);
                _mm256_storeu_ps(out + c, acc);
            }
        }
    }
    for (int h = 0; h < heads; h++) {
        const __m256 inverse = _mm256_set1_ps(1 / sums[h]);
        float *out = outs + (size_t)h * head_dim;
        for (int c = 0; c < head_dim; c += 8) _mm256_storeu_ps(out + c, _mm256_mul_ps(_mm256_loadu_ps(out + c), inverse));
    }
}

// Activations to Q8_0 as quantize_q8_0_portable, eight lanes at a time: d = amax / 127, and
// q = roundf(x / d) with roundf's ties away from zero done exactly (truncate, then step away
// from zero when the dropped fraction is at least one half), as the AVX-512 version does.
AVX2 static void quantize_q8_0_avx2(const float *x, float *scales, int8_t *q, int32_t *sums, int n) {
    const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    const __m256 sign_mask = _mm256_castsi256_ps(_mm256_set1_epi32((int)0x80000000));
    for (int b = 0; b < n / 32; b++) {
        __m256 v[4];
        for (int k = 0; k < 4; k++) v[k] = _mm256_loadu_ps(x + b * 32 + 8 * k);
        const __m256 m = _mm256_max_ps(_mm256_max_ps(_mm256_and_ps(v[0], abs_mask), _mm256_and_ps(v[1], abs_mask)),
                                       _mm256_max_ps(_mm256_and_ps(v[2], abs_mask), _mm256_and_ps(v[3], abs_mask)));
        const float amax = hmax256(m);
        const float d = amax / 127.0f;
        const float id = d != 0 ? 1.0f / d : 0.0f;
        scales[b] = d;
        __m256i lanes[4];
        for (int k = 0; k < 4; k++) {
            const __m256 y = _mm256_mul_ps(v[k], _mm256_set1_ps(id));
            const __m256 t = _mm256_round_ps(y, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
            const __m256 away = _mm256_cmp_ps(_mm256_and_ps(_mm256_sub_ps(y, t), abs_mask), _mm256_set1_ps(0.5f), _CMP_GE_OQ);
            const __m256 step = _mm256_or_ps(_mm256_set1_ps(1.0f), _mm256_and_ps(y, sign_mask));
            lanes[k] = _mm256_cvttps_epi32(_mm256_add_ps(t, _mm256_and_ps(away, step)));
        }
        // Pack 32 int32 lanes to int8 in order (the packs work per 128-bit half; one permute
        // puts the dwords back in order).
        const __m256i p16a = _mm256_packs_epi32(lanes[0], lanes[1]), p16b = _mm256_packs_epi32(lanes[2], lanes[3]);
        const __m256i p8 = _mm256_packs_epi16(p16a, p16b);
        _mm256_storeu_si256((__m256i *)(q + b * 32), _mm256_permutevar8x32_epi32(p8, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
        const __m256i total = _mm256_add_epi32(_mm256_add_epi32(lanes[0], lanes[1]), _mm256_add_epi32(lanes[2], lanes[3]));
        __m128i t4 = _mm_add_epi32(_mm256_castsi256_si128(total), _mm256_extracti128_si256(total, 1));
        t4 = _mm_add_epi32(t4, _mm_shuffle_epi32(t4, _MM_SHUFFLE(1, 0, 3, 2)));
        t4 = _mm_add_epi32(t4, _mm_shuffle_epi32(t4, _MM_SHUFFLE(2, 3, 0, 1)));
        sums[b] = _mm_cvtsi128_si32(t4);
    }
}

// ---------------------------------------------------------------- AVX-512 VNNI (256-bit VL forms)

#define AVX512 __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")))

/// y += a · row for a Q4_0 row, 16 floats per instruction.
AVX512 static void axpy_q4_0_avx512(const void *row, float a, float *y, int n) {
    const uint8_t *w = row;
    const __m256i eight = _mm256_set1_epi8(8);
    for (int b = 0; b < n / 32; b++, w += 18) {
        const __m512 s = _mm512_set1_ps(a * _cvtsh_ss(load_u16(w)));
        const __m256i q = _mm256_sub_epi8(unpack_nibbles(w + 2), eight);
        float *o = y + b * 32;
        _mm512_storeu_ps(o, _mm512_fmadd_ps(s, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(q))), _mm512_loadu_ps(o)));
        _mm512_storeu_ps(o + 16, _mm512_fmadd_ps(s, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(q, 1))), _mm512_loadu_ps(o + 16)));
    }
}

// Σ w·x = Σ (w + 128)·x − 128·Σx, with w + 128 unsigned.
AVX512 static float dot_q8_0_avx512(const void *row, const float *xs, const int8_t *xq, const int32_t *xsum, int blocks) {
    const uint8_t *w = row;
    __m256 acc = _mm256_setzero_ps();
    float correction = 0;
    const __m256i bias = _mm256_set1_epi8((char)0x80);
    for (int b = 0; b < blocks; b++, w += 34) {
        const __m256i wq = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(w + 2)), bias);
        const __m256i x = _mm256_loadu_si256((const __m256i *)(xq + b * 32));
        const __m256i dots = _mm256_dpbusd_epi32(_mm256_setzero_si256(), wq, x);
        const float s = _cvtsh_ss(load_u16(w)) * xs[b];
        acc = _mm256_fmadd_ps(_mm256_set1_ps(s), _mm256_cvtepi32_ps(dots), acc);
        correction += s * (float)xsum[b];
    }
    return hsum256(acc) - 128.0f * correction;
}

/// One row with 256-bit VNNI: one dpbusd per block seeded with −8·Σx; two accumulators.
AVX512 static float dot_q4_0_vnni256(const void *row, const float *xs, const int8_t *xq, const int32_t *xsum, int blocks) {
    const uint8_t *w = row;
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    int b = 0;
    for (; b + 2 <= blocks; b += 2, w += 36) {
        const __m256i s0 = _mm256_zextsi128_si256(_mm_cvtsi32_si128(-8 * xsum[b]));
        const __m256i s1 = _mm256_zextsi128_si256(_mm_cvtsi32_si128(-8 * xsum[b + 1]));
        const __m256i d0 = _mm256_dpbusd_epi32(s0, unpack_nibbles(w + 2), _mm256_loadu_si256((const __m256i *)(xq + b * 32)));
        const __m256i d1 = _mm256_dpbusd_epi32(s1, unpack_nibbles(w + 20), _mm256_loadu_si256((const __m256i *)(xq + b * 32 + 32)));
        a0 = _mm256_fmadd_ps(_mm256_set1_ps(_cvtsh_ss(load_u16(w)) * xs[b]), _mm256_cvtepi32_ps(d0), a0);
        a1 = _mm256_fmadd_ps(_mm256_set1_ps(_cvtsh_ss(load_u16(w + 18)) * xs[b + 1]), _mm256_cvtepi32_ps(d1), a1);
    }
    float sum = hsum256(_mm256_add_ps(a0, a1));
    if (b < blocks) sum += dot_q4_0_portable(w, xs + b, xq + b * 32, xsum + b, blocks - b);
    return sum;
}

/// Eight tokens at a time (then four, then one): each weight block is unpacked once and used for
/// every token of the group (256-bit VNNI: cores that split 512-bit work in two run this shape
/// faster).
#define Q4_TOKENS_GROUP(G)                                                                                   \
    for (; t + G <= tokens; t += G) {                                                                        \
        const uint8_t *w = row;                                                                              \
        __m256 acc[G];                                                                                       \
        for (int k = 0; k < G; k++) acc[k] = _mm256_setzero_ps();                                           \
        for (int b = 0; b < blocks; b++, w += 18) {                                                          \
            const __m256i nibbles = unpack_nibbles(w + 2);                                                   \
            const float d = _cvtsh_ss(load_u16(w));                                                          \
            for (int k = 0; k < G; k++) {                                                                    \
                const size_t base = (size_t)(t + k) * blocks + b;                                            \
                const __m256i seed = _mm256_zextsi128_si256(_mm_cvtsi32_si128(-8 * xsum[base]));             \
                const __m256i dots = _mm256_dpbusd_epi32(seed, nibbles, _mm256_loadu_si256((const __m256i *)(xq + base * 32))); \
                acc[k] = _mm256_fmadd_ps(_mm256_set1_ps(d * xs[base]), _mm256_cvtepi32_ps(dots), acc[k]);   \
            }                                                                                                \
        }                                                                                                    \
        for (int k = 0; k < G; k++) out[(size_t)(t + k) * out_stride] = hsum256(acc[k]);                    \
    }

AVX512 static void dot_q4_0_tokens_avx512(const void *row, const float *xs, const int8_t *xq, const int32_t *xsum, int blocks,
                                          int tokens, float *out, int out_stride) {
    int t = 0;
    Q4_TOKENS_GROUP(8)
    Q4_TOKENS_GROUP(4)
    for (; t < tokens; t++) {
        out[(size_t)t * out_stride] = dot_q4_0_vnni256(row, xs + (size_t)t * blocks, xq + (size_t)t * blocks * 32, xsum + (size_t)t * blocks, blocks);
    }
}

TOKENS_VIA_DOT(dot_q8_0_tokens_avx512, dot_q8_0_avx512)

// Four rows at a time, so each 32-float slice of y is loaded and stored once per four rows; the
// nibbles become floats through a 16-entry table (vpermps reads the low four bits of each lane).
// Two lines of `next` are prefetched per block step.
AVX512 static void axpy_rows_q4_0_avx512(const void *base, int row_bytes, const int *rows, const float *coefficients, int count,
                                         float *y, int n, const void *next, int next_bytes) {
    const uint8_t *m = base;
    const char *ahead = next, *ahead_end = next ? (const char *)next + next_bytes : NULL;
    const __m512 table = _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);
    const int blocks = n / 32;
    int a = 0;
    for (; a + 4 <= count; a += 4) {
        const uint8_t *w0 = m + (size_t)rows[a] * row_bytes, *w1 = m + (size_t)rows[a + 1] * row_bytes;
        const uint8_t *w2 = m + (size_t)rows[a + 2] * row_bytes, *w3 = m + (size_t)rows[a + 3] * row_bytes;
        // The next tile's rows.
        for (int k = 4; k < 8 && a + k < count; k++) prefetch_l2(m + (size_t)rows[a + k] * row_bytes, row_bytes);
        const float c0 = coefficients[a], c1 = coefficients[a + 1], c2 = coefficients[a + 2], c3 = coefficients[a + 3];
        for (int b = 0; b < blocks; b++, w0 += 18, w1 += 18, w2 += 18, w3 += 18) {
            float *o = y + b * 32;
            if (ahead < ahead_end) { prefetch_l2(ahead, 128); ahead += 128; }
            __m512 lo = _mm512_loadu_ps(o), hi = _mm512_loadu_ps(o + 16);
#define ST_AXPY_ROW(w, c)                                                                                  \
            {                                                                                              \
                const __m512 s = _mm512_set1_ps((c) * _cvtsh_ss(load_u16(w)));                            \
                const __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)((w) + 2)));       \
                lo = _mm512_fmadd_ps(s, _mm512_permutexvar_ps(q, table), lo);                              \
                hi = _mm512_fmadd_ps(s, _mm512_permutexvar_ps(_mm512_srli_epi32(q, 4), table), hi);        \
            }
            ST_AXPY_ROW(w0, c0) ST_AXPY_ROW(w1, c1) ST_AXPY_ROW(w2, c2) ST_AXPY_ROW(w3, c3)
            _mm512_storeu_ps(o, lo);
            _mm512_storeu_ps(o + 16, hi);
        }
    }
    for (; a < count; a++) {
        const uint8_t *w0 = m + (size_t)rows[a] * row_bytes;
        const float c0 = coefficients[a];
        for (int b = 0; b < blocks; b++, w0 += 18) {
            float *o = y + b * 32;
            if (ahead < ahead_end) { prefetch_l2(ahead, 64); ahead += 64; }
            __m512 lo = _mm512_loadu_ps(o), hi = _mm512_loadu_ps(o + 16);
            ST_AXPY_ROW(w0, c0)
#undef ST_AXPY_ROW
            _mm512_storeu_ps(o, lo);
            _mm512_storeu_ps(o + 16, hi);
        }
    }
}

// e^x for x ≤ 0, 16 lanes (EXP_REDUCED), scaled by 2^n with vscalefps (which also underflows
// to 0).
AVX512 static inline __m512 exp_nonpositive(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-104.0f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r, p;
    EXP_REDUCED(x, n, r, p, _mm512_fmadd_ps, _mm512_fnmadd_ps, _mm512_set1_ps);
    return _mm512_scalef_ps(p, n);
}

// Lane i: the sum of the sixteen lanes of v[i]. Halving steps, each adding two shuffles of a
// pair of vectors, leave lane i holding v[perm[i]]'s sum; one permutation (perm is its own
// inverse) puts them in order.
AVX512 static inline __m512 sum16(const __m512 v[16]) {
    __m512 a[8], b[4], c[2];
    for (int i = 0; i < 8; i++) {
        a[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[i], v[i + 8], _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_f32x4(v[i], v[i + 8], _MM_SHUFFLE(3, 2, 3, 2)));
    }
    for (int i = 0; i < 4; i++) {
        b[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[i], a[i + 4], _MM_SHUFFLE(2, 0, 2, 0)),
                             _mm512_shuffle_f32x4(a[i], a[i + 4], _MM_SHUFFLE(3, 1, 3, 1)));
    }
    for (int i = 0; i < 2; i++) c[i] = _mm512_add_ps(_mm512_unpacklo_ps(b[i], b[i + 2]), _mm512_unpackhi_ps(b[i], b[i + 2]));
    const __m512 d = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(c[0]), _mm512_castps_pd(c[1]))),
                                   _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(c[0]), _mm512_castps_pd(c[1]))));
    return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 2, 1, 3, 8, 10, 9, 11, 4, 6, 5, 7, 12, 14, 13, 15), d);
}

// Sixteen positions at a time: their keys and values are read from memory once for every head
// of the group (then from L1), each head's sixteen scores go through one vector exp, and its
// running output is rescaled once per block. head_dim a multiple of 16, at most 128.
// head_dim = 16·n; inlined with n a constant for the common 128, so the loops over a row unroll
// into registers.
AVX512 __attribute__((always_inline)) static inline void attend_avx512_n(const float *queries, int heads, const float *keys,
                                                                        const float *values, int capacity, int stride, int first,
                                                                        int last, int head_dim, float scale, float *outs, const int n) {
    float maxima[64], sums[64];
    for (int h = 0; h < heads; h++) {
        maxima[h] = -INFINITY;
        sums[h] = 0;
        for (int i = 0; i < head_dim; i++) outs[(size_t)h * head_dim + i] = 0;
    }
    for (int j0 = first; j0 <= last; j0 += 16) {
        const int count = last - j0 + 1 < 16 ? last - j0 + 1 : 16;
        const __mmask16 valid = (__mmask16)((1u << count) - 1);
        const float *k[16], *v[16];
        attention_block(keys, values, capacity, stride, j0, count, 16, last, head_dim, k, v);
        for (int h = 0; h < heads; h++) {
            const float *q = queries + (size_t)h * head_dim;
            float *out = outs + (size_t)h * head_dim;
            __m512 qv[8], acc[8];
            for (int c = 0; c < n; c++) qv[c] = _mm512_loadu_ps(q + 16 * c);
            // Sixteen independent dot products (no chain waits on another), then one
            // transposing reduction gives all sixteen scores in one vector.
            __m512 dots[16];
            for (int p = 0; p < 16; p++) {
                if (p >= count) { dots[p] = _mm512_setzero_ps(); continue; }
                __m512 d = _mm512_mul_ps(qv[0], _mm512_loadu_ps(k[p]));
                for (int c = 1; c < n; c++) d = _mm512_fmadd_ps(qv[c], _mm512_loadu_ps(k[p] + 16 * c), d);
                dots[p] = d;
            }
            const __m512 s = _mm512_mask_mov_ps(_mm512_set1_ps(-INFINITY), valid, _mm512_mul_ps(sum16(dots), _mm512_set1_ps(scale)));
            const float block_max = _mm512_reduce_max_ps(s);
            const float new_max = block_max > maxima[h] ? block_max : maxima[h];
            const float rescale = expf(maxima[h] - new_max);
            const __m512 w = _mm512_maskz_mov_ps(valid, exp_nonpositive(_mm512_sub_ps(s, _mm512_set1_ps(new_max))));
            sums[h] = sums[h] * rescale + _mm512_reduce_add_ps(w);
            maxima[h] = new_max;
            float weights[16];
            _mm512_storeu_ps(weights, w);
            const __m512 r = _mm512_set1_ps(rescale);
            for (int c = 0; c < n; c++) acc[c] = _mm512_mul_ps(_mm512_loadu_ps(out + 16 * c), r);
            for (int p = 0; p < count; p++) {
                const __m512 wp = _mm512_set1_ps(weights[p]);
                for (int c = 0; c < n; c++) acc[c] = _mm512_fmadd_ps(wp, _mm512_loadu_ps(v[p] + 16 * c), acc[c]);
            }
            for (int c = 0; c < n; c++) _mm512_storeu_ps(out + 16 * c, acc[c]);
        }
    }
    for (int h = 0; h < heads; h++) {
        const __m512 inverse = _mm512_set1_ps(1 / sums[h]);
        float *out = outs + (size_t)h * head_dim;
        for (int c = 0; c < n; c++) _mm512_storeu_ps(out + 16 * c, _mm512_mul_ps(_mm512_loadu_ps(out + 16 * c), inverse));
    }
}

AVX512 static void attend_avx512(const float *queries, int heads, const float *keys, const float *values, int capacity, int stride,
                                 int first, int last, int head_dim, float scale, float *outs) {
    if (head_dim % 16 != 0 || head_dim > 128 || heads > 64) {
        attend_portable(queries, heads, keys, values, capacity, stride, first, last, head_dim, scale, outs);
    } else if (head_dim == 128) {
        attend_avx512_n(queries, heads, keys, values, capacity, stride, first, last, head_dim, scale, outs, 8);
    } else {
        attend_avx512_n(queries, heads, keys, values, capacity, stride, first, last, head_dim, scale, outs, head_dim / 16);
    }
}

// Activations to Q8_0 as quantize_q8_0_portable, sixteen lanes at a time: d = amax / 127, and
// q = roundf(x / d) with roundf's ties away from zero done exactly (truncate, then step away from
// zero when the dropped fraction is at least one half), which vroundps's ties-to-even would not.
AVX512 static void quantize_q8_0_avx512(const float *x, float *scales, int8_t *q, int32_t *sums, int n) {
    const __m512i sign_mask = _mm512_set1_epi32((int)0x80000000);
    for (int b = 0; b < n / 32; b++) {
        const __m512 v0 = _mm512_loadu_ps(x + b * 32), v1 = _mm512_loadu_ps(x + b * 32 + 16);
        const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
        const float d = amax / 127.0f;
        const float id = d != 0 ? 1.0f / d : 0.0f;
        scales[b] = d;
        __m512i lanes[2];
        const __m512 vs[2] = {v0, v1};
        for (int h = 0; h < 2; h++) {
            const __m512 y = _mm512_mul_ps(vs[h], _mm512_set1_ps(id));
            const __m512 t = _mm512_roundscale_ps(y, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
            const __mmask16 away = _mm512_cmp_ps_mask(_mm512_abs_ps(_mm512_sub_ps(y, t)), _mm512_set1_ps(0.5f), _CMP_GE_OQ);
            const __m512 step = _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(_mm512_set1_ps(1.0f)),
                                                                    _mm512_and_si512(_mm512_castps_si512(y), sign_mask)));
            lanes[h] = _mm512_cvttps_epi32(_mm512_mask_add_ps(t, away, t, step));
        }
        _mm_storeu_si128((__m128i *)(q + b * 32), _mm512_cvtsepi32_epi8(lanes[0]));
        _mm_storeu_si128((__m128i *)(q + b * 32 + 16), _mm512_cvtsepi32_epi8(lanes[1]));
        sums[b] = _mm512_reduce_add_epi32(_mm512_add_epi32(lanes[0], lanes[1]));
    }
}

// The VNNI form: one vpdpbusd per chunk half.
AVX512 static inline __m256i x8_block_vnni(const __m256i lo[4], const __m256i hi[4], const int32_t *x, int32_t seed) {
    __m256i a0 = _mm256_set1_epi32(seed), a1 = _mm256_setzero_si256();
    for (int c = 0; c < 4; c++) {
        a0 = _mm256_dpbusd_epi32(a0, lo[c], _mm256_set1_epi32(x[c]));
        a1 = _mm256_dpbusd_epi32(a1, hi[c], _mm256_set1_epi32(x[4 + c]));
    }
    return _mm256_add_epi32(a0, a1);
}

AVX512 static void dot_q4_0_x8_avx512(const void *group, const float *xs, const int8_t *xq, const int32_t *xsum, int blocks,
                                      int tokens, float *out, int out_stride) {
    int t = 0;
    X8_TOKENS(8, x8_block_vnni)
    X8_TOKENS(4, x8_block_vnni)
    X8_TOKENS(1, x8_block_vnni)
}

AVX512 static inline __m256i b8_block_vnni(const __m256i lo[4], const __m256i hi[4], const int8_t *x, __m256i seed) {
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
        const uint8_t *p0 = row, *p1 = (const uint8_t *)row + row_bytes;                                  \
        __m256 acc0[G], acc1[G];                                                                            \
        for (int k = 0; k < G; k++) acc0[k] = acc1[k] = _mm256_setzero_ps();                               \
        for (int g = 0; g < blocks / 8; g++, p0 += 144, p1 += 144) {                                        \
            __m256i lo0[4], hi0[4], lo1[4], hi1[4];                                                         \
            octet_nibbles(p0, lo0, hi0);                                                                    \
            octet_nibbles(p1, lo1, hi1);                                                                    \
            const __m256 d0 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p0));                       \
            const __m256 d1 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p1));                       \
            for (int k = 0; k < G; k++) {                                                                   \
                const size_t base = (size_t)(t + k) * blocks + 8 * g;                                       \
                const int8_t *x = xr + base * 32;                                                           \
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
            out[(size_t)(t + k) * out_stride] = hsum256(acc0[k]);                                           \
            out[(size_t)(t + k) * out_stride + 1] = hsum256(acc1[k]);                                       \
        }                                                                                                   \
    }

AVX512 static void dot_q4_0_b8_avx512(const void *row, int row_bytes, int rows, const float *xs, const int8_t *xr, const int32_t *xsum,
                                      int blocks, int tokens, float *out, int out_stride) {
    const __m256i zero = _mm256_setzero_si256();
    int t = 0;
    if (rows == 2) {
        B8_PAIR_TOKENS(4)
        B8_PAIR_TOKENS(1)
        return;
    }
    B8_TOKENS(8, b8_block_vnni)
    B8_TOKENS(4, b8_block_vnni)
    B8_TOKENS(1, b8_block_vnni)
}

TOKENS_VIA_DOT(dot_q4_0_tokens_avx2, dot_q4_0_avx2)
TOKENS_VIA_DOT(dot_q8_0_tokens_avx2, dot_q8_0_avx2)
AXPY_ROWS2_VIA_AXPY(axpy_rows2_q4_0_avx512, axpy_q4_0_avx512)
#endif

// ---------------------------------------------------------------- dispatch

typedef st_kernel_table kernel_table;

static const kernel_table portable = {
    dot_q4_0_portable, dot_q8_0_portable, dot_q4_0_tokens_portable, dot_q8_0_tokens_portable, dot_f32_portable, dot_bf16_portable, dot_f16_portable,
    axpy_q4_0_portable, axpy_q8_0_portable, axpy_f32_portable, axpy_bf16_portable, axpy_f16_portable,
    quantize_q8_0_portable, dot_q4_0_x8_portable, dot_q4_0_b8_portable, axpy_rows_q4_0_portable, attend_portable,
    axpy_rows2_q4_0_portable,
};

#ifdef ST_X86
static const kernel_table avx2 = {
    dot_q4_0_avx2, dot_q8_0_avx2, dot_q4_0_tokens_avx2, dot_q8_0_tokens_avx2, dot_f32_avx2, dot_bf16_avx2, dot_f16_avx2,
    axpy_q4_0_avx2, axpy_q8_0_avx2, axpy_f32_avx2, axpy_bf16_avx2, axpy_f16_avx2,
    quantize_q8_0_avx2, dot_q4_0_x8_avx2, dot_q4_0_b8_avx2, axpy_rows_q4_0_avx2, attend_avx2,
    axpy_rows2_q4_0_avx2,
};
static const kernel_table avx512 = {
    dot_q4_0_vnni256, dot_q8_0_avx512, dot_q4_0_tokens_avx512, dot_q8_0_tokens_avx512, dot_f32_avx2, dot_bf16_avx2, dot_f16_avx2,
    axpy_q4_0_avx512, axpy_q8_0_avx2, axpy_f32_avx2, axpy_bf16_avx2, axpy_f16_avx2,
    quantize_q8_0_avx512, dot_q4_0_x8_avx512, dot_q4_0_b8_avx512, axpy_rows_q4_0_avx512, attend_avx512,
    axpy_rows2_q4_0_avx512,
};
#endif

static const kernel_table *active = &portable;
static int active_isa = -1;
// A thread's own choice (st_kernels_bind), which wins over the process-wide one: sessions that
// run different tiers side by side (the tests run every model check under every tier) each bind
// theirs on the threads that compute for them.
static _Thread_local const kernel_table *bound = 0;
static _Thread_local int bound_isa = -1;

int st_detect_isa(void) {
#ifdef ST_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
        return ST_ISA_AVX512;
    }
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) {
        return ST_ISA_AVX2;
    }
#endif
    return ST_ISA_PORTABLE;
}

const st_kernel_table *st_kernels_for(int isa) {
    if (isa < 0 || isa > st_detect_isa()) return 0;
#ifdef ST_X86
    if (isa == ST_ISA_AVX512) return &avx512;
    if (isa == ST_ISA_AVX2) return &avx2;
#endif
    return &portable;
}

int st_kernels_select(int isa) {
    const int best = st_detect_isa();
    if (isa > best) isa = best;
    if (isa < 0) isa = 0;
    active = st_kernels_for(isa);
    active_isa = isa;
    return isa;
}

// Before anyone selects: STRUN_KERNELS where it names a tier this CPU has (the Swift side
// reports a bad value as an error), else the best detected.
static void select_default(void) {
    const char *name = getenv("STRUN_KERNELS");
    int isa = st_detect_isa();
    if (name && strcasecmp(name, "portable") == 0) isa = ST_ISA_PORTABLE;
    if (name && strcasecmp(name, "avx2") == 0 && isa >= ST_ISA_AVX2) isa = ST_ISA_AVX2;
    st_kernels_select(isa);
}

int st_kernels_isa(void) {
    if (bound) return bound_isa;
    if (active_isa < 0) select_default();
    return active_isa;
}

int st_kernels_bind(int isa) {
    const int previous = bound ? bound_isa : -1;
    const st_kernel_table *k = isa < 0 ? 0 : st_kernels_for(isa);
    if (isa >= 0 && !k) return -2;
    bound = k;
    bound_isa = k ? isa : -1;
    return previous;
}

int st_kernels_bound(void) { return bound ? bound_isa : -1; }

static inline const kernel_table *table(void) {
    if (bound) return bound;
    if (active_isa < 0) select_default();
    return active;
}

float st_dot_q4_0(const void *row, const float *xs, const int8_t *xq, const int32_t *xsum, int blocks) { return table()->dot_q4_0(row, xs, xq, xsum, blocks); }
float st_dot_q8_0(const void *row, const float *xs, const int8_t *xq, const int32_t *xsum, int blocks) { return table()->dot_q8_0(row, xs, xq, xsum, blocks); }
void st_dot_q4_0_tokens(const void *row, const float *xs, const int8_t *xq, const int32_t *xsum, int blocks, int tokens, float *out, int out_stride) {
    table()->dot_q4_0_tokens(row, xs, xq, xsum, blocks, tokens, out, out_stride);
}
void st_dot_q8_0_tokens(const void *row, const float *xs, const int8_t *xq, const int32_t *xsum, int blocks, int tokens, float *out, int out_stride) {
    table()->dot_q8_0_tokens(row, xs, xq, xsum, blocks, tokens, out, out_stride);
}
float st_dot_f32(const float *row, const float *x, int n) { return table()->dot_f32(row, x, n); }
float st_dot_bf16(const uint16_t *row, const float *x, int n) { return table()->dot_bf16(row, x, n); }
float st_dot_f16(const uint16_t *row, const float *x, int n) { return table()->dot_f16(row, x, n); }
void st_axpy_q4_0(const void *row, float a, float *y, int n) { table()->axpy_q4_0(row, a, y, n); }
void st_axpy_q8_0(const void *row, float a, float *y, int n) { table()->axpy_q8_0(row, a, y, n); }
void st_axpy_f32(const float *row, float a, float *y, int n) { table()->axpy_f32(row, a, y, n); }
void st_axpy_bf16(const uint16_t *row, float a, float *y, int n) { table()->axpy_bf16(row, a, y, n); }
void st_axpy_f16(const uint16_t *row, float a, float *y, int n) { table()->axpy_f16(row, a, y, n); }
void st_quantize_q8_0(const float *x, float *scales, int8_t *q, int32_t *sums, int n) { table()->quantize_q8_0(x, scales, q, sums, n); }

void st_prefetch(const void *p, int bytes) {
    const char *c = p;
    for (int i = 0; i < bytes; i += 64) __builtin_prefetch(c + i, 0, 3);
}

void st_matmul_quantized(int q8, const void *rows, int row_bytes, int first, int last, const float *xs, const int8_t *xq,
                         const int32_t *xsum, int blocks, int tokens, float *out, int out_stride) {
    const kernel_table *k = table();
    const uint8_t *base = rows;
    if (tokens == 1) {
        float (*dot)(const void *, const float *, const int8_t *, const int32_t *, int) = q8 ? k->dot_q8_0 : k->dot_q4_0;
        for (int r = first; r < last; r++) out[r] = dot(base + (size_t)r * row_bytes, xs, xq, xsum, blocks);
        return;
    }
    void (*many)(const void *, const float *, const int8_t *, const int32_t *, int, int, float *, int) =
        q8 ? k->dot_q8_0_tokens : k->dot_q4_0_tokens;
    for (int r = first; r < last; r++) many(base + (size_t)r * row_bytes, xs, xq, xsum, blocks, tokens, out + r, out_stride);
}

void st_expert_q4_0(const void *gate, const void *up, const void *down, int row_bytes, int first, int last,
                    const float *xs, const int8_t *xq, const int32_t *xsum, int blocks, float weight, float *out,
                    float *scratch) {
    const kernel_table *k = table();
    const uint8_t *g = gate, *u = up, *d = down;
    const int n = last - first;
    float *act = scratch;
    int *active = (int *)(scratch + n);
    int count = 0;
    for (int j = first; j < last; j++) {
        const float v = k->dot_q4_0(g + (size_t)j * row_bytes, xs, xq, xsum, blocks);
        if (v > 0) { act[count] = v; active[count] = j; count++; }
    }
    for (int a = 0; a < count; a++) {
        if (a + 2 < count) st_prefetch(u + (size_t)active[a + 2] * row_bytes, row_bytes);
        act[a] *= k->dot_q4_0(u + (size_t)active[a] * row_bytes, xs, xq, xsum, blocks);
    }
    for (int a = 0; a < count; a++) act[a] *= weight;
    k->axpy_rows_q4_0(d, row_bytes, active, act, count, out, blocks * 32, NULL, 0);
}

void st_matmul_q4_0_x8(const void *packed, int blocks, int first_group, int last_group, const float *xs, const int8_t *xq,
                       const int32_t *xsum, int tokens, float *out, int out_stride) {
    const kernel_table *k = table();
    const uint8_t *base = packed;
    for (int g = first_group; g < last_group; g++)
        k->dot_q4_0_x8(base + (size_t)g * blocks * 144, xs, xq, xsum, blocks, tokens, out + (size_t)g * 8, out_stride);
}

void st_matmul_q4_0_b8(const void *rows, int row_bytes, int first, int last, const float *xs, const int8_t *xr, const int32_t *xsum,
                       int blocks, int tokens, float *out, int out_stride) {
    const kernel_table *k = table();
    const uint8_t *base = rows;
    int r = first;
    for (; r + 2 <= last; r += 2) k->dot_q4_0_b8(base + (size_t)r * row_bytes, row_bytes, 2, xs, xr, xsum, blocks, tokens, out + r, out_stride);
    if (r < last) k->dot_q4_0_b8(base + (size_t)r * row_bytes, row_bytes, 1, xs, xr, xsum, blocks, tokens, out + r, out_stride);
}

void st_interleave_q8_0_b8(const int8_t *xq, int8_t *xr, int blocks) {
    for (int g = 0; g < blocks / 8; g++, xq += 256, xr += 256) {
        for (int c = 0; c < 8; c++) {
            // Vector c: lane k holds values 4c..4c+3 (c < 4: low nibbles) or 16+4(c−4).. of block k.
            const int from = c < 4 ? 4 * c : 16 + 4 * (c - 4);
            for (int k = 0; k < 8; k++) memcpy(xr + 32 * c + 4 * k, xq + 32 * k + from, 4);
        }
    }
}

// How many gate groups the up rows of row_major_b8 experts trail behind.
#define UP_LAG 3

// act *= up row j · x (row_major_b8), and start fetching down row j.
static inline void up_b8_row(const kernel_table *k, const uint8_t *u, const uint8_t *d, int row_bytes, int j, const float *xs,
                             const int8_t *xr, const int32_t *xsum, int blocks, float *act) {
    float v;
    k->dot_q4_0_b8(u + (size_t)j * row_bytes, row_bytes, 1, xs, xr, xsum, blocks, 1, &v, 1);
    *act *= v;
    prefetch_l2(d + (size_t)j * row_bytes, row_bytes);
}

void st_expert_q4_0_x8(const void *gate, const void *up, const void *down, int row_bytes, int first, int last,
                       const float *xs, const int8_t *xq, const int8_t *xr, const int32_t *xsum, int blocks, float weight,
                       float *out, float *scratch, const void *next, int next_bytes) {
    const kernel_table *k = table();
    const uint8_t *g = gate, *u = up, *d = down;
    const int n = last - first;
    float *act = scratch;
    int *active = (int *)(scratch + n);
    int count = 0;
    float gv[8], uv[8];
    int done = 0;  // active neurons whose up row has been read (xr)
    for (int r = first; r < last; r += 8) {
        k->dot_q4_0_x8(g + (size_t)r * row_bytes, xs, xq, xsum, blocks, 1, gv, 8);
        if (xr) {
            // Up rows one by one, UP_LAG groups behind the gate pass: each active neuron's row
            // is asked for as its gate is found positive and read once the gate pass has moved
            // on, so the fetches overlap the gate stream.
            for (int i = 0; i < 8; i++) {
                if (gv[i] > 0) {
                    act[count] = gv[i];
                    active[count] = r + i;
                    count++;
                    prefetch_l2(u + (size_t)(r + i) * row_bytes, row_bytes);
                }
            }
            for (; done < count && active[done] < r - 8 * UP_LAG; done++) up_b8_row(k, u, d, row_bytes, active[done], xs, xr, xsum, blocks, act + done);
            continue;
        }
        int any = 0;
        for (int i = 0; i < 8; i++) any |= gv[i] > 0;
        if (!any) continue;
        k->dot_q4_0_x8(u + (size_t)r * row_bytes, xs, xq, xsum, blocks, 1, uv, 8);
        for (int i = 0; i < 8; i++) {
            if (gv[i] > 0) {
                act[count] = gv[i] * uv[i];
                active[count] = r + i;
                count++;
                // Its down row will be read after this pass: start fetching it into L2 now,
                // while the next groups' gate and up rows stream (measured ~20% per expert).
                prefetch_l2(d + (size_t)(r + i) * row_bytes, row_bytes);
            }
        }
    }
    for (; xr && done < count; done++) up_b8_row(k, u, d, row_bytes, active[done], xs, xr, xsum, blocks, act + done);
    for (int a = 0; a < count; a++) act[a] *= weight;
    k->axpy_rows_q4_0(d, row_bytes, active, act, count, out, blocks * 32, next, next_bytes);
}

void st_axpy_rows_q4_0(const void *base, int row_bytes, const int *rows, const float *coefficients, int count, float *y, int n) {
    table()->axpy_rows_q4_0(base, row_bytes, rows, coefficients, count, y, n, NULL, 0);
}

void st_axpy_rows_q4_0_pair(const void *base, int row_bytes, const int *rows0, const float *c0, int n0, const int *rows1,
                            const float *c1, int n1, float *y0, float *y1, int n, int *merged, float *m0, float *m1) {
    const kernel_table *k = table();
    int a = 0, b = 0, count = 0;
    while (a < n0 || b < n1) {
        if (b >= n1 || (a < n0 && rows0[a] < rows1[b])) {
            merged[count] = rows0[a]; m0[count] = c0[a++]; m1[count] = 0;
        } else if (a >= n0 || rows1[b] < rows0[a]) {
            merged[count] = rows1[b]; m0[count] = 0; m1[count] = c1[b++];
        } else {
            merged[count] = rows0[a]; m0[count] = c0[a++]; m1[count] = c1[b++];
        }
        count++;
    }
    k->axpy_rows2_q4_0(base, row_bytes, merged, m0, m1, count, y0, y1, n);
}

void st_attend(const float *queries, int heads, const float *keys, const float *values, int capacity, int stride, int first, int last,
               int head_dim, float scale, float *outs) {
    table()->attend(queries, heads, keys, values, capacity, stride, first, last, head_dim, scale, outs);
}

void st_add_rows(float *y, const float *rows, int count, int stride, int n) {
    for (int k = 0; k < count; k++) {
        const float *r = rows + (size_t)k * stride;
        for (int i = 0; i < n; i++) y[i] += r[i];
    }
}

float st_rms_norm(const float *x, const float *weight, double eps, float *out, int n) {
    // Eight partial sums in double (the compiler keeps them in vector lanes), added pairwise.
    double acc[8] = {0};
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        for (int l = 0; l < 8; l++) acc[l] += (double)x[i + l] * (double)x[i + l];
    }
    for (; i < n; i++) acc[0] += (double)x[i] * (double)x[i];
    const double sum = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
    const float inverse = (float)(1 / sqrt(sum / n + eps));
    for (i = 0; i < n; i++) out[i] = weight[i] * (x[i] * inverse);
    return inverse;
}

// The low byte of cvttss2si(v), defined for every input: NaN or out of range gives INT32_MIN,
// whose low byte is 0, so those become 0 here; written as a select so that the loop vectorises.
static inline int8_t low_byte_like_x86(float v) {
    const float t = (v != v || v >= 2147483648.0f || v < -2147483648.0f) ? 0.0f : v;
    return (int8_t)(int32_t)t;
}

void st_quantize_q4_0(const float *x, int64_t n, uint8_t *out, double *sum_squared_error, double *sum_squared_value,
                      float *max_abs_error) {
    // Every product and sum rounded on its own, as in the reference (no fused multiply-adds).
#pragma clang fp contract(off)
    double errors[8] = {0}, squares[8] = {0};
    float worst[8] = {0};
    for (int64_t b = 0; b < n / 32; b++) {
        const float *v = x + b * 32;
        uint8_t *block = out + b * 18;
        // The reference keeps the first value of largest magnitude (sign and all) and skips NaN;
        // found in two passes that vectorise: the largest magnitude, then its first value
        // (+0 when every value is ±0, as the reference's starting max).
        float amax = 0, max = 0;
        for (int j = 0; j < 32; j++) {
            const float a = fabsf(v[j]);
            amax = a > amax ? a : amax;
        }
        if (amax > 0) {
            for (int j = 0; j < 32; j++) {
                if (fabsf(v[j]) == amax) {
                    max = v[j];
                    break;
                }
            }
        }
        const float d = max / -8;
        const float id = d != 0 ? 1.0f / d : 0.0f;
        const _Float16 h = (_Float16)d;
        uint16_t bits;
        memcpy(&bits, &h, 2);
        block[0] = (uint8_t)bits;
        block[1] = (uint8_t)(bits >> 8);
        for (int j = 0; j < 16; j++) {
            const float x0 = v[j] * id, x1 = v[j + 16] * id;
            int8_t q0 = low_byte_like_x86(x0 + 8.5f);
            int8_t q1 = low_byte_like_x86(x1 + 8.5f);
            if (q0 > 15) q0 = 15;
            if (q1 > 15) q1 = 15;
            block[2 + j] = (uint8_t)((uint8_t)q0 | (uint8_t)((uint8_t)q1 << 4));
        }
        if (!sum_squared_error) continue;
        // The round trip, as the stored block decodes; eight partial sums in double (vector
        // lanes), added pairwise at the end.
        const float scale = (float)h;
        float back[32];
        for (int j = 0; j < 16; j++) {
            back[j] = (float)((block[2 + j] & 0x0F) - 8) * scale;
            back[j + 16] = (float)((block[2 + j] >> 4) - 8) * scale;
        }
        for (int j0 = 0; j0 < 32; j0 += 8) {
            for (int l = 0; l < 8; l++) {
                const float diff = back[j0 + l] - v[j0 + l];
                errors[l] += (double)(diff * diff);
                squares[l] += (double)(v[j0 + l] * v[j0 + l]);
                const float a = fabsf(diff);
                worst[l] = a > worst[l] ? a : worst[l];
            }
        }
    }
    if (sum_squared_error) {
        *sum_squared_error = ((errors[0] + errors[1]) + (errors[2] + errors[3])) + ((errors[4] + errors[5]) + (errors[6] + errors[7]));
        *sum_squared_value = ((squares[0] + squares[1]) + (squares[2] + squares[3])) + ((squares[4] + squares[5]) + (squares[6] + squares[7]));
        float largest = 0;
        for (int l = 0; l < 8; l++) largest = worst[l] > largest ? worst[l] : largest;
        *max_abs_error = largest;
    }
}
