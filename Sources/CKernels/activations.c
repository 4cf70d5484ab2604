// Activations on their way into the kernels: RMS normalisation, and quantisation to Q8_0 (a
// float32 scale d = amax / 127 per block of 32, q = round(x / d) with ties away from zero as
// ggml's quantize_row_q8_0, and each block's sum of q for the Q4_0 kernels' offset). Every tier
// rounds exactly as the portable code, so the quantised activations are the same bytes on all.
#include "internal.h"

// ---------------------------------------------------------------- portable

ST_QUANTIZE(st_quantize_q8_0_portable) {
    for (int b = 0; b < n / ST_QK; b++) {
        float amax = 0;
        for (int j = 0; j < ST_QK; j++) amax = fmaxf(amax, fabsf(x[b * ST_QK + j]));
        const float d = amax / 127.0f;
        const float id = d != 0 ? 1.0f / d : 0.0f;
        scales[b] = d;
        int32_t sum = 0;
        for (int j = 0; j < ST_QK; j++) {
            q[b * ST_QK + j] = (int8_t)roundf(x[b * ST_QK + j] * id);
            sum += q[b * ST_QK + j];
        }
        sums[b] = sum;
    }
}

#ifdef ST_X86
// ---------------------------------------------------------------- AVX2 (+FMA, F16C)

// Activations to Q8_0 as st_quantize_q8_0_portable, eight lanes at a time: d = amax / 127, and
// q = roundf(x / d) with roundf's ties away from zero done exactly (truncate, then step away
// from zero when the dropped fraction is at least one half), as the AVX-512 version does.
ST_AVX2 ST_QUANTIZE(st_quantize_q8_0_avx2) {
    const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    const __m256 sign_mask = _mm256_castsi256_ps(_mm256_set1_epi32((int)0x80000000));
    for (int b = 0; b < n / 32; b++) {
        __m256 v[4];
        for (int k = 0; k < 4; k++) v[k] = _mm256_loadu_ps(x + b * 32 + 8 * k);
        const __m256 m = _mm256_max_ps(_mm256_max_ps(_mm256_and_ps(v[0], abs_mask), _mm256_and_ps(v[1], abs_mask)),
                                       _mm256_max_ps(_mm256_and_ps(v[2], abs_mask), _mm256_and_ps(v[3], abs_mask)));
        const float amax = st_hmax256(m);
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

// ---------------------------------------------------------------- AVX-512 VNNI

// Activations to Q8_0 as st_quantize_q8_0_portable, sixteen lanes at a time: d = amax / 127, and
// q = roundf(x / d) with roundf's ties away from zero done exactly (truncate, then step away from
// zero when the dropped fraction is at least one half), which vroundps's ties-to-even would not.
ST_AVX512 ST_QUANTIZE(st_quantize_q8_0_avx512) {
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

#endif

void st_quantize_q8_0(const float *x, float *scales, int8_t *q, int32_t *sums, int n) { st_table()->quantize_q8_0(x, scales, q, sums, n); }

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

#ifdef ST_ARM
// ---------------------------------------------------------------- NEON

// As st_quantize_q8_0_portable, four lanes at a time: the maximum with maxNum (fmaxf's NaN rule),
// the same float32 multiply, and FCVTAS, which rounds half away from zero as roundf does.
ST_QUANTIZE(st_quantize_q8_0_neon) {
    for (int b = 0; b < n / ST_QK; b++) {
        float32x4_t v[8];
        float32x4_t m = vdupq_n_f32(0);
        for (int k = 0; k < 8; k++) {
            v[k] = vld1q_f32(x + b * ST_QK + 4 * k);
            m = vmaxnmq_f32(m, vabsq_f32(v[k]));
        }
        const float d = vmaxnmvq_f32(m) / 127.0f;
        const float id = d != 0 ? 1.0f / d : 0.0f;
        scales[b] = d;
        int32x4_t total = vdupq_n_s32(0);
        int16x8_t halves[4];
        for (int k = 0; k < 4; k++) {
            const int32x4_t a = vcvtaq_s32_f32(vmulq_n_f32(v[2 * k], id)), c = vcvtaq_s32_f32(vmulq_n_f32(v[2 * k + 1], id));
            total = vaddq_s32(total, vaddq_s32(a, c));
            halves[k] = vcombine_s16(vmovn_s32(a), vmovn_s32(c));
        }
        vst1q_s8(q + b * ST_QK, vcombine_s8(vmovn_s16(halves[0]), vmovn_s16(halves[1])));
        vst1q_s8(q + b * ST_QK + 16, vcombine_s8(vmovn_s16(halves[2]), vmovn_s16(halves[3])));
        sums[b] = vaddvq_s32(total);
    }
}
#endif
