// y += a · row: the neuron-major expert down matrices, whose rows are added scaled by each active
// neuron's activation (ReGLU leaves most of them out). Single rows of every dtype, lists of Q4_0
// rows (one neuron slice of an expert), and two outputs over one list (two tokens of a prompt).
#include "internal.h"

// ---------------------------------------------------------------- portable

ST_AXPY(st_axpy_q4_0_portable, void) {
    const st_block_q4_0 *w = row;
    for (int b = 0; b < n / ST_QK; b++, w++) {
        const float s = a * st_fp16_to_fp32(w->d);
        for (int j = 0; j < 16; j++) {
            y[b * ST_QK + j] += s * (float)((w->qs[j] & 0x0F) - 8);
            y[b * ST_QK + j + 16] += s * (float)((w->qs[j] >> 4) - 8);
        }
    }
}

ST_AXPY(st_axpy_q8_0_portable, void) {
    const st_block_q8_0 *w = row;
    for (int b = 0; b < n / ST_QK; b++, w++) {
        const float s = a * st_fp16_to_fp32(w->d);
        for (int j = 0; j < ST_QK; j++) y[b * ST_QK + j] += s * (float)w->qs[j];
    }
}

ST_AXPY(st_axpy_f32_portable, float) {
    for (int i = 0; i < n; i++) y[i] += a * row[i];
}

ST_AXPY(st_axpy_bf16_portable, uint16_t) {
    for (int i = 0; i < n; i++) y[i] += a * st_bf16_to_fp32(row[i]);
}

ST_AXPY(st_axpy_f16_portable, uint16_t) {
    for (int i = 0; i < n; i++) y[i] += a * st_fp16_to_fp32(row[i]);
}

// This work is bound by arithmetic, not memory: the caller's next input, `next_bytes` at `next`
// (may be NULL), is prefetched into L2 a little at a time alongside it, so the memory system
// stays busy without a burst that would stall the core.
#define AXPY_ROWS_VIA_AXPY(name, axpy)                                                                  \
    ST_AXPY_ROWS(name) {                                                                                \
        const char *ahead = next;                                                                       \
        const int per_row = next && count > 0 ? next_bytes / count : 0;                                 \
        for (int a = 0; a < count; a++) {                                                               \
            st_prefetch_l2(ahead, per_row);                                                             \
            ahead += per_row;                                                                           \
            axpy((const uint8_t *)base + (size_t)rows[a] * row_bytes, coefficients[a], y, n);           \
        }                                                                                               \
    }
AXPY_ROWS_VIA_AXPY(st_axpy_rows_q4_0_portable, st_axpy_q4_0_portable)

// Tiers without a fused form add the rows for each output in turn (a zero coefficient adds
// nothing).
#define AXPY_ROWS2_VIA_AXPY(name, axpy)                                                                  \
    ST_AXPY_ROWS2(name) {                                                                                \
        for (int a = 0; a < count; a++) {                                                                \
            const uint8_t *w = (const uint8_t *)base + (size_t)rows[a] * row_bytes;                      \
            if (c0[a] != 0) axpy(w, c0[a], y0, n);                                                       \
            if (c1[a] != 0) axpy(w, c1[a], y1, n);                                                       \
        }                                                                                                \
    }
AXPY_ROWS2_VIA_AXPY(st_axpy_rows2_q4_0_portable, st_axpy_q4_0_portable)

#ifdef ST_X86
// The tile of up to four rows of the list that starts at entry a, into w; the next tile's rows
// are prefetched into L2 while it is worked on. Returns the tile's size.
static inline int row_tile(const uint8_t *m, int row_bytes, const int *rows, int a, int count, const st_block_q4_0 *w[4]) {
    const int tile = count - a < 4 ? count - a : 4;
    for (int k = 0; k < tile; k++) w[k] = (const st_block_q4_0 *)(m + (size_t)rows[a + k] * row_bytes);
    for (int k = 4; k < 8 && a + k < count; k++) st_prefetch_l2(m + (size_t)rows[a + k] * row_bytes, row_bytes);
    return tile;
}

// ---------------------------------------------------------------- AVX2 (+FMA, F16C)

ST_AVX2 ST_AXPY(st_axpy_q4_0_avx2, void) {
    const st_block_q4_0 *w = row;
    const __m256i eight = _mm256_set1_epi8(8);
    for (int b = 0; b < n / ST_QK; b++, w++) {
        const __m256 s = _mm256_set1_ps(a * _cvtsh_ss(w->d));
        const __m256i q = _mm256_sub_epi8(st_unpack_nibbles(w), eight);
        const __m128i lo = _mm256_castsi256_si128(q), hi = _mm256_extracti128_si256(q, 1);
        float *o = y + b * ST_QK;
        _mm256_storeu_ps(o, _mm256_fmadd_ps(s, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo)), _mm256_loadu_ps(o)));
        _mm256_storeu_ps(o + 8,
                         _mm256_fmadd_ps(s, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(lo, 8))), _mm256_loadu_ps(o + 8)));
        _mm256_storeu_ps(o + 16, _mm256_fmadd_ps(s, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi)), _mm256_loadu_ps(o + 16)));
        _mm256_storeu_ps(o + 24,
                         _mm256_fmadd_ps(s, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(hi, 8))), _mm256_loadu_ps(o + 24)));
    }
}

// One block of a row into a 32-float tile: nibbles become floats by zero extension and
// conversion, without the −8; the row's −8·scale goes to *bias, added once per tile.
ST_AVX2 static inline void axpy_block_avx2(const st_block_q4_0 *w, float c, __m256 acc[4], float *bias) {
    const float s = c * _cvtsh_ss(w->d);
    const __m256 vs = _mm256_set1_ps(s);
    const __m256i mask = _mm256_set1_epi32(0x0F);
    const __m256i b0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)w->qs));
    const __m256i b1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(w->qs + 8)));
    acc[0] = _mm256_fmadd_ps(vs, _mm256_cvtepi32_ps(_mm256_and_si256(b0, mask)), acc[0]);  // values 0..7
    acc[1] = _mm256_fmadd_ps(vs, _mm256_cvtepi32_ps(_mm256_and_si256(b1, mask)), acc[1]);  // 8..15
    acc[2] = _mm256_fmadd_ps(vs, _mm256_cvtepi32_ps(_mm256_srli_epi32(b0, 4)), acc[2]);    // 16..23
    acc[3] = _mm256_fmadd_ps(vs, _mm256_cvtepi32_ps(_mm256_srli_epi32(b1, 4)), acc[3]);    // 24..31
    *bias -= 8 * s;
}

// Four rows at a time, so each 32-float slice of y is loaded and stored once per four rows (as the
// AVX-512 version). Two lines of `next` are prefetched per block step.
ST_AVX2 ST_AXPY_ROWS(st_axpy_rows_q4_0_avx2) {
    const uint8_t *m = base;
    const char *ahead = next, *ahead_end = next ? (const char *)next + next_bytes : NULL;
    const int blocks = n / ST_QK;
    for (int a = 0; a < count; a += 4) {
        const st_block_q4_0 *w[4];
        const int tile = row_tile(m, row_bytes, rows, a, count, w);
        for (int b = 0; b < blocks; b++) {
            float *o = y + b * ST_QK;
            if (ahead < ahead_end) { st_prefetch_l2(ahead, tile == 4 ? 128 : 64); ahead += tile == 4 ? 128 : 64; }
            __m256 acc[4] = {_mm256_loadu_ps(o), _mm256_loadu_ps(o + 8), _mm256_loadu_ps(o + 16), _mm256_loadu_ps(o + 24)};
            float bias = 0;
            for (int k = 0; k < tile; k++) axpy_block_avx2(w[k] + b, coefficients[a + k], acc, &bias);
            const __m256 vb = _mm256_set1_ps(bias);
            for (int k = 0; k < 4; k++) _mm256_storeu_ps(o + 8 * k, _mm256_add_ps(acc[k], vb));
        }
    }
}

// Two tokens' rows in 16-bit integers, where a row's blocks come in whole eights (every model
// shape; others take the float form below). vpmaddwd multiplies two rows' nibbles by their
// coefficients and adds the pair in one step, so each pair of rows is unpacked once for both
// tokens and every multiply-add covers 16 products, twice the float form's. Per chunk of up to
// 2 · I16_PAIRS rows: each token's c·d (row coefficient times block scale) is rounded to an integer
// against 32767 / the chunk's largest |c·d| at that block, the two rows of a pair side by side in
// one 32-bit word; each block's 32 sums stay in int32 through the chunk (at most 2 · 32 pairs ·
// 15 · 32767 plus the offset, far inside) and meet the float scale once. Each product's
// coefficient is within half a step (1/65534 of the chunk's largest) of the float form's.
// Measured on the 21B width's P = 512 prompt (AVX2 tier, Zen 4): 1.5x the float form's speed per
// row in a microbenchmark, the down rows' share of the profile 0.89 → 0.77 of the dense dots'.
#define I16_PAIRS 32
#define I16_WORDS 4096
#define I16_MAX_BLOCKS 512

ST_AVX2 static void rows2_i16_avx2(const uint8_t *m, int row_bytes, const int *rows, const float *c0, const float *c1, int count,
                                   float *y0, float *y1, int blocks) {
    const float *cs[2] = {c0, c1};
    float *ys[2] = {y0, y1};
    const int pairs_max = I16_WORDS / (2 * blocks) < I16_PAIRS ? I16_WORDS / (2 * blocks) : I16_PAIRS;
    float dscale[I16_WORDS];                 // the chunk's rows' block scales, row by row
    int32_t words[I16_WORDS];                // [token][pair][block]: two rows' 16-bit coefficients
    float scale[2][I16_MAX_BLOCKS];          // per token and block: the largest |c·d|, then the step
    int32_t seed[2][I16_MAX_BLOCKS];         // −8 · Σ coefficients (the nibbles' offset of 8)
    const st_block_q4_0 *ptr[2 * I16_PAIRS];
    const __m256 sign = _mm256_set1_ps(-0.0f);
    const __m256i mask = _mm256_set1_epi16(0x0F);
    for (int a = 0; a < count; a += 2 * pairs_max) {
        const int k_count = count - a < 2 * pairs_max ? count - a : 2 * pairs_max;
        const int pairs = (k_count + 1) / 2;
        // The rows' scales as floats, and each token's largest |c·d| per block. An odd chunk's
        // last pair repeats its row with coefficient 0.
        for (int t = 0; t < 2; t++)
            for (int b = 0; b < blocks; b += 8) _mm256_storeu_ps(scale[t] + b, _mm256_setzero_ps());
        for (int k = 0; k < 2 * pairs; k++) {
            const int real = k < k_count;
            ptr[k] = (const st_block_q4_0 *)(m + (size_t)rows[a + (real ? k : k - 1)] * row_bytes);
            float *d = dscale + (size_t)k * blocks;
            for (int b = 0; b < blocks; b++) d[b] = _cvtsh_ss(ptr[k][b].d);
            for (int t = 0; t < 2 && real; t++) {
                const __m256 c = _mm256_set1_ps(fabsf(cs[t][a + k]));
                for (int b = 0; b < blocks; b += 8) {
                    const __m256 v = _mm256_mul_ps(c, _mm256_andnot_ps(sign, _mm256_loadu_ps(d + b)));
                    _mm256_storeu_ps(scale[t] + b, _mm256_max_ps(v, _mm256_loadu_ps(scale[t] + b)));
                }
            }
        }
        // The coefficient words and seeds; scale becomes each block's step (largest / 32767).
        for (int t = 0; t < 2; t++) {
            for (int b = 0; b < blocks; b += 8) {
                const __m256 s = _mm256_loadu_ps(scale[t] + b);
                const __m256 positive = _mm256_cmp_ps(s, _mm256_setzero_ps(), _CMP_GT_OQ);
                const __m256 inv = _mm256_and_ps(_mm256_div_ps(_mm256_set1_ps(32767.0f), s), positive);
                _mm256_storeu_ps(scale[t] + b, _mm256_mul_ps(s, _mm256_set1_ps(1.0f / 32767.0f)));
                __m256i sum = _mm256_setzero_si256();
                for (int p = 0; p < pairs; p++) {
                    const float f0 = cs[t][a + 2 * p], f1 = 2 * p + 1 < k_count ? cs[t][a + 2 * p + 1] : 0.0f;
                    const __m256 d0 = _mm256_loadu_ps(dscale + (size_t)(2 * p) * blocks + b);
                    const __m256 d1 = _mm256_loadu_ps(dscale + (size_t)(2 * p + 1) * blocks + b);
                    const __m256i w0 = _mm256_cvtps_epi32(_mm256_mul_ps(d0, _mm256_mul_ps(_mm256_set1_ps(f0), inv)));
                    const __m256i w1 = _mm256_cvtps_epi32(_mm256_mul_ps(d1, _mm256_mul_ps(_mm256_set1_ps(f1), inv)));
                    sum = _mm256_add_epi32(sum, _mm256_add_epi32(w0, w1));
                    _mm256_storeu_si256((__m256i *)(words + ((size_t)t * pairs + p) * blocks + b),
                                        _mm256_blend_epi16(w0, _mm256_slli_epi32(w1, 16), 0xAA));
                }
                _mm256_storeu_si256((__m256i *)(seed[t] + b), _mm256_slli_epi32(_mm256_sub_epi32(_mm256_setzero_si256(), sum), 3));
            }
        }
        // Block by block: every pair of rows into the int32 sums, then the outputs.
        for (int b = 0; b < blocks; b++) {
            __m256i acc[2][4];
            for (int t = 0; t < 2; t++)
                for (int v = 0; v < 4; v++) acc[t][v] = _mm256_set1_epi32(seed[t][b]);
            for (int p = 0; p < pairs; p++) {
                // Pairs (row 2p, row 2p + 1) of values 0..7, 8..15, 16..23 and 24..31 as 16-bit lanes.
                const __m128i q0 = _mm_loadu_si128((const __m128i *)ptr[2 * p][b].qs);
                const __m128i q1 = _mm_loadu_si128((const __m128i *)ptr[2 * p + 1][b].qs);
                const __m256i lo = _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(q0, q1));
                const __m256i hi = _mm256_cvtepu8_epi16(_mm_unpackhi_epi8(q0, q1));
                const __m256i w[4] = {_mm256_and_si256(lo, mask), _mm256_and_si256(hi, mask), _mm256_srli_epi16(lo, 4),
                                      _mm256_srli_epi16(hi, 4)};
                for (int t = 0; t < 2; t++) {
                    const __m256i c = _mm256_set1_epi32(words[((size_t)t * pairs + p) * blocks + b]);
                    for (int v = 0; v < 4; v++) acc[t][v] = _mm256_add_epi32(acc[t][v], _mm256_madd_epi16(w[v], c));
                }
            }
            for (int t = 0; t < 2; t++) {
                const __m256 s = _mm256_set1_ps(scale[t][b]);
                float *o = ys[t] + b * ST_QK;
                for (int v = 0; v < 4; v++) {
                    _mm256_storeu_ps(o + 8 * v, _mm256_fmadd_ps(s, _mm256_cvtepi32_ps(acc[t][v]), _mm256_loadu_ps(o + 8 * v)));
                }
            }
        }
    }
}

// Two tokens' rows in one pass (a prompt's tokens that chose the same expert share most of its
// active neurons): each row block is unpacked once for both, and each output's 32-float slice is
// loaded and stored once per four rows. Rows of whole eights of blocks take the integer form above.
ST_AVX2 ST_AXPY_ROWS2(st_axpy_rows2_q4_0_avx2) {
    if (n / ST_QK % 8 == 0 && n / ST_QK <= I16_MAX_BLOCKS) {
        rows2_i16_avx2(base, row_bytes, rows, c0, c1, count, y0, y1, n / ST_QK);
        return;
    }
    const uint8_t *m = base;
    const int blocks = n / ST_QK;
    const __m256i mask = _mm256_set1_epi32(0x0F);
    for (int a = 0; a < count; a += 4) {
        const st_block_q4_0 *w[4];
        const int tile = row_tile(m, row_bytes, rows, a, count, w);
        for (int b = 0; b < blocks; b++) {
            float *o0 = y0 + b * ST_QK, *o1 = y1 + b * ST_QK;
            __m256 p[4], q[4];
            for (int v = 0; v < 4; v++) { p[v] = _mm256_loadu_ps(o0 + 8 * v); q[v] = _mm256_loadu_ps(o1 + 8 * v); }
            float bias0 = 0, bias1 = 0;
            for (int k = 0; k < tile; k++) {
                const st_block_q4_0 *wb = w[k] + b;
                const float d = _cvtsh_ss(wb->d);
                const float s0 = c0[a + k] * d, s1 = c1[a + k] * d;
                const __m256i b0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)wb->qs));
                const __m256i b1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(wb->qs + 8)));
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

ST_AVX2 ST_AXPY(st_axpy_q8_0_avx2, void) {
    const st_block_q8_0 *w = row;
    for (int b = 0; b < n / ST_QK; b++, w++) {
        const __m256 s = _mm256_set1_ps(a * _cvtsh_ss(w->d));
        float *o = y + b * ST_QK;
        for (int k = 0; k < 4; k++) {
            const __m256 q = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(w->qs + 8 * k))));
            _mm256_storeu_ps(o + 8 * k, _mm256_fmadd_ps(s, q, _mm256_loadu_ps(o + 8 * k)));
        }
    }
}

ST_AVX2 ST_AXPY(st_axpy_f32_avx2, float) {
    const __m256 s = _mm256_set1_ps(a);
    int i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(s, _mm256_loadu_ps(row + i), _mm256_loadu_ps(y + i)));
    for (; i < n; i++) y[i] += a * row[i];
}

ST_AVX2 static inline __m256 load_bf16x8(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}

ST_AVX2 ST_AXPY(st_axpy_bf16_avx2, uint16_t) {
    const __m256 s = _mm256_set1_ps(a);
    int i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(s, load_bf16x8(row + i), _mm256_loadu_ps(y + i)));
    for (; i < n; i++) y[i] += a * st_bf16_to_fp32(row[i]);
}

ST_AVX2 ST_AXPY(st_axpy_f16_avx2, uint16_t) {
    const __m256 s = _mm256_set1_ps(a);
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 w = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(row + i)));
        _mm256_storeu_ps(y + i, _mm256_fmadd_ps(s, w, _mm256_loadu_ps(y + i)));
    }
    for (; i < n; i++) y[i] += a * st_fp16_to_fp32(row[i]);
}

// ---------------------------------------------------------------- AVX-512 VNNI

// 16 floats per instruction.
ST_AVX512 ST_AXPY(st_axpy_q4_0_avx512, void) {
    const st_block_q4_0 *w = row;
    const __m256i eight = _mm256_set1_epi8(8);
    for (int b = 0; b < n / ST_QK; b++, w++) {
        const __m512 s = _mm512_set1_ps(a * _cvtsh_ss(w->d));
        const __m256i q = _mm256_sub_epi8(st_unpack_nibbles(w), eight);
        float *o = y + b * ST_QK;
        _mm512_storeu_ps(o, _mm512_fmadd_ps(s, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(q))), _mm512_loadu_ps(o)));
        const __m512 high = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(q, 1)));
        _mm512_storeu_ps(o + 16, _mm512_fmadd_ps(s, high, _mm512_loadu_ps(o + 16)));
    }
}

// One block's 32 values (nibble − 8) as floats, lo and hi: through a 16-entry table (vpermps
// reads the low four bits of each lane).
ST_AVX512 static inline void block_floats_avx512(const st_block_q4_0 *w, __m512 table, __m512 *lo, __m512 *hi) {
    const __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)w->qs));
    *lo = _mm512_permutexvar_ps(q, table);
    *hi = _mm512_permutexvar_ps(_mm512_srli_epi32(q, 4), table);
}

// One block of a row, times c, into the 32-float tile (lo, hi).
ST_AVX512 static inline void axpy_block_avx512(const st_block_q4_0 *w, float c, __m512 table, __m512 *lo, __m512 *hi) {
    const __m512 s = _mm512_set1_ps(c * _cvtsh_ss(w->d));
    __m512 f_lo, f_hi;
    block_floats_avx512(w, table, &f_lo, &f_hi);
    *lo = _mm512_fmadd_ps(s, f_lo, *lo);
    *hi = _mm512_fmadd_ps(s, f_hi, *hi);
}

// Four rows at a time, so each 32-float slice of y is loaded and stored once per four rows. Two
// lines of `next` are prefetched per block step.
ST_AVX512 ST_AXPY_ROWS(st_axpy_rows_q4_0_avx512) {
    const uint8_t *m = base;
    const char *ahead = next, *ahead_end = next ? (const char *)next + next_bytes : NULL;
    const __m512 table = _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);
    const int blocks = n / ST_QK;
    int a = 0;
    for (; a + 4 <= count; a += 4) {
        const st_block_q4_0 *w0 = (const st_block_q4_0 *)(m + (size_t)rows[a] * row_bytes);
        const st_block_q4_0 *w1 = (const st_block_q4_0 *)(m + (size_t)rows[a + 1] * row_bytes);
        const st_block_q4_0 *w2 = (const st_block_q4_0 *)(m + (size_t)rows[a + 2] * row_bytes);
        const st_block_q4_0 *w3 = (const st_block_q4_0 *)(m + (size_t)rows[a + 3] * row_bytes);
        // The next tile's rows.
        for (int k = 4; k < 8 && a + k < count; k++) st_prefetch_l2(m + (size_t)rows[a + k] * row_bytes, row_bytes);
        const float c0 = coefficients[a], c1 = coefficients[a + 1], c2 = coefficients[a + 2], c3 = coefficients[a + 3];
        for (int b = 0; b < blocks; b++, w0++, w1++, w2++, w3++) {
            float *o = y + b * ST_QK;
            if (ahead < ahead_end) { st_prefetch_l2(ahead, 128); ahead += 128; }
            __m512 lo = _mm512_loadu_ps(o), hi = _mm512_loadu_ps(o + 16);
            axpy_block_avx512(w0, c0, table, &lo, &hi);
            axpy_block_avx512(w1, c1, table, &lo, &hi);
            axpy_block_avx512(w2, c2, table, &lo, &hi);
            axpy_block_avx512(w3, c3, table, &lo, &hi);
            _mm512_storeu_ps(o, lo);
            _mm512_storeu_ps(o + 16, hi);
        }
    }
    for (; a < count; a++) {
        const st_block_q4_0 *w0 = (const st_block_q4_0 *)(m + (size_t)rows[a] * row_bytes);
        for (int b = 0; b < blocks; b++, w0++) {
            float *o = y + b * ST_QK;
            if (ahead < ahead_end) { st_prefetch_l2(ahead, 64); ahead += 64; }
            __m512 lo = _mm512_loadu_ps(o), hi = _mm512_loadu_ps(o + 16);
            axpy_block_avx512(w0, coefficients[a], table, &lo, &hi);
            _mm512_storeu_ps(o, lo);
            _mm512_storeu_ps(o + 16, hi);
        }
    }
}

// Two tokens' rows in one pass, as the AVX2 version: each row block becomes floats once for both
// outputs, and each output's 32-float slice is loaded and stored once per four rows. Every output
// gets the same fused multiply-adds, in the same row order, as adding its rows one by one.
ST_AVX512 ST_AXPY_ROWS2(st_axpy_rows2_q4_0_avx512) {
    const uint8_t *m = base;
    const __m512 table = _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);
    const int blocks = n / ST_QK;
    for (int a = 0; a < count; a += 4) {
        const st_block_q4_0 *w[4];
        const int tile = row_tile(m, row_bytes, rows, a, count, w);
        for (int b = 0; b < blocks; b++) {
            float *o0 = y0 + b * ST_QK, *o1 = y1 + b * ST_QK;
            __m512 p_lo = _mm512_loadu_ps(o0), p_hi = _mm512_loadu_ps(o0 + 16);
            __m512 q_lo = _mm512_loadu_ps(o1), q_hi = _mm512_loadu_ps(o1 + 16);
            for (int k = 0; k < tile; k++) {
                const st_block_q4_0 *wb = w[k] + b;
                const float d = _cvtsh_ss(wb->d);
                __m512 lo, hi;
                block_floats_avx512(wb, table, &lo, &hi);
                const __m512 s0 = _mm512_set1_ps(c0[a + k] * d), s1 = _mm512_set1_ps(c1[a + k] * d);
                p_lo = _mm512_fmadd_ps(s0, lo, p_lo);
                p_hi = _mm512_fmadd_ps(s0, hi, p_hi);
                q_lo = _mm512_fmadd_ps(s1, lo, q_lo);
                q_hi = _mm512_fmadd_ps(s1, hi, q_hi);
            }
            _mm512_storeu_ps(o0, p_lo);
            _mm512_storeu_ps(o0 + 16, p_hi);
            _mm512_storeu_ps(o1, q_lo);
            _mm512_storeu_ps(o1 + 16, q_hi);
        }
    }
}
#endif

// ---------------------------------------------------------------- drivers (every tier)

void st_axpy_q4_0(const void *row, float a, float *y, int n) { st_table()->axpy_q4_0(row, a, y, n); }
void st_axpy_q8_0(const void *row, float a, float *y, int n) { st_table()->axpy_q8_0(row, a, y, n); }
void st_axpy_f32(const float *row, float a, float *y, int n) { st_table()->axpy_f32(row, a, y, n); }
void st_axpy_bf16(const uint16_t *row, float a, float *y, int n) { st_table()->axpy_bf16(row, a, y, n); }
void st_axpy_f16(const uint16_t *row, float a, float *y, int n) { st_table()->axpy_f16(row, a, y, n); }

void st_axpy_rows_q4_0(const void *base, int row_bytes, const int *rows, const float *coefficients, int count, float *y, int n) {
    st_table()->axpy_rows_q4_0(base, row_bytes, rows, coefficients, count, y, n, NULL, 0);
}

void st_axpy_rows_q4_0_pair(const void *base, int row_bytes, const int *rows0, const float *c0, int n0, const int *rows1,
                            const float *c1, int n1, float *y0, float *y1, int n, int *merged, float *m0, float *m1) {
    // The rows both tokens use go through the two-output kernel (each unpacked once for both);
    // the rows only one uses through the one-output kernel, which does not spend a multiply-add
    // of zero on the other output. Layout of the scratch: the shared rows first, then the first
    // token's own, then the second's.
    int shared = 0;
    for (int a = 0, b = 0; a < n0 && b < n1;) {
        if (rows0[a] < rows1[b]) a++;
        else if (rows1[b] < rows0[a]) b++;
        else { shared++; a++; b++; }
    }
    int both = 0, only0 = shared, only1 = n0;
    for (int a = 0, b = 0; a < n0 || b < n1;) {
        if (b >= n1 || (a < n0 && rows0[a] < rows1[b])) {
            merged[only0] = rows0[a]; m0[only0++] = c0[a++];
        } else if (a >= n0 || rows1[b] < rows0[a]) {
            merged[only1] = rows1[b]; m1[only1++] = c1[b++];
        } else {
            merged[both] = rows0[a]; m0[both] = c0[a++]; m1[both++] = c1[b++];
        }
    }
    const st_kernel_table *k = st_table();
    if (shared > 0) k->axpy_rows2_q4_0(base, row_bytes, merged, m0, m1, shared, y0, y1, n);
    if (n0 > shared) k->axpy_rows_q4_0(base, row_bytes, merged + shared, m0 + shared, n0 - shared, y0, n, NULL, 0);
    if (n1 > shared) k->axpy_rows_q4_0(base, row_bytes, merged + n0, m1 + n0, n1 - shared, y1, n, NULL, 0);
}

void st_add_rows(float *y, const float *rows, int count, int stride, int n) {
    for (int k = 0; k < count; k++) {
        const float *r = rows + (size_t)k * stride;
        for (int i = 0; i < n; i++) y[i] += r[i];
    }
}

#ifdef ST_ARM
// ---------------------------------------------------------------- NEON

// Sixteen signed bytes, widened to float32 and scaled, added to y[0..15].
static inline void st_axpy16_neon(int8x16_t w, float s, float *y) {
    const int16x8_t lo = vmovl_s8(vget_low_s8(w)), hi = vmovl_high_s8(w);
    const float32x4_t f[4] = {vcvtq_f32_s32(vmovl_s16(vget_low_s16(lo))), vcvtq_f32_s32(vmovl_high_s16(lo)),
                              vcvtq_f32_s32(vmovl_s16(vget_low_s16(hi))), vcvtq_f32_s32(vmovl_high_s16(hi))};
    for (int k = 0; k < 4; k++) vst1q_f32(y + 4 * k, vfmaq_n_f32(vld1q_f32(y + 4 * k), f[k], s));
}

ST_AXPY(st_axpy_q4_0_neon, void) {
    const st_block_q4_0 *w = row;
    for (int b = 0; b < n / ST_QK; b++, w++) {
        int8x16_t lo, hi;
        st_nibbles_neon(w->qs, &lo, &hi);
        const float s = a * st_fp16_to_fp32(w->d);
        st_axpy16_neon(lo, s, y + b * ST_QK);
        st_axpy16_neon(hi, s, y + b * ST_QK + 16);
    }
}

ST_AXPY(st_axpy_q8_0_neon, void) {
    const st_block_q8_0 *w = row;
    for (int b = 0; b < n / ST_QK; b++, w++) {
        const float s = a * st_fp16_to_fp32(w->d);
        st_axpy16_neon(vld1q_s8(w->qs), s, y + b * ST_QK);
        st_axpy16_neon(vld1q_s8(w->qs + 16), s, y + b * ST_QK + 16);
    }
}

#define NEON_AXPY_F(name, T, LOAD4, SCALAR)                                                          \
    ST_AXPY(name, T) {                                                                               \
        int i = 0;                                                                                   \
        for (; i + 4 <= n; i += 4) vst1q_f32(y + i, vfmaq_n_f32(vld1q_f32(y + i), LOAD4(row + i), a)); \
        for (; i < n; i++) y[i] += a * SCALAR(row[i]);                                               \
    }
NEON_AXPY_F(st_axpy_f32_neon, float, st_load4_f32_neon, st_f32_identity)
NEON_AXPY_F(st_axpy_bf16_neon, uint16_t, st_load4_bf16_neon, st_bf16_to_fp32)
NEON_AXPY_F(st_axpy_f16_neon, uint16_t, st_load4_f16_neon, st_fp16_to_fp32)

AXPY_ROWS_VIA_AXPY(st_axpy_rows_q4_0_neon, st_axpy_q4_0_neon)
AXPY_ROWS2_VIA_AXPY(st_axpy_rows2_q4_0_neon, st_axpy_q4_0_neon)
#endif
