// Dot products of one weight row with activations: Q4_0 and Q8_0 rows against Q8_0 activations
// (the integer sum of each block scaled by both scales), float rows against float32, and the
// many-token forms (one row against several activation vectors, the row unpacked once).
#include "internal.h"

// `tokens` vectors through a one-row dot product (tiers without a dedicated many-token form).
#define TOKENS_VIA_DOT(name, dot)                                                                           \
    ST_DOT_TOKENS(name) {                                                                                   \
        for (int t = 0; t < tokens; t++)                                                                    \
            out[(size_t)t * out_stride] = dot(row, xs + (size_t)t * blocks, xq + (size_t)t * blocks * ST_QK, \
                                              xsum + (size_t)t * blocks, blocks);                          \
    }

// ---------------------------------------------------------------- portable

ST_DOT_Q(st_dot_q4_0_portable) {
    (void)xsum;
    const st_block_q4_0 *w = row;
    float sum = 0;
    for (int b = 0; b < blocks; b++, w++) {
        const int8_t *x = xq + b * ST_QK;
        int32_t acc = 0;
        for (int j = 0; j < 16; j++) {
            acc += ((w->qs[j] & 0x0F) - 8) * x[j];
            acc += ((w->qs[j] >> 4) - 8) * x[j + 16];
        }
        sum += st_fp16_to_fp32(w->d) * xs[b] * (float)acc;
    }
    return sum;
}

ST_DOT_Q(st_dot_q8_0_portable) {
    (void)xsum;
    const st_block_q8_0 *w = row;
    float sum = 0;
    for (int b = 0; b < blocks; b++, w++) {
        int32_t acc = 0;
        for (int j = 0; j < ST_QK; j++) acc += w->qs[j] * xq[b * ST_QK + j];
        sum += st_fp16_to_fp32(w->d) * xs[b] * (float)acc;
    }
    return sum;
}

ST_DOT_F(st_dot_f32_portable, float) {
    float sum = 0;
    for (int i = 0; i < n; i++) sum += row[i] * x[i];
    return sum;
}

ST_DOT_F(st_dot_bf16_portable, uint16_t) {
    float sum = 0;
    for (int i = 0; i < n; i++) sum += st_bf16_to_fp32(row[i]) * x[i];
    return sum;
}

ST_DOT_F(st_dot_f16_portable, uint16_t) {
    float sum = 0;
    for (int i = 0; i < n; i++) sum += st_fp16_to_fp32(row[i]) * x[i];
    return sum;
}

TOKENS_VIA_DOT(st_dot_q4_0_tokens_portable, st_dot_q4_0_portable)
TOKENS_VIA_DOT(st_dot_q8_0_tokens_portable, st_dot_q8_0_portable)

#ifdef ST_X86
// ---------------------------------------------------------------- AVX2 (+FMA, F16C)

ST_AVX2 ST_DOT_Q(st_dot_q4_0_avx2) {
    (void)xsum;
    const st_block_q4_0 *w = row;
    __m256 acc = _mm256_setzero_ps();
    const __m256i eight = _mm256_set1_epi8(8);
    const __m256i ones = _mm256_set1_epi16(1);
    for (int b = 0; b < blocks; b++, w++) {
        const __m256i wq = _mm256_sub_epi8(st_unpack_nibbles(w), eight);
        const __m256i x = _mm256_loadu_si256((const __m256i *)(xq + b * ST_QK));
        // maddubs needs unsigned × signed: |w| × (x with w's sign).
        const __m256i products = _mm256_maddubs_epi16(_mm256_sign_epi8(wq, wq), _mm256_sign_epi8(x, wq));
        const __m256i sums = _mm256_madd_epi16(products, ones);
        const __m256 scale = _mm256_set1_ps(_cvtsh_ss(w->d) * xs[b]);
        acc = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(sums), acc);
    }
    return st_hsum256(acc);
}

ST_AVX2 ST_DOT_Q(st_dot_q8_0_avx2) {
    (void)xsum;
    const st_block_q8_0 *w = row;
    __m256 acc = _mm256_setzero_ps();
    const __m256i ones = _mm256_set1_epi16(1);
    for (int b = 0; b < blocks; b++, w++) {
        const __m256i wq = _mm256_loadu_si256((const __m256i *)w->qs);
        const __m256i x = _mm256_loadu_si256((const __m256i *)(xq + b * ST_QK));
        const __m256i products = _mm256_maddubs_epi16(_mm256_sign_epi8(wq, wq), _mm256_sign_epi8(x, wq));
        const __m256i sums = _mm256_madd_epi16(products, ones);
        const __m256 scale = _mm256_set1_ps(_cvtsh_ss(w->d) * xs[b]);
        acc = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(sums), acc);
    }
    return st_hsum256(acc);
}

ST_AVX2 ST_DOT_F(st_dot_f32_avx2, float) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    int i = 0;
    for (; i + 16 <= n; i += 16) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(row + i), _mm256_loadu_ps(x + i), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(row + i + 8), _mm256_loadu_ps(x + i + 8), a1);
    }
    float sum = st_hsum256(_mm256_add_ps(a0, a1));
    for (; i < n; i++) sum += row[i] * x[i];
    return sum;
}

ST_AVX2 static inline __m256 load_bf16x8(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}

ST_AVX2 ST_DOT_F(st_dot_bf16_avx2, uint16_t) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    int i = 0;
    for (; i + 16 <= n; i += 16) {
        a0 = _mm256_fmadd_ps(load_bf16x8(row + i), _mm256_loadu_ps(x + i), a0);
        a1 = _mm256_fmadd_ps(load_bf16x8(row + i + 8), _mm256_loadu_ps(x + i + 8), a1);
    }
    float sum = st_hsum256(_mm256_add_ps(a0, a1));
    for (; i < n; i++) sum += st_bf16_to_fp32(row[i]) * x[i];
    return sum;
}

ST_AVX2 ST_DOT_F(st_dot_f16_avx2, uint16_t) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    int i = 0;
    for (; i + 16 <= n; i += 16) {
        a0 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(row + i))), _mm256_loadu_ps(x + i), a0);
        a1 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(row + i + 8))), _mm256_loadu_ps(x + i + 8), a1);
    }
    float sum = st_hsum256(_mm256_add_ps(a0, a1));
    for (; i < n; i++) sum += st_fp16_to_fp32(row[i]) * x[i];
    return sum;
}

ST_AVX2 TOKENS_VIA_DOT(st_dot_q4_0_tokens_avx2, st_dot_q4_0_avx2)
ST_AVX2 TOKENS_VIA_DOT(st_dot_q8_0_tokens_avx2, st_dot_q8_0_avx2)

// ---------------------------------------------------------------- AVX-512 VNNI (256-bit VL forms)

// Σ w·x = Σ (w + 128)·x − 128·Σx, with w + 128 unsigned.
ST_AVX512 ST_DOT_Q(st_dot_q8_0_avx512) {
    const st_block_q8_0 *w = row;
    __m256 acc = _mm256_setzero_ps();
    float correction = 0;
    const __m256i bias = _mm256_set1_epi8((char)0x80);
    for (int b = 0; b < blocks; b++, w++) {
        const __m256i wq = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)w->qs), bias);
        const __m256i x = _mm256_loadu_si256((const __m256i *)(xq + b * ST_QK));
        const __m256i dots = _mm256_dpbusd_epi32(_mm256_setzero_si256(), wq, x);
        const float s = _cvtsh_ss(w->d) * xs[b];
        acc = _mm256_fmadd_ps(_mm256_set1_ps(s), _mm256_cvtepi32_ps(dots), acc);
        correction += s * (float)xsum[b];
    }
    return st_hsum256(acc) - 128.0f * correction;
}

// One row with 256-bit VNNI: one dpbusd per block seeded with −8·Σx (unsigned nibbles 0..15
// against signed activations; the seed removes the offset of 8); two accumulators.
ST_AVX512 ST_DOT_Q(st_dot_q4_0_avx512) {
    const st_block_q4_0 *w = row;
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    int b = 0;
    for (; b + 2 <= blocks; b += 2, w += 2) {
        const __m256i s0 = _mm256_zextsi128_si256(_mm_cvtsi32_si128(-8 * xsum[b]));
        const __m256i s1 = _mm256_zextsi128_si256(_mm_cvtsi32_si128(-8 * xsum[b + 1]));
        const __m256i d0 = _mm256_dpbusd_epi32(s0, st_unpack_nibbles(w), _mm256_loadu_si256((const __m256i *)(xq + b * ST_QK)));
        const __m256i d1 = _mm256_dpbusd_epi32(s1, st_unpack_nibbles(w + 1), _mm256_loadu_si256((const __m256i *)(xq + (b + 1) * ST_QK)));
        a0 = _mm256_fmadd_ps(_mm256_set1_ps(_cvtsh_ss(w[0].d) * xs[b]), _mm256_cvtepi32_ps(d0), a0);
        a1 = _mm256_fmadd_ps(_mm256_set1_ps(_cvtsh_ss(w[1].d) * xs[b + 1]), _mm256_cvtepi32_ps(d1), a1);
    }
    float sum = st_hsum256(_mm256_add_ps(a0, a1));
    if (b < blocks) sum += st_dot_q4_0_portable(w, xs + b, xq + b * ST_QK, xsum + b, blocks - b);
    return sum;
}

// G tokens at a time: each weight block is unpacked once and used for every token of the group
// (256-bit VNNI: cores that split 512-bit work in two run this shape faster).
#define Q4_TOKENS_GROUP(G)                                                                                   \
    for (; t + G <= tokens; t += G) {                                                                        \
        const st_block_q4_0 *w = row;                                                                        \
        __m256 acc[G];                                                                                       \
        for (int k = 0; k < G; k++) acc[k] = _mm256_setzero_ps();                                           \
        for (int b = 0; b < blocks; b++, w++) {                                                              \
            const __m256i nibbles = st_unpack_nibbles(w);                                                    \
            const float d = _cvtsh_ss(w->d);                                                                 \
            for (int k = 0; k < G; k++) {                                                                    \
                const size_t base = (size_t)(t + k) * blocks + b;                                            \
                const __m256i seed = _mm256_zextsi128_si256(_mm_cvtsi32_si128(-8 * xsum[base]));             \
                const __m256i dots = _mm256_dpbusd_epi32(seed, nibbles, _mm256_loadu_si256((const __m256i *)(xq + base * ST_QK))); \
                acc[k] = _mm256_fmadd_ps(_mm256_set1_ps(d * xs[base]), _mm256_cvtepi32_ps(dots), acc[k]);   \
            }                                                                                                \
        }                                                                                                    \
        for (int k = 0; k < G; k++) out[(size_t)(t + k) * out_stride] = st_hsum256(acc[k]);                 \
    }

// Eight tokens at a time, then four, then one by one.
ST_AVX512 ST_DOT_TOKENS(st_dot_q4_0_tokens_avx512) {
    int t = 0;
    Q4_TOKENS_GROUP(8)
    Q4_TOKENS_GROUP(4)
    for (; t < tokens; t++) {
        out[(size_t)t * out_stride] =
            st_dot_q4_0_avx512(row, xs + (size_t)t * blocks, xq + (size_t)t * blocks * ST_QK, xsum + (size_t)t * blocks, blocks);
    }
}

ST_AVX512 TOKENS_VIA_DOT(st_dot_q8_0_tokens_avx512, st_dot_q8_0_avx512)
#endif

// ---------------------------------------------------------------- drivers (every tier)

float st_dot_q4_0(const void *row, const float *xs, const int8_t *xq, const int32_t *xsum, int blocks) {
    return st_table()->dot_q4_0(row, xs, xq, xsum, blocks);
}
float st_dot_q8_0(const void *row, const float *xs, const int8_t *xq, const int32_t *xsum, int blocks) {
    return st_table()->dot_q8_0(row, xs, xq, xsum, blocks);
}
void st_dot_q4_0_tokens(const void *row, const float *xs, const int8_t *xq, const int32_t *xsum, int blocks, int tokens, float *out,
                        int out_stride) {
    st_table()->dot_q4_0_tokens(row, xs, xq, xsum, blocks, tokens, out, out_stride);
}
void st_dot_q8_0_tokens(const void *row, const float *xs, const int8_t *xq, const int32_t *xsum, int blocks, int tokens, float *out,
                        int out_stride) {
    st_table()->dot_q8_0_tokens(row, xs, xq, xsum, blocks, tokens, out, out_stride);
}
float st_dot_f32(const float *row, const float *x, int n) { return st_table()->dot_f32(row, x, n); }
float st_dot_bf16(const uint16_t *row, const float *x, int n) { return st_table()->dot_bf16(row, x, n); }
float st_dot_f16(const uint16_t *row, const float *x, int n) { return st_table()->dot_f16(row, x, n); }

void st_matmul_quantized(int q8, const void *rows, int row_bytes, int first, int last, const float *xs, const int8_t *xq,
                         const int32_t *xsum, int blocks, int tokens, float *out, int out_stride) {
    const st_kernel_table *k = st_table();
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

#ifdef ST_ARM
// ---------------------------------------------------------------- NEON, and NEON with SDOT

// Each block's integer sum reduced across lanes before its scales apply, so the float arithmetic
// is the portable code's: sum += d · xs · (float)acc, block by block.
#define NEON_DOT_Q4_0(name, ATTR, SDOT)                                                    \
    ATTR ST_DOT_Q(name) {                                                                  \
        (void)xsum;                                                                        \
        const st_block_q4_0 *w = row;                                                      \
        float sum = 0;                                                                     \
        for (int b = 0; b < blocks; b++, w++) {                                            \
            int8x16_t lo, hi;                                                              \
            st_nibbles_neon(w->qs, &lo, &hi);                                              \
            int32x4_t acc = SDOT(vdupq_n_s32(0), lo, vld1q_s8(xq + b * ST_QK));            \
            acc = SDOT(acc, hi, vld1q_s8(xq + b * ST_QK + 16));                            \
            sum += st_fp16_to_fp32(w->d) * xs[b] * (float)vaddvq_s32(acc);                 \
        }                                                                                  \
        return sum;                                                                        \
    }

#define NEON_DOT_Q8_0(name, ATTR, SDOT)                                                    \
    ATTR ST_DOT_Q(name) {                                                                  \
        (void)xsum;                                                                        \
        const st_block_q8_0 *w = row;                                                      \
        float sum = 0;                                                                     \
        for (int b = 0; b < blocks; b++, w++) {                                            \
            int32x4_t acc = SDOT(vdupq_n_s32(0), vld1q_s8(w->qs), vld1q_s8(xq + b * ST_QK)); \
            acc = SDOT(acc, vld1q_s8(w->qs + 16), vld1q_s8(xq + b * ST_QK + 16));          \
            sum += st_fp16_to_fp32(w->d) * xs[b] * (float)vaddvq_s32(acc);                 \
        }                                                                                  \
        return sum;                                                                        \
    }

NEON_DOT_Q4_0(st_dot_q4_0_neon, ST_NEON, st_sdot_neon)
NEON_DOT_Q8_0(st_dot_q8_0_neon, ST_NEON, st_sdot_neon)
NEON_DOT_Q4_0(st_dot_q4_0_dotprod, ST_DOTPROD, st_sdot_dotprod)
NEON_DOT_Q8_0(st_dot_q8_0_dotprod, ST_DOTPROD, st_sdot_dotprod)
TOKENS_VIA_DOT(st_dot_q4_0_tokens_neon, st_dot_q4_0_neon)
TOKENS_VIA_DOT(st_dot_q8_0_tokens_neon, st_dot_q8_0_neon)
ST_DOTPROD TOKENS_VIA_DOT(st_dot_q4_0_tokens_dotprod, st_dot_q4_0_dotprod)
ST_DOTPROD TOKENS_VIA_DOT(st_dot_q8_0_tokens_dotprod, st_dot_q8_0_dotprod)

// Float rows: four accumulators of four lanes, then the tail in scalar code.
#define NEON_DOT_F(name, T, LOAD4, SCALAR)                                                  \
    ST_DOT_F(name, T) {                                                                     \
        float32x4_t acc[4] = {vdupq_n_f32(0), vdupq_n_f32(0), vdupq_n_f32(0), vdupq_n_f32(0)}; \
        int i = 0;                                                                          \
        for (; i + 16 <= n; i += 16)                                                        \
            for (int k = 0; k < 4; k++) acc[k] = vfmaq_f32(acc[k], LOAD4(row + i + 4 * k), vld1q_f32(x + i + 4 * k)); \
        float sum = vaddvq_f32(vaddq_f32(vaddq_f32(acc[0], acc[1]), vaddq_f32(acc[2], acc[3]))); \
        for (; i < n; i++) sum += SCALAR(row[i]) * x[i];                                    \
        return sum;                                                                         \
    }
NEON_DOT_F(st_dot_f32_neon, float, st_load4_f32_neon, st_f32_identity)
NEON_DOT_F(st_dot_bf16_neon, uint16_t, st_load4_bf16_neon, st_bf16_to_fp32)
NEON_DOT_F(st_dot_f16_neon, uint16_t, st_load4_f16_neon, st_fp16_to_fp32)
#endif
