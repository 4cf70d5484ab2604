// What the kernel files share: the block types they read, the float16/bfloat16 conversions, the
// prefetch helper, the per-function target attributes of the SIMD tiers, and each tier's
// functions (filled into the dispatch tables of dispatch.c). Not part of the public header.
#ifndef ST_KERNELS_INTERNAL_H
#define ST_KERNELS_INTERNAL_H

#include "ckernels.h"

#include <math.h>
#include <stddef.h>
#include <string.h>

#if defined(__x86_64__) || defined(__i386__)
#define ST_X86 1
#include <immintrin.h>
// Functions compiled for a tier carry its target attribute, so one binary holds every tier and
// dispatch.c picks at run time.
#define ST_AVX2 __attribute__((target("avx2,fma,f16c")))
#define ST_AVX512 __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")))
#endif
#if defined(__aarch64__)
#define ST_ARM 1
#include <arm_neon.h>
// NEON is baseline on aarch64; the dot-product extension (SDOT, vdotq_s32) is per function.
#define ST_NEON
#define ST_DOTPROD __attribute__((target("dotprod")))
#endif

// ---------------------------------------------------------------- blocks (ggml's layouts)

/// ggml's block_q4_0: 32 weights as a float16 scale d and 16 bytes of 4-bit values; byte j holds
/// weight j in its low nibble and weight j + 16 in its high one; weight = d · (nibble − 8).
typedef struct {
    uint16_t d;
    uint8_t qs[16];
} st_block_q4_0;
_Static_assert(sizeof(st_block_q4_0) == 18, "Q4_0 blocks are 18 bytes");

/// ggml's block_q8_0: 32 weights as a float16 scale d and 32 signed bytes; weight = d · q.
typedef struct {
    uint16_t d;
    int8_t qs[32];
} st_block_q8_0;
_Static_assert(sizeof(st_block_q8_0) == 34, "Q8_0 blocks are 34 bytes");

/// Eight Q4_0 blocks in the octet form of the row_major_x8 and row_major_b8 layouts
/// (specs/FORMAT.md): their eight float16 scales, then their quant bytes in four 32-byte chunks,
/// chunk c holding bytes 4c..4c+3 of each block in block order. For row_major_x8 the eight blocks
/// are one block column of eight rows; for row_major_b8, eight consecutive blocks of one row.
typedef struct {
    uint16_t d[8];
    uint8_t qs[4][32];
} st_octet_q4_0;
_Static_assert(sizeof(st_octet_q4_0) == 144, "Q4_0 octets are 144 bytes");

/// Q8_0 activations (QuantizedActivations on the Swift side) keep a float32 scale per block of
/// 32 int8 values in a separate array, and the block's value sum beside it.
#define ST_QK 32

// ---------------------------------------------------------------- conversions

static inline float st_fp16_to_fp32(uint16_t h) {
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

/// float32 to float16, rounding to nearest even (overflow to infinity, NaN kept a quiet NaN):
/// the value is scaled so that adding a power of two, in float32's own round-to-nearest-even,
/// drops exactly the bits float16 lacks, and the result's bits are then float16's.
static inline uint16_t st_fp32_to_fp16(float f) {
    uint32_t w;
    memcpy(&w, &f, 4);
    const uint32_t twice = w + w, sign = w & 0x80000000u;
    float magnitude = fabsf(f) * 0x1.0p+112f;  // huge values overflow to infinity here
    magnitude *= 0x1.0p-110f;
    uint32_t bias = twice & 0xFF000000u;
    if (bias < 0x71000000u) bias = 0x71000000u;  // subnormal float16: a fixed shift
    const uint32_t adder_bits = (bias >> 1) + 0x07800000u;
    float adder;
    memcpy(&adder, &adder_bits, 4);
    const float rounded = adder + magnitude;
    uint32_t bits;
    memcpy(&bits, &rounded, 4);
    const uint32_t result = ((bits >> 13) & 0x7C00u) + (bits & 0x0FFFu);
    return (uint16_t)((sign >> 16) | (twice > 0xFF000000u ? 0x7E00u : result));
}

static inline float st_bf16_to_fp32(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

// ---------------------------------------------------------------- prefetch

// Asks the cache for the `bytes` bytes at `p` (NULL with 0 bytes is fine), one 64-byte line at a
// time, at locality LEVEL (3: into L1; 2: into L2, prefetcht1).
#define ST_PREFETCH(p, bytes, LEVEL)                                                  \
    do {                                                                              \
        const char *st_c_ = (const char *)(p);                                        \
        for (int st_i_ = 0; st_i_ < (bytes); st_i_ += 64) __builtin_prefetch(st_c_ + st_i_, 0, LEVEL); \
    } while (0)

/// Rows a later step of the same kernel reads: into L2, where fetching them into L1 measured slower.
static inline void st_prefetch_l2(const void *p, int bytes) { ST_PREFETCH(p, bytes, 2); }
/// Rows the very next step reads.
static inline void st_prefetch_l1(const void *p, int bytes) { ST_PREFETCH(p, bytes, 3); }

// ---------------------------------------------------------------- shared shapes

// The vector exps' shared core, for any width: r = x − n·ln2 (ln2 in two parts, so r is exact to
// float rounding), then p = e^r by its Taylor series to r^7 in Horner form (truncation below 1e-8
// relative for |r| ≤ ln2/2). The caller scales p by 2^n.
#define ST_EXP_REDUCED(x, n, r, p, FMADD, FNMADD, SET1)              \
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
ST_AVX2 static inline float st_hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

ST_AVX2 static inline float st_hmax256(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    return _mm_cvtss_f32(m);
}

/// A Q4_0 block's 32 nibbles as bytes 0..15, in weight order (low nibbles, then high).
ST_AVX2 static inline __m256i st_unpack_nibbles(const st_block_q4_0 *b) {
    const __m128i packed = _mm_loadu_si128((const __m128i *)b->qs);
    const __m256i both = _mm256_set_m128i(_mm_srli_epi16(packed, 4), packed);
    return _mm256_and_si256(both, _mm256_set1_epi8(0x0F));
}
#endif

#ifdef ST_ARM
/// Sixteen bytes of Q4_0 nibbles as signed weights: lo from the low nibbles, hi from the high
/// ones, each minus 8. For a block's qs, lo holds weights 0..15 and hi 16..31; for half an octet
/// chunk, four rows' (x8) or four blocks' (b8) four bytes each.
static inline void st_nibbles_neon(const uint8_t *bytes, int8x16_t *lo, int8x16_t *hi) {
    const uint8x16_t q = vld1q_u8(bytes);
    *lo = vsubq_s8(vreinterpretq_s8_u8(vandq_u8(q, vdupq_n_u8(0x0F))), vdupq_n_s8(8));
    *hi = vsubq_s8(vreinterpretq_s8_u8(vshrq_n_u8(q, 4)), vdupq_n_s8(8));
}

/// Four float rows' values as float32, for the float dot products and axpys.
static inline float32x4_t st_load4_f32_neon(const float *p) { return vld1q_f32(p); }
static inline float32x4_t st_load4_bf16_neon(const uint16_t *p) { return vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(p), 16)); }
static inline float32x4_t st_load4_f16_neon(const uint16_t *p) { return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(p))); }
static inline float st_f32_identity(float v) { return v; }

/// SDOT without the extension: lane k of acc gains Σ a_i · b_i over bytes 4k..4k+3, as
/// vdotq_s32 computes (widening multiplies, then pairwise adds; no intermediate can overflow).
static inline int32x4_t st_sdot_neon(int32x4_t acc, int8x16_t a, int8x16_t b) {
    const int32x4_t lo = vpaddlq_s16(vmull_s8(vget_low_s8(a), vget_low_s8(b)));
    const int32x4_t hi = vpaddlq_s16(vmull_high_s8(a, b));
    return vaddq_s32(acc, vpaddq_s32(lo, hi));
}

ST_DOTPROD static inline int32x4_t st_sdot_dotprod(int32x4_t acc, int8x16_t a, int8x16_t b) { return vdotq_s32(acc, a, b); }

/// Eight float16 scales as two float32 vectors.
static inline void st_fp16x8_to_fp32(const uint16_t *h, float32x4_t *lo, float32x4_t *hi) {
    const float16x8_t v = vreinterpretq_f16_u16(vld1q_u16(h));
    *lo = vcvt_f32_f16(vget_low_f16(v));
    *hi = vcvt_high_f32_f16(v);
}
#endif

// ---------------------------------------------------------------- each tier's functions
// Signatures as the fields of st_kernel_table (ckernels.h), which documents them.

#define ST_DOT_Q(name) float name(const void *row, const float *xs, const int8_t *xq, const int32_t *xsum, int blocks)
#define ST_DOT_TOKENS(name) \
    void name(const void *row, const float *xs, const int8_t *xq, const int32_t *xsum, int blocks, int tokens, float *out, int out_stride)
#define ST_DOT_F(name, T) float name(const T *row, const float *x, int n)
#define ST_AXPY(name, T) void name(const T *row, float a, float *y, int n)
#define ST_QUANTIZE(name) void name(const float *x, float *scales, int8_t *q, int32_t *sums, int n)
#define ST_DOT_X8(name) \
    void name(const void *group, const float *xs, const int8_t *xq, const int32_t *xsum, int blocks, int tokens, float *out, int out_stride)
#define ST_DOT_B8(name)                                                                                                \
    void name(const void *row, int row_bytes, int rows, const float *xs, const int8_t *xr, const int32_t *xsum, int blocks, \
              int tokens, const int32_t *which, float *out, int out_stride)
#define ST_DOT_B8_AHEAD(name) \
    float name(const void *row, const void *ahead, const float *xs, const int8_t *xr, const int32_t *xsum, int blocks)
#define ST_AXPY_ROWS(name)                                                                                          \
    void name(const void *base, int row_bytes, const int *rows, const float *coefficients, int count, float *y, int n, \
              const void *next, int next_bytes)
#define ST_AXPY_ROWS2(name)                                                                                          \
    void name(const void *base, int row_bytes, const int *rows, const float *c0, const float *c1, int count, float *y0, \
              float *y1, int n)
#define ST_ATTEND(name)                                                                                                   \
    void name(const float *queries, int query_stride, int tokens, int heads, const void *keys, const void *values, int type,     \
              int capacity, int row_bytes, int position, int window, int head_dim, float scale, float *outs, int out_stride)

/// The largest head_dim the attention kernels' row buffers hold.
#define ST_ATTEND_MAX_HEAD_DIM 256

#define ST_TIER_FUNCTIONS(tier)                         \
    ST_DOT_Q(st_dot_q4_0_##tier);                       \
    ST_DOT_Q(st_dot_q8_0_##tier);                       \
    ST_DOT_TOKENS(st_dot_q4_0_tokens_##tier);           \
    ST_DOT_TOKENS(st_dot_q8_0_tokens_##tier);           \
    ST_DOT_F(st_dot_f32_##tier, float);                 \
    ST_DOT_F(st_dot_bf16_##tier, uint16_t);             \
    ST_DOT_F(st_dot_f16_##tier, uint16_t);              \
    ST_AXPY(st_axpy_q4_0_##tier, void);                 \
    ST_AXPY(st_axpy_q8_0_##tier, void);                 \
    ST_AXPY(st_axpy_f32_##tier, float);                 \
    ST_AXPY(st_axpy_bf16_##tier, uint16_t);             \
    ST_AXPY(st_axpy_f16_##tier, uint16_t);              \
    ST_QUANTIZE(st_quantize_q8_0_##tier);               \
    ST_DOT_X8(st_dot_q4_0_x8_##tier);                   \
    ST_DOT_B8(st_dot_q4_0_b8_##tier);                   \
    ST_DOT_B8_AHEAD(st_dot_q4_0_b8_ahead_##tier);       \
    ST_AXPY_ROWS(st_axpy_rows_q4_0_##tier);             \
    ST_AXPY_ROWS2(st_axpy_rows2_q4_0_##tier);           \
    ST_ATTEND(st_attend_##tier);

ST_TIER_FUNCTIONS(portable)
#ifdef ST_X86
ST_TIER_FUNCTIONS(avx2)
ST_TIER_FUNCTIONS(avx512)
#endif
#ifdef ST_ARM
ST_TIER_FUNCTIONS(neon)
ST_TIER_FUNCTIONS(dotprod)
#endif

/// The kernels the calling thread uses (dispatch.c): its bound tier's, else the selected one's.
const st_kernel_table *st_table(void);

#endif
