// Attention for the query heads that share one key/value head (grouped-query attention), over
// the cached positions first...last (ring slot j % capacity, `stride` floats per slot): for each
// head, the softmax(q·k_j · scale)-weighted sum of v_j, in one pass with a running maximum (no
// score vector; partial sums are rescaled when a larger score arrives). The heads' queries, and
// their outputs, are `head_dim` floats apart.
#include "internal.h"

// ---------------------------------------------------------------- portable

ST_ATTEND(st_attend_portable) {
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

#ifdef ST_X86
// For the vector attentions' blocks of `width` positions from j0 (`count` of them real): each
// position's key and value rows into k and v, the rest padded with the first one's; and the next
// block's rows fetched while this one computes (positions are a row of the cache apart, a stride
// the hardware prefetchers follow too slowly from memory).
static inline void attention_block(const float *keys, const float *values, int capacity, int stride, int j0, int count, int width,
                                   int last, int head_dim, const float **k, const float **v) {
    for (int p = 0; p < width; p++) {
        const size_t slot = (size_t)((j0 + (p < count ? p : 0)) % capacity) * stride;
        k[p] = keys + slot;
        v[p] = values + slot;
    }
    for (int p = j0 + width; p <= last && p < j0 + 2 * width; p++) {
        const size_t slot = (size_t)(p % capacity) * stride;
        st_prefetch_l1(keys + slot, head_dim * (int)sizeof(float));
        st_prefetch_l1(values + slot, head_dim * (int)sizeof(float));
    }
}

// ---------------------------------------------------------------- AVX2 (+FMA, F16C)
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

// The AVX-512 attention's shape at eight positions a block: each block's keys and values are
// read from memory once for every head of the group, a head's eight scores go through one
// vector exp, and its running output is rescaled once per block. head_dim a multiple of 8.
ST_AVX2 ST_ATTEND(st_attend_avx2) {
    if (head_dim % 8 != 0 || heads > 64) {
        st_attend_portable(queries, heads, keys, values, capacity, stride, first, last, head_dim, scale, outs);
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
            const float block_max = st_hmax256(s);
            const float new_max = block_max > maxima[h] ? block_max : maxima[h];
            const float rescale = expf(maxima[h] - new_max);
            const __m256 w = _mm256_and_ps(valid, exp_nonpositive_avx2(_mm256_sub_ps(s, _mm256_set1_ps(new_max))));
            sums[h] = sums[h] * rescale + st_hsum256(w);
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

// ---------------------------------------------------------------- AVX-512 VNNI

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

// Sixteen positions at a time: their keys and values are read from memory once for every head
// of the group (then from L1), each head's sixteen scores go through one vector exp, and its
// running output is rescaled once per block. head_dim a multiple of 16, at most 128.
// head_dim = 16·n; inlined with n a constant for the common 128, so the loops over a row unroll
// into registers.
ST_AVX512 __attribute__((always_inline)) static inline void attend_avx512_n(const float *queries, int heads, const float *keys,
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

ST_AVX512 ST_ATTEND(st_attend_avx512) {
    if (head_dim % 16 != 0 || head_dim > 128 || heads > 64) {
        st_attend_portable(queries, heads, keys, values, capacity, stride, first, last, head_dim, scale, outs);
    } else if (head_dim == 128) {
        attend_avx512_n(queries, heads, keys, values, capacity, stride, first, last, head_dim, scale, outs, 8);
    } else {
        attend_avx512_n(queries, heads, keys, values, capacity, stride, first, last, head_dim, scale, outs, head_dim / 16);
    }
}

#endif

void st_attend(const float *queries, int heads, const float *keys, const float *values, int capacity, int stride, int first, int last,
               int head_dim, float scale, float *outs) {
    st_table()->attend(queries, heads, keys, values, capacity, stride, first, last, head_dim, scale, outs);
}

#ifdef ST_ARM
// ---------------------------------------------------------------- NEON

// The portable algorithm with the head-dimension loops four lanes wide (scores and exps stay
// scalar: one per position).
ST_ATTEND(st_attend_neon) {
    if (head_dim % 4 != 0) {
        st_attend_portable(queries, heads, keys, values, capacity, stride, first, last, head_dim, scale, outs);
        return;
    }
    for (int h = 0; h < heads; h++) {
        const float *q = queries + (size_t)h * head_dim;
        float *out = outs + (size_t)h * head_dim;
        for (int i = 0; i < head_dim; i += 4) vst1q_f32(out + i, vdupq_n_f32(0));
        float max_score = -INFINITY, sum = 0;
        for (int j = first; j <= last; j++) {
            const float *k = keys + (size_t)(j % capacity) * stride, *v = values + (size_t)(j % capacity) * stride;
            float32x4_t dot = vdupq_n_f32(0);
            for (int i = 0; i < head_dim; i += 4) dot = vfmaq_f32(dot, vld1q_f32(q + i), vld1q_f32(k + i));
            const float s = vaddvq_f32(dot) * scale;
            if (s > max_score) {
                const float rescale = expf(max_score - s);
                for (int i = 0; i < head_dim; i += 4) vst1q_f32(out + i, vmulq_n_f32(vld1q_f32(out + i), rescale));
                sum *= rescale;
                max_score = s;
            }
            const float w = expf(s - max_score);
            sum += w;
            for (int i = 0; i < head_dim; i += 4) vst1q_f32(out + i, vfmaq_n_f32(vld1q_f32(out + i), vld1q_f32(v + i), w));
        }
        const float inverse = 1 / sum;
        for (int i = 0; i < head_dim; i += 4) vst1q_f32(out + i, vmulq_n_f32(vld1q_f32(out + i), inverse));
    }
}
#endif
