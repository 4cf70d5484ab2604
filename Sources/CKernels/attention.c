// Attention over a KV cache for a tile of queries: `tokens` consecutive tokens of one sequence
// (token t at position + t) times the `heads` query heads that share one key/value head
// (grouped-query attention). Token t sees cached positions first_t...position + t, where
// first_t is 0, or position + t − window + 1 (not below 0) for a sliding window. Position j's
// key and value rows are at slot j % capacity, `row_bytes` apart, stored as f32, f16 or ggml's
// q8_0 blocks (st_kv_store).
//
// Every version walks the positions in blocks; each block's keys and values are read from the
// cache (and converted to float32) once for the whole tile, then every query whose range meets
// the block takes its scores, with a running maximum and sum per query (an online softmax: no
// score vector, partial sums rescaled when a larger score arrives) and its weighted values.
// Tiles of two or more tokens go, on the x86 tiers, through a kernel that computes them as small
// matrix products with the queries across the vector lanes (attend_tile_avx512); single tokens
// (decoding) through one that takes a query at a time against the block's positions across the
// lanes. Blocks lie on a fixed grid of positions (multiples of the block width) and each query
// is computed alone, so a query gets the same bits in whichever tile of two or more tokens it is:
// a prompt gives the same logits however it is split into chunks of at least two tokens.
#include "internal.h"

// ---------------------------------------------------------------- storing and loading rows

int st_kv_row_bytes(int type, int head_dim) {
    if (head_dim < 1) return 0;
    switch (type) {
    case ST_KV_F32: return 4 * head_dim;
    case ST_KV_F16: return 2 * head_dim;
    case ST_KV_Q8_0: return head_dim % ST_QK == 0 ? head_dim / ST_QK * (int)sizeof(st_block_q8_0) : 0;
    default: return 0;
    }
}

void st_kv_store(int type, const float *x, void *row, int head_dim) {
    switch (type) {
    case ST_KV_F32: memcpy(row, x, sizeof(float) * (size_t)head_dim); break;
    case ST_KV_F16: {
        uint16_t *h = row;
        for (int i = 0; i < head_dim; i++) h[i] = st_fp32_to_fp16(x[i]);
        break;
    }
    case ST_KV_Q8_0: {
        // ggml's quantize_row_q8_0 reference: d = amax / 127 stored as float16, each value
        // round(x / d) (halves away from zero) with 1/d taken from the unrounded d.
        st_block_q8_0 *blocks = row;
        for (int b = 0; b < head_dim / ST_QK; b++) {
            const float *v = x + b * ST_QK;
            float amax = 0;
            for (int i = 0; i < ST_QK; i++) amax = fabsf(v[i]) > amax ? fabsf(v[i]) : amax;
            const float d = amax / 127, id = d != 0 ? 1 / d : 0;
            blocks[b].d = st_fp32_to_fp16(d);
            for (int i = 0; i < ST_QK; i++) blocks[b].qs[i] = (int8_t)roundf(v[i] * id);
        }
        break;
    }
    default: break;
    }
}

void st_kv_load(int type, const void *row, float *x, int head_dim) {
    switch (type) {
    case ST_KV_F32: memcpy(x, row, sizeof(float) * (size_t)head_dim); break;
    case ST_KV_F16: {
        const uint16_t *h = row;
        for (int i = 0; i < head_dim; i++) x[i] = st_fp16_to_fp32(h[i]);
        break;
    }
    case ST_KV_Q8_0: {
        const st_block_q8_0 *blocks = row;
        for (int b = 0; b < head_dim / ST_QK; b++) {
            const float d = st_fp16_to_fp32(blocks[b].d);
            for (int i = 0; i < ST_QK; i++) x[b * ST_QK + i] = d * (float)blocks[b].qs[i];
        }
        break;
    }
    default: break;
    }
}

/// Token t's first visible position.
static inline int first_position(int position, int t, int window) {
    const int first = window > 0 ? position + t - window + 1 : 0;
    return first < 0 ? 0 : first;
}

static inline const char *kv_row(const void *base, int capacity, int row_bytes, int j) {
    return (const char *)base + (size_t)(j % capacity) * (size_t)row_bytes;
}

// ---------------------------------------------------------------- portable

// One position at a time: its key and value rows converted once, then every query that sees it.
ST_ATTEND(st_attend_portable) {
    float maxima[ST_ATTEND_MAX_QUERIES], sums[ST_ATTEND_MAX_QUERIES], k[ST_ATTEND_MAX_HEAD_DIM], v[ST_ATTEND_MAX_HEAD_DIM];
    for (int t = 0; t < tokens; t++) {
        for (int h = 0; h < heads; h++) {
            maxima[t * heads + h] = -INFINITY;
            sums[t * heads + h] = 0;
            for (int i = 0; i < head_dim; i++) outs[(size_t)t * out_stride + (size_t)h * head_dim + i] = 0;
        }
    }
    const int last = position + tokens - 1;
    for (int j = first_position(position, 0, window); j <= last; j++) {
        st_kv_load(type, kv_row(keys, capacity, row_bytes, j), k, head_dim);
        st_kv_load(type, kv_row(values, capacity, row_bytes, j), v, head_dim);
        for (int t = j > position ? j - position : 0; t < tokens && first_position(position, t, window) <= j; t++) {
            for (int h = 0; h < heads; h++) {
                const float *q = queries + (size_t)t * query_stride + (size_t)h * head_dim;
                float *out = outs + (size_t)t * out_stride + (size_t)h * head_dim;
                float s = 0;
                for (int i = 0; i < head_dim; i++) s += q[i] * k[i];
                s *= scale;
                float *m = &maxima[t * heads + h], *sum = &sums[t * heads + h];
                if (s > *m) {
                    const float rescale = expf(*m - s);
                    for (int i = 0; i < head_dim; i++) out[i] *= rescale;
                    *sum *= rescale;
                    *m = s;
                }
                const float w = expf(s - *m);
                *sum += w;
                for (int i = 0; i < head_dim; i++) out[i] += w * v[i];
            }
        }
    }
    for (int t = 0; t < tokens; t++) {
        for (int h = 0; h < heads; h++) {
            const float inverse = 1 / sums[t * heads + h];
            float *out = outs + (size_t)t * out_stride + (size_t)h * head_dim;
            for (int i = 0; i < head_dim; i++) out[i] *= inverse;
        }
    }
}

#ifdef ST_X86
// ---------------------------------------------------------------- x86 blocks

/// Which of a block's `count` positions from j0 token t sees: bits a..b of the result.
static inline uint32_t visible(int position, int t, int window, int j0, int count) {
    const int first = first_position(position, t, window), last = position + t;
    if (last < j0 || first > j0 + count - 1) return 0;
    const int a = first > j0 ? first - j0 : 0, b = last - j0 < count - 1 ? last - j0 : count - 1;
    return (uint32_t)(((1ull << (b + 1)) - 1) & ~((1ull << a) - 1));
}


// For the vector attentions' blocks of `width` positions from j0 (`count` of them real): each
// position's key and value rows as float32 in k and v (the rest the first one's): pointers into
// the cache for f32, else rows converted into kbuf and vbuf (`head_dim` floats apart). The next
// block's rows are fetched meanwhile (positions are a row of the cache apart, a stride the
// hardware prefetchers follow too slowly from memory).
#define ST_ATTENTION_BLOCK(CONVERT)                                                                           \
    do {                                                                                                      \
        for (int p_ = 0; p_ < width; p_++) {                                                                  \
            const int j_ = j0 + (p_ < count ? p_ : 0);                                                        \
            const char *kr_ = kv_row(keys, capacity, row_bytes, j_), *vr_ = kv_row(values, capacity, row_bytes, j_); \
            if (type == ST_KV_F32) {                                                                          \
                k[p_] = (const float *)kr_;                                                                   \
                v[p_] = (const float *)vr_;                                                                   \
            } else if (p_ < count) {                                                                          \
                CONVERT(type, kr_, kbuf + p_ * head_dim, head_dim);                                           \
                CONVERT(type, vr_, vbuf + p_ * head_dim, head_dim);                                           \
                k[p_] = kbuf + p_ * head_dim;                                                                 \
                v[p_] = vbuf + p_ * head_dim;                                                                 \
            } else {                                                                                          \
                k[p_] = kbuf;                                                                                 \
                v[p_] = vbuf;                                                                                 \
            }                                                                                                 \
        }                                                                                                     \
        for (int p_ = j0 + width; p_ <= last && p_ < j0 + 2 * width; p_++) {                                  \
            st_prefetch_l1(kv_row(keys, capacity, row_bytes, p_), row_bytes);                                 \
            st_prefetch_l1(kv_row(values, capacity, row_bytes, p_), row_bytes);                               \
        }                                                                                                     \
    } while (0)

// ---------------------------------------------------------------- AVX2 (+FMA, F16C)

// A cache row as float32 (f16 or q8_0; head_dim a multiple of 8, of 32 for q8_0).
ST_AVX2 static inline void convert_row_avx2(int type, const void *row, float *out, int head_dim) {
    if (type == ST_KV_F16) {
        const uint16_t *h = row;
        for (int i = 0; i < head_dim; i += 8) _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(h + i))));
    } else {
        const st_block_q8_0 *blocks = row;
        for (int b = 0; b < head_dim / ST_QK; b++) {
            const __m256 d = _mm256_set1_ps(_cvtsh_ss(blocks[b].d));
            for (int i = 0; i < ST_QK; i += 8) {
                const __m256i q = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(blocks[b].qs + i)));
                _mm256_storeu_ps(out + b * ST_QK + i, _mm256_mul_ps(_mm256_cvtepi32_ps(q), d));
            }
        }
    }
}

// e^x for x ≤ 0, eight lanes (ST_EXP_REDUCED), scaled by 2^n built in the exponent bits (x is
// clamped at −87, where e^x is below 2e−38).
ST_AVX2 static inline __m256 exp_nonpositive_avx2(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r, p;
    ST_EXP_REDUCED(x, n, r, p, _mm256_fmadd_ps, _mm256_fnmadd_ps, _mm256_set1_ps);
    const __m256i scale = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(scale));
}

// Lane i: the sum of the eight lanes of v[i] (two rounds of horizontal adds within each half,
// then the halves added).
ST_AVX2 static inline __m256 sum8(const __m256 v[8]) {
    const __m256 b0 = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
    const __m256 b1 = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
    return _mm256_add_ps(_mm256_permute2f128_ps(b0, b1, 0x20), _mm256_permute2f128_ps(b0, b1, 0x31));
}

// The AVX-512 tile kernel's form (attend_tile_avx512, which says why) at eight lanes and sixteen
// registers: 4-position (or 4-dimension) × 2-vector register tiles, 6 loads for 8 FMAs. (4 × 3
// needs all sixteen registers: clang spilled an accumulator, and its store and reload in the
// loop's dependency chain took a third of the kernel's time; 4 × 2 runs the 4B shape's P = 2048
// prompt 9-16% faster on the AVX2 tier.)
ST_AVX2 __attribute__((always_inline)) static inline void tile_scores_avx2(const float *const *k, int p0, const float *qT, int ml, int mv0,
                                                                         int head_dim, float *S, const int nv) {
    __m256 acc[4][2];
    for (int r = 0; r < 4; r++)
        for (int i = 0; i < nv; i++) acc[r][i] = _mm256_setzero_ps();
    for (int d = 0; d < head_dim; d++) {
        __m256 q[2];
        for (int i = 0; i < nv; i++) q[i] = _mm256_load_ps(qT + (size_t)d * ml + (mv0 + i) * 8);
        for (int r = 0; r < 4; r++) {
            const __m256 b = _mm256_broadcast_ss(k[p0 + r] + d);
            for (int i = 0; i < nv; i++) acc[r][i] = _mm256_fmadd_ps(b, q[i], acc[r][i]);
        }
    }
    for (int r = 0; r < 4; r++)
        for (int i = 0; i < nv; i++) _mm256_store_ps(S + (size_t)(p0 + r) * ml + (mv0 + i) * 8, acc[r][i]);
}

ST_AVX2 __attribute__((always_inline)) static inline void tile_values_avx2(const float *const *v, int count, const float *W, int ml,
                                                                         int mv0, int d0, float *oT, const int nv) {
    __m256 acc[4][2];
    for (int r = 0; r < 4; r++)
        for (int i = 0; i < nv; i++) acc[r][i] = _mm256_load_ps(oT + (size_t)(d0 + r) * ml + (mv0 + i) * 8);
    for (int p = 0; p < count; p++) {
        __m256 w[2];
        for (int i = 0; i < nv; i++) w[i] = _mm256_load_ps(W + (size_t)p * ml + (mv0 + i) * 8);
        for (int r = 0; r < 4; r++) {
            const __m256 b = _mm256_broadcast_ss(v[p] + d0 + r);
            for (int i = 0; i < nv; i++) acc[r][i] = _mm256_fmadd_ps(b, w[i], acc[r][i]);
        }
    }
    for (int r = 0; r < 4; r++)
        for (int i = 0; i < nv; i++) _mm256_store_ps(oT + (size_t)(d0 + r) * ml + (mv0 + i) * 8, acc[r][i]);
}

// All-ones in the lanes whose queries see position j (first ≤ j ≤ last).
ST_AVX2 static inline __m256 seen_avx2(__m256i first, __m256i last, __m256i j) {
    const __m256i outside = _mm256_or_si256(_mm256_cmpgt_epi32(first, j), _mm256_cmpgt_epi32(j, last));
    return _mm256_castsi256_ps(_mm256_andnot_si256(outside, _mm256_set1_epi32(-1)));
}

ST_AVX2 static void attend_tile_avx2(const float *queries, int query_stride, int tokens, int heads, const void *keys,
                                     const void *values, int type, int capacity, int row_bytes, int position, int window,
                                     int head_dim, float scale, float *outs, int out_stride) {
    enum { width = 32, L = 8 };
    const int m_count = tokens * heads, mvs = (m_count + L - 1) / L, ml = mvs * L;
    float qT[128 * ST_TILE_QUERIES] __attribute__((aligned(32)));
    float oT[128 * ST_TILE_QUERIES] __attribute__((aligned(32)));
    float S[width * ST_TILE_QUERIES] __attribute__((aligned(32)));
    float kbuf[width * 128] __attribute__((aligned(32))), vbuf[width * 128] __attribute__((aligned(32)));
    int firsts[ST_TILE_QUERIES] __attribute__((aligned(32))), lasts[ST_TILE_QUERIES] __attribute__((aligned(32)));
    __m256 maxima[ST_TILE_QUERIES / L], sums[ST_TILE_QUERIES / L];
    for (int m = 0; m < ml; m++) {
        const int t = m / heads, h = m % heads;
        const float *q = queries + (size_t)t * query_stride + (size_t)h * head_dim;
        for (int d = 0; d < head_dim; d++) {
            qT[(size_t)d * ml + m] = m < m_count ? q[d] * scale : 0;
            oT[(size_t)d * ml + m] = 0;
        }
        firsts[m] = m < m_count ? first_position(position, t, window) : 1 << 30;
        lasts[m] = m < m_count ? position + t : -1;
    }
    for (int mv = 0; mv < mvs; mv++) maxima[mv] = _mm256_set1_ps(-INFINITY), sums[mv] = _mm256_setzero_ps();
    const __m256 minus_infinity = _mm256_set1_ps(-INFINITY);
    const int last = position + tokens - 1;
    for (int j0 = first_position(position, 0, window) / width * width; j0 <= last; j0 += width) {
        const int count = last - j0 + 1 < width ? last - j0 + 1 : width;
        const float *k[width], *v[width];
        ST_ATTENTION_BLOCK(convert_row_avx2);
        for (int p0 = 0; p0 < count; p0 += 4) {
            int mv0 = 0;
            for (; mv0 + 2 <= mvs; mv0 += 2) tile_scores_avx2(k, p0, qT, ml, mv0, head_dim, S, 2);
            if (mvs - mv0 == 1) tile_scores_avx2(k, p0, qT, ml, mv0, head_dim, S, 1);
        }
        for (int mv = 0; mv < mvs; mv++) {
            const __m256i first = _mm256_load_si256((const __m256i *)(firsts + mv * L));
            const __m256i lastv = _mm256_load_si256((const __m256i *)(lasts + mv * L));
            __m256 block_max = minus_infinity;
            for (int p = 0; p < count; p++) {
                const __m256i j = _mm256_set1_epi32(j0 + p);
                const __m256 seen = seen_avx2(first, lastv, j);
                block_max = _mm256_max_ps(block_max, _mm256_blendv_ps(minus_infinity, _mm256_load_ps(S + (size_t)p * ml + mv * L), seen));
            }
            const __m256 new_max = _mm256_max_ps(maxima[mv], block_max);
            const __m256 live = _mm256_cmp_ps(new_max, minus_infinity, _CMP_GT_OQ);
            const __m256 grew = _mm256_and_ps(_mm256_cmp_ps(new_max, maxima[mv], _CMP_GT_OQ), live);
            if (_mm256_movemask_ps(grew)) {
                const __m256 rescale = _mm256_blendv_ps(_mm256_set1_ps(1), exp_nonpositive_avx2(_mm256_sub_ps(maxima[mv], new_max)), grew);
                sums[mv] = _mm256_mul_ps(sums[mv], rescale);
                for (int d = 0; d < head_dim; d++) {
                    float *o = oT + (size_t)d * ml + mv * L;
                    _mm256_store_ps(o, _mm256_mul_ps(_mm256_load_ps(o), rescale));
                }
            }
            maxima[mv] = new_max;
            __m256 sum = sums[mv];
            for (int p = 0; p < count; p++) {
                const __m256i j = _mm256_set1_epi32(j0 + p);
                const __m256 seen = seen_avx2(first, lastv, j);
                float *s = S + (size_t)p * ml + mv * L;
                const __m256 w = _mm256_and_ps(seen, exp_nonpositive_avx2(_mm256_sub_ps(_mm256_load_ps(s), new_max)));
                sum = _mm256_add_ps(sum, w);
                _mm256_store_ps(s, w);
            }
            sums[mv] = sum;
        }
        for (int d0 = 0; d0 < head_dim; d0 += 4) {
            int mv0 = 0;
            for (; mv0 + 2 <= mvs; mv0 += 2) tile_values_avx2(v, count, S, ml, mv0, d0, oT, 2);
            if (mvs - mv0 == 1) tile_values_avx2(v, count, S, ml, mv0, d0, oT, 1);
        }
    }
    float inverse[ST_TILE_QUERIES] __attribute__((aligned(32)));
    for (int mv = 0; mv < mvs; mv++) _mm256_store_ps(inverse + mv * L, _mm256_div_ps(_mm256_set1_ps(1), sums[mv]));
    for (int m = 0; m < m_count; m++) {
        float *out = outs + (size_t)(m / heads) * out_stride + (size_t)(m % heads) * head_dim;
        for (int d = 0; d < head_dim; d++) out[d] = oT[(size_t)d * ml + m] * inverse[m];
    }
}

// Single tokens (decoding), and tiles the tile kernel does not take: the AVX-512 row kernel's
// shape at eight positions a block (attend_avx512_n). Tiles of two or more tokens go to
// attend_tile_avx2.
ST_AVX2 ST_ATTEND(st_attend_avx2) {
    if (head_dim % 8 != 0 || head_dim > ST_ATTEND_MAX_HEAD_DIM) {
        st_attend_portable(queries, query_stride, tokens, heads, keys, values, type, capacity, row_bytes, position, window, head_dim,
                           scale, outs, out_stride);
        return;
    }
    if (tokens >= 2 && tokens * heads <= ST_TILE_QUERIES && head_dim <= 128) {
        attend_tile_avx2(queries, query_stride, tokens, heads, keys, values, type, capacity, row_bytes, position, window, head_dim, scale,
                         outs, out_stride);
        return;
    }
    enum { width = 8 };
    float maxima[ST_ATTEND_MAX_QUERIES], sums[ST_ATTEND_MAX_QUERIES];
    float kbuf[width * ST_ATTEND_MAX_HEAD_DIM] __attribute__((aligned(32)));
    float vbuf[width * ST_ATTEND_MAX_HEAD_DIM] __attribute__((aligned(32)));
    for (int t = 0; t < tokens; t++) {
        for (int h = 0; h < heads; h++) {
            maxima[t * heads + h] = -INFINITY;
            sums[t * heads + h] = 0;
            float *out = outs + (size_t)t * out_stride + (size_t)h * head_dim;
            for (int i = 0; i < head_dim; i += 8) _mm256_storeu_ps(out + i, _mm256_setzero_ps());
        }
    }
    const __m256i lanes = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    const int last = position + tokens - 1;
    for (int j0 = first_position(position, 0, window) / width * width; j0 <= last; j0 += width) {
        const int count = last - j0 + 1 < width ? last - j0 + 1 : width;
        const float *k[width], *v[width];
        ST_ATTENTION_BLOCK(convert_row_avx2);
        for (int t = j0 > position ? j0 - position : 0; t < tokens; t++) {
            const uint32_t bits = visible(position, t, window, j0, count);
            if (!bits) {
                if (first_position(position, t, window) > j0 + count - 1) break;
                continue;
            }
            const __m256 valid = _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32((int)bits), lanes), lanes));
            const int a = __builtin_ctz(bits), b = 31 - __builtin_clz(bits);
            for (int h = 0; h < heads; h++) {
                const float *q = queries + (size_t)t * query_stride + (size_t)h * head_dim;
                float *out = outs + (size_t)t * out_stride + (size_t)h * head_dim;
                __m256 dots[width];
                for (int p = 0; p < width; p++) dots[p] = _mm256_setzero_ps();
                for (int c = 0; c < head_dim; c += 8) {
                    const __m256 qc = _mm256_loadu_ps(q + c);
                    for (int p = 0; p < width; p++) dots[p] = _mm256_fmadd_ps(qc, _mm256_loadu_ps(k[p] + c), dots[p]);
                }
                const __m256 s = _mm256_blendv_ps(_mm256_set1_ps(-INFINITY), _mm256_mul_ps(sum8(dots), _mm256_set1_ps(scale)), valid);
                float *m = &maxima[t * heads + h];
                const float block_max = st_hmax256(s);
                const float new_max = block_max > *m ? block_max : *m;
                const float rescale = expf(*m - new_max);
                const __m256 w = _mm256_and_ps(valid, exp_nonpositive_avx2(_mm256_sub_ps(s, _mm256_set1_ps(new_max))));
                sums[t * heads + h] = sums[t * heads + h] * rescale + st_hsum256(w);
                *m = new_max;
                float weights[width];
                _mm256_storeu_ps(weights, w);
                const __m256 r = _mm256_set1_ps(rescale);
                for (int c = 0; c < head_dim; c += 8) {
                    __m256 acc = _mm256_mul_ps(_mm256_loadu_ps(out + c), r);
                    for (int p = a; p <= b; p++) acc = _mm256_fmadd_ps(_mm256_set1_ps(weights[p]), _mm256_loadu_ps(v[p] + c), acc);
                    _mm256_storeu_ps(out + c, acc);
                }
            }
        }
    }
    for (int t = 0; t < tokens; t++) {
        for (int h = 0; h < heads; h++) {
            const __m256 inverse = _mm256_set1_ps(1 / sums[t * heads + h]);
            float *out = outs + (size_t)t * out_stride + (size_t)h * head_dim;
            for (int c = 0; c < head_dim; c += 8) _mm256_storeu_ps(out + c, _mm256_mul_ps(_mm256_loadu_ps(out + c), inverse));
        }
    }
}

// ---------------------------------------------------------------- AVX-512 VNNI

// A cache row as float32 (f16 or q8_0; head_dim a multiple of 16, of 32 for q8_0).
ST_AVX512 static inline void convert_row_avx512(int type, const void *row, float *out, int head_dim) {
    if (type == ST_KV_F16) {
        const uint16_t *h = row;
        for (int i = 0; i < head_dim; i += 16) {
            _mm512_storeu_ps(out + i, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(h + i))));
        }
    } else {
        const st_block_q8_0 *blocks = row;
        for (int b = 0; b < head_dim / ST_QK; b++) {
            const __m512 d = _mm512_set1_ps(_cvtsh_ss(blocks[b].d));
            for (int i = 0; i < ST_QK; i += 16) {
                const __m512i q = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(blocks[b].qs + i)));
                _mm512_storeu_ps(out + b * ST_QK + i, _mm512_mul_ps(_mm512_cvtepi32_ps(q), d));
            }
        }
    }
}

// e^x for x ≤ 0, 16 lanes (ST_EXP_REDUCED), scaled by 2^n with vscalefps (which also underflows
// to 0).
ST_AVX512 static inline __m512 exp_nonpositive(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-104.0f));
    const __m512 n =
        _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r, p;
    ST_EXP_REDUCED(x, n, r, p, _mm512_fmadd_ps, _mm512_fnmadd_ps, _mm512_set1_ps);
    return _mm512_scalef_ps(p, n);
}

// Lane i: the sum of the sixteen lanes of v[i]. Halving steps, each adding two shuffles of a
// pair of vectors, leave lane i holding v[perm[i]]'s sum; one permutation (perm is its own
// inverse) puts them in order.
ST_AVX512 static inline __m512 sum16(const __m512 v[16]) {
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

// Sixteen positions a block: a query's sixteen scores go through one vector exp, and its running
// output is rescaled once per block. head_dim = 16·n, at most 128; inlined with n a constant for
// the common 128, so the loops over a row unroll into registers.
ST_AVX512 __attribute__((always_inline)) static inline void attend_avx512_n(const float *queries, int query_stride, int tokens, int heads,
                                                                        const void *keys, const void *values, int type, int capacity,
                                                                        int row_bytes, int position, int window, int head_dim,
                                                                        float scale, float *outs, int out_stride, const int n) {
    enum { width = 16 };
    float maxima[ST_ATTEND_MAX_QUERIES], sums[ST_ATTEND_MAX_QUERIES];
    float kbuf[width * 128] __attribute__((aligned(64))), vbuf[width * 128] __attribute__((aligned(64)));
    for (int t = 0; t < tokens; t++) {
        for (int h = 0; h < heads; h++) {
            maxima[t * heads + h] = -INFINITY;
            sums[t * heads + h] = 0;
            float *out = outs + (size_t)t * out_stride + (size_t)h * head_dim;
            for (int c = 0; c < n; c++) _mm512_storeu_ps(out + 16 * c, _mm512_setzero_ps());
        }
    }
    const int last = position + tokens - 1;
    for (int j0 = first_position(position, 0, window) / width * width; j0 <= last; j0 += width) {
        const int count = last - j0 + 1 < width ? last - j0 + 1 : width;
        const float *k[width], *v[width];
        ST_ATTENTION_BLOCK(convert_row_avx512);
        for (int t = j0 > position ? j0 - position : 0; t < tokens; t++) {
            const uint32_t bits = visible(position, t, window, j0, count);
            if (!bits) {
                if (first_position(position, t, window) > j0 + count - 1) break;
                continue;
            }
            const __mmask16 valid = (__mmask16)bits;
            const int a = __builtin_ctz(bits), b = 31 - __builtin_clz(bits);
            for (int h = 0; h < heads; h++) {
                const float *q = queries + (size_t)t * query_stride + (size_t)h * head_dim;
                float *out = outs + (size_t)t * out_stride + (size_t)h * head_dim;
                __m512 qv[8], acc[8];
                for (int c = 0; c < n; c++) qv[c] = _mm512_loadu_ps(q + 16 * c);
                // Sixteen independent dot products (no chain waits on another; every position of
                // the block, so the loops unroll into registers: the rows of positions the query
                // does not see are cached rows too, and their scores are masked), then one
                // transposing reduction gives all sixteen scores in one vector.
                __m512 dots[width];
                for (int p = 0; p < width; p++) {
                    __m512 d = _mm512_mul_ps(qv[0], _mm512_loadu_ps(k[p]));
                    for (int c = 1; c < n; c++) d = _mm512_fmadd_ps(qv[c], _mm512_loadu_ps(k[p] + 16 * c), d);
                    dots[p] = d;
                }
                const __m512 s = _mm512_mask_mov_ps(_mm512_set1_ps(-INFINITY), valid, _mm512_mul_ps(sum16(dots), _mm512_set1_ps(scale)));
                float *m = &maxima[t * heads + h];
                const float block_max = _mm512_reduce_max_ps(s);
                for (int c = 0; c < n; c++) acc[c] = _mm512_loadu_ps(out + 16 * c);
                if (block_max > *m) {
                    // A larger score: what was summed so far is rescaled to the new maximum
                    // (nothing was, the first time).
                    const float rescale = *m == -INFINITY ? 0 : _mm512_cvtss_f32(exp_nonpositive(_mm512_set1_ps(*m - block_max)));
                    sums[t * heads + h] *= rescale;
                    const __m512 r = _mm512_set1_ps(rescale);
                    for (int c = 0; c < n; c++) acc[c] = _mm512_mul_ps(acc[c], r);
                    *m = block_max;
                }
                const __m512 w = _mm512_maskz_mov_ps(valid, exp_nonpositive(_mm512_sub_ps(s, _mm512_set1_ps(*m))));
                sums[t * heads + h] += _mm512_reduce_add_ps(w);
                float weights[width];
                _mm512_storeu_ps(weights, w);
                for (int p = a; p <= b; p++) {
                    const __m512 wp = _mm512_set1_ps(weights[p]);
                    for (int c = 0; c < n; c++) acc[c] = _mm512_fmadd_ps(wp, _mm512_loadu_ps(v[p] + 16 * c), acc[c]);
                }
                for (int c = 0; c < n; c++) _mm512_storeu_ps(out + 16 * c, acc[c]);
            }
        }
    }
    for (int t = 0; t < tokens; t++) {
        for (int h = 0; h < heads; h++) {
            const __m512 inverse = _mm512_set1_ps(1 / sums[t * heads + h]);
            float *out = outs + (size_t)t * out_stride + (size_t)h * head_dim;
            for (int c = 0; c < n; c++) _mm512_storeu_ps(out + 16 * c, _mm512_mul_ps(_mm512_loadu_ps(out + 16 * c), inverse));
        }
    }
}

// ---------------------------------------------------------------- AVX-512: queries across lanes

// The tile as small matrix products, with the queries across the vector lanes: the tile's
// queries transposed once (qT: head_dim rows of the queries, 16 to a vector), each block of
// positions' scores S = K·qT as an 8-position × 3-vector register tile over head_dim (a key
// value broadcast, three query vectors loaded: 11 loads for 24 FMAs), the online softmax then
// per lane (a query's maximum, rescaling and sum are plain vector operations, no horizontal
// reduction), and the outputs kept transposed (oT, head_dim rows) and accumulated
// oT += Vᵀ·W the same way. Each lane computes one query alone, in the same order whatever
// the tile holds. head_dim a multiple of 8, at most 128; at most ST_TILE_QUERIES queries.

// acc[r][i] += k[p0 + r][d] · qT[d][mv0 + i] over d, for nv (1 to 3) query vectors.
ST_AVX512 __attribute__((always_inline)) static inline void tile_scores_avx512(const float *const *k, int p0, const float *qT, int ml,
                                                                             int mv0, int head_dim, float *S, const int nv) {
    __m512 acc[8][3];
    for (int r = 0; r < 8; r++)
        for (int i = 0; i < nv; i++) acc[r][i] = _mm512_setzero_ps();
    for (int d = 0; d < head_dim; d++) {
        __m512 q[3];
        for (int i = 0; i < nv; i++) q[i] = _mm512_load_ps(qT + (size_t)d * ml + (mv0 + i) * 16);
        for (int r = 0; r < 8; r++) {
            const __m512 b = _mm512_set1_ps(k[p0 + r][d]);
            for (int i = 0; i < nv; i++) acc[r][i] = _mm512_fmadd_ps(b, q[i], acc[r][i]);
        }
    }
    for (int r = 0; r < 8; r++)
        for (int i = 0; i < nv; i++) _mm512_store_ps(S + (size_t)(p0 + r) * ml + (mv0 + i) * 16, acc[r][i]);
}

// oT[d0 + r][mv0 + i] += Σ_p v[p][d0 + r] · W[p][mv0 + i] over the block's `count` positions.
ST_AVX512 __attribute__((always_inline)) static inline void tile_values_avx512(const float *const *v, int count, const float *W, int ml,
                                                                             int mv0, int d0, float *oT, const int nv) {
    __m512 acc[8][3];
    for (int r = 0; r < 8; r++)
        for (int i = 0; i < nv; i++) acc[r][i] = _mm512_load_ps(oT + (size_t)(d0 + r) * ml + (mv0 + i) * 16);
    for (int p = 0; p < count; p++) {
        __m512 w[3];
        for (int i = 0; i < nv; i++) w[i] = _mm512_load_ps(W + (size_t)p * ml + (mv0 + i) * 16);
        for (int r = 0; r < 8; r++) {
            const __m512 b = _mm512_set1_ps(v[p][d0 + r]);
            for (int i = 0; i < nv; i++) acc[r][i] = _mm512_fmadd_ps(b, w[i], acc[r][i]);
        }
    }
    for (int r = 0; r < 8; r++)
        for (int i = 0; i < nv; i++) _mm512_store_ps(oT + (size_t)(d0 + r) * ml + (mv0 + i) * 16, acc[r][i]);
}

ST_AVX512 static void attend_tile_avx512(const float *queries, int query_stride, int tokens, int heads, const void *keys,
                                         const void *values, int type, int capacity, int row_bytes, int position, int window,
                                         int head_dim, float scale, float *outs, int out_stride) {
    enum { width = 32, L = 16 };
    const int m_count = tokens * heads, mvs = (m_count + L - 1) / L, ml = mvs * L;
    float qT[128 * ST_TILE_QUERIES] __attribute__((aligned(64)));
    float oT[128 * ST_TILE_QUERIES] __attribute__((aligned(64)));
    float S[width * ST_TILE_QUERIES] __attribute__((aligned(64)));
    float kbuf[width * 128] __attribute__((aligned(64))), vbuf[width * 128] __attribute__((aligned(64)));
    int firsts[ST_TILE_QUERIES] __attribute__((aligned(64))), lasts[ST_TILE_QUERIES] __attribute__((aligned(64)));
    __m512 maxima[ST_TILE_QUERIES / L], sums[ST_TILE_QUERIES / L];
    for (int m = 0; m < ml; m++) {
        const int t = m / heads, h = m % heads;
        const float *q = queries + (size_t)t * query_stride + (size_t)h * head_dim;
        for (int d = 0; d < head_dim; d++) {
            qT[(size_t)d * ml + m] = m < m_count ? q[d] * scale : 0;
            oT[(size_t)d * ml + m] = 0;
        }
        firsts[m] = m < m_count ? first_position(position, t, window) : 1 << 30;
        lasts[m] = m < m_count ? position + t : -1;
    }
    for (int mv = 0; mv < mvs; mv++) maxima[mv] = _mm512_set1_ps(-INFINITY), sums[mv] = _mm512_setzero_ps();
    const int last = position + tokens - 1;
    for (int j0 = first_position(position, 0, window) / width * width; j0 <= last; j0 += width) {
        const int count = last - j0 + 1 < width ? last - j0 + 1 : width;
        const float *k[width], *v[width];
        ST_ATTENTION_BLOCK(convert_row_avx512);
        for (int p0 = 0; p0 < count; p0 += 8) {
            int mv0 = 0;
            for (; mv0 + 3 <= mvs; mv0 += 3) tile_scores_avx512(k, p0, qT, ml, mv0, head_dim, S, 3);
            if (mvs - mv0 == 2) tile_scores_avx512(k, p0, qT, ml, mv0, head_dim, S, 2);
            if (mvs - mv0 == 1) tile_scores_avx512(k, p0, qT, ml, mv0, head_dim, S, 1);
        }
        for (int mv = 0; mv < mvs; mv++) {
            const __m512i first = _mm512_load_si512(firsts + mv * L), lastv = _mm512_load_si512(lasts + mv * L);
            __m512 block_max = _mm512_set1_ps(-INFINITY);
            for (int p = 0; p < count; p++) {
                const __m512i j = _mm512_set1_epi32(j0 + p);
                const __mmask16 seen = _mm512_cmple_epi32_mask(first, j) & _mm512_cmple_epi32_mask(j, lastv);
                block_max = _mm512_mask_max_ps(block_max, seen, block_max, _mm512_load_ps(S + (size_t)p * ml + mv * L));
            }
            const __m512 new_max = _mm512_max_ps(maxima[mv], block_max);
            // Lanes that have seen a position: rescale what they summed (0 the first time,
            // from −∞); lanes that have not keep everything at 0.
            const __mmask16 live = _mm512_cmp_ps_mask(new_max, _mm512_set1_ps(-INFINITY), _CMP_GT_OQ);
            const __mmask16 grew = _mm512_cmp_ps_mask(new_max, maxima[mv], _CMP_GT_OQ) & live;
            if (grew) {
                const __m512 rescale = _mm512_mask_mov_ps(_mm512_set1_ps(1), grew, exp_nonpositive(_mm512_sub_ps(maxima[mv], new_max)));
                sums[mv] = _mm512_mul_ps(sums[mv], rescale);
                for (int d = 0; d < head_dim; d++) {
                    float *o = oT + (size_t)d * ml + mv * L;
                    _mm512_store_ps(o, _mm512_mul_ps(_mm512_load_ps(o), rescale));
                }
            }
            maxima[mv] = new_max;
            __m512 sum = sums[mv];
            for (int p = 0; p < count; p++) {
                const __m512i j = _mm512_set1_epi32(j0 + p);
                const __mmask16 seen = _mm512_cmple_epi32_mask(first, j) & _mm512_cmple_epi32_mask(j, lastv);
                float *s = S + (size_t)p * ml + mv * L;
                const __m512 w = _mm512_maskz_mov_ps(seen, exp_nonpositive(_mm512_sub_ps(_mm512_load_ps(s), new_max)));
                sum = _mm512_add_ps(sum, w);
                _mm512_store_ps(s, w);
            }
            sums[mv] = sum;
        }
        for (int d0 = 0; d0 < head_dim; d0 += 8) {
            int mv0 = 0;
            for (; mv0 + 3 <= mvs; mv0 += 3) tile_values_avx512(v, count, S, ml, mv0, d0, oT, 3);
            if (mvs - mv0 == 2) tile_values_avx512(v, count, S, ml, mv0, d0, oT, 2);
            if (mvs - mv0 == 1) tile_values_avx512(v, count, S, ml, mv0, d0, oT, 1);
        }
    }
    float inverse[ST_TILE_QUERIES] __attribute__((aligned(64)));
    for (int mv = 0; mv < mvs; mv++) _mm512_store_ps(inverse + mv * L, _mm512_div_ps(_mm512_set1_ps(1), sums[mv]));
    for (int m = 0; m < m_count; m++) {
        float *out = outs + (size_t)(m / heads) * out_stride + (size_t)(m % heads) * head_dim;
        for (int d = 0; d < head_dim; d++) out[d] = oT[(size_t)d * ml + m] * inverse[m];
    }
}

ST_AVX512 ST_ATTEND(st_attend_avx512) {
    if (head_dim % 16 != 0 || head_dim > 128) {
        st_attend_portable(queries, query_stride, tokens, heads, keys, values, type, capacity, row_bytes, position, window, head_dim,
                           scale, outs, out_stride);
    } else if (tokens >= 2 && tokens * heads <= ST_TILE_QUERIES) {
        attend_tile_avx512(queries, query_stride, tokens, heads, keys, values, type, capacity, row_bytes, position, window, head_dim,
                           scale, outs, out_stride);
    } else if (head_dim == 128) {
        attend_avx512_n(queries, query_stride, tokens, heads, keys, values, type, capacity, row_bytes, position, window, head_dim, scale,
                        outs, out_stride, 8);
    } else {
        attend_avx512_n(queries, query_stride, tokens, heads, keys, values, type, capacity, row_bytes, position, window, head_dim, scale,
                        outs, out_stride, head_dim / 16);
    }
}

#endif

void st_attend(const float *queries, int query_stride, int tokens, int heads, const void *keys, const void *values, int type,
               int capacity, int row_bytes, int position, int window, int head_dim, float scale, float *outs, int out_stride) {
    const st_kernel_table *table = st_table();
    const int tile = heads >= ST_ATTEND_MAX_QUERIES ? 1 : ST_ATTEND_MAX_QUERIES / heads;
    for (int t = 0; t < tokens; t += tile) {
        for (int h = 0; h < heads; h += ST_ATTEND_MAX_QUERIES) {
            table->attend(queries + (size_t)t * query_stride + (size_t)h * head_dim, query_stride, tokens - t < tile ? tokens - t : tile,
                          heads - h < ST_ATTEND_MAX_QUERIES ? heads - h : ST_ATTEND_MAX_QUERIES, keys, values, type, capacity, row_bytes,
                          position + t, window, head_dim, scale, outs + (size_t)t * out_stride + (size_t)h * head_dim, out_stride);
        }
    }
}

#ifdef ST_ARM
// ---------------------------------------------------------------- NEON

// A cache row as float32, four lanes at a time (f16 or q8_0; head_dim a multiple of 4, of 32
// for q8_0).
static inline void convert_row_neon(int type, const void *row, float *out, int head_dim) {
    if (type == ST_KV_F32) {
        memcpy(out, row, sizeof(float) * (size_t)head_dim);
    } else if (type == ST_KV_F16) {
        const uint16_t *h = row;
        for (int i = 0; i < head_dim; i += 4) vst1q_f32(out + i, st_load4_f16_neon(h + i));
    } else {
        const st_block_q8_0 *blocks = row;
        for (int b = 0; b < head_dim / ST_QK; b++) {
            const float d = st_fp16_to_fp32(blocks[b].d);
            for (int i = 0; i < ST_QK; i += 8) {
                const int16x8_t q = vmovl_s8(vld1_s8(blocks[b].qs + i));
                vst1q_f32(out + b * ST_QK + i, vmulq_n_f32(vcvtq_f32_s32(vmovl_s16(vget_low_s16(q))), d));
                vst1q_f32(out + b * ST_QK + i + 4, vmulq_n_f32(vcvtq_f32_s32(vmovl_s16(vget_high_s16(q))), d));
            }
        }
    }
}

// The portable algorithm (a position at a time, its rows converted once for the tile) with the
// head-dimension loops four lanes wide (scores and exps stay scalar: one per position).
ST_ATTEND(st_attend_neon) {
    if (head_dim % 4 != 0 || head_dim > ST_ATTEND_MAX_HEAD_DIM) {
        st_attend_portable(queries, query_stride, tokens, heads, keys, values, type, capacity, row_bytes, position, window, head_dim,
                           scale, outs, out_stride);
        return;
    }
    float maxima[ST_ATTEND_MAX_QUERIES], sums[ST_ATTEND_MAX_QUERIES], k[ST_ATTEND_MAX_HEAD_DIM], v[ST_ATTEND_MAX_HEAD_DIM];
    for (int t = 0; t < tokens; t++) {
        for (int h = 0; h < heads; h++) {
            maxima[t * heads + h] = -INFINITY;
            sums[t * heads + h] = 0;
            float *out = outs + (size_t)t * out_stride + (size_t)h * head_dim;
            for (int i = 0; i < head_dim; i += 4) vst1q_f32(out + i, vdupq_n_f32(0));
        }
    }
    const int last = position + tokens - 1;
    for (int j = first_position(position, 0, window); j <= last; j++) {
        convert_row_neon(type, kv_row(keys, capacity, row_bytes, j), k, head_dim);
        convert_row_neon(type, kv_row(values, capacity, row_bytes, j), v, head_dim);
        for (int t = j > position ? j - position : 0; t < tokens && first_position(position, t, window) <= j; t++) {
            for (int h = 0; h < heads; h++) {
                const float *q = queries + (size_t)t * query_stride + (size_t)h * head_dim;
                float *out = outs + (size_t)t * out_stride + (size_t)h * head_dim;
                float32x4_t dot = vdupq_n_f32(0);
                for (int i = 0; i < head_dim; i += 4) dot = vfmaq_f32(dot, vld1q_f32(q + i), vld1q_f32(k + i));
                const float s = vaddvq_f32(dot) * scale;
                float *m = &maxima[t * heads + h], *sum = &sums[t * heads + h];
                if (s > *m) {
                    const float rescale = expf(*m - s);
                    for (int i = 0; i < head_dim; i += 4) vst1q_f32(out + i, vmulq_n_f32(vld1q_f32(out + i), rescale));
                    *sum *= rescale;
                    *m = s;
                }
                const float w = expf(s - *m);
                *sum += w;
                for (int i = 0; i < head_dim; i += 4) vst1q_f32(out + i, vfmaq_n_f32(vld1q_f32(out + i), vld1q_f32(v + i), w));
            }
        }
    }
    for (int t = 0; t < tokens; t++) {
        for (int h = 0; h < heads; h++) {
            const float inverse = 1 / sums[t * heads + h];
            float *out = outs + (size_t)t * out_stride + (size_t)h * head_dim;
            for (int i = 0; i < head_dim; i += 4) vst1q_f32(out + i, vmulq_n_f32(vld1q_f32(out + i), inverse));
        }
    }
}
#endif
