// ggml's block formats that a GGUF import decodes to floats (see cquantize.h). Each decoder
// follows ggml's dequantize_row_* in what it computes and in which order, one rounding per
// operation (no fused multiply-adds), so its values are those of ggml's reference decoding and
// of the gguf package's.
#include "cquantize.h"

#include <string.h>

#pragma clang fp contract(off)

// An IEEE half as float: exact (every half is a float).
static inline float half(const uint8_t *p) {
    const uint32_t h = (uint32_t)p[0] | (uint32_t)p[1] << 8;
    const uint32_t sign = (h & 0x8000u) << 16, exponent = (h >> 10) & 0x1f, mantissa = h & 0x3ff;
    uint32_t bits;
    if (exponent == 0x1f) {
        bits = sign | 0x7f800000u | mantissa << 13;
    } else if (exponent != 0) {
        bits = sign | (exponent + 112) << 23 | mantissa << 13;
    } else if (mantissa == 0) {
        bits = sign;
    } else {  // subnormal: normalise
        int e = 113;
        uint32_t m = mantissa;
        while (!(m & 0x400)) {
            m <<= 1;
            e--;
        }
        bits = sign | (uint32_t)e << 23 | (m & 0x3ff) << 13;
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

// ggml's non-linear 4-bit grid (IQ4_NL and IQ4_XS).
static const int8_t iq4_grid[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};

// The 6-bit scale and min of sub-block j (0..7) of a Q4_K or Q5_K super-block's 12 scale bytes.
static inline void scale_min_k4(int j, const uint8_t *q, uint8_t *d, uint8_t *m) {
    if (j < 4) {
        *d = q[j] & 63;
        *m = q[j + 4] & 63;
    } else {
        *d = (q[j + 4] & 0xf) | (q[j - 4] >> 6) << 4;
        *m = (q[j + 4] >> 4) | (q[j] >> 6) << 4;
    }
}

// Q4_1: d, m (halves), 16 bytes; x = q·d + m.
static void decode_q4_1(const uint8_t *b, float *y) {
    const float d = half(b), m = half(b + 2);
    for (int j = 0; j < 16; j++) {
        y[j] = (float)(b[4 + j] & 0xf) * d + m;
        y[j + 16] = (float)(b[4 + j] >> 4) * d + m;
    }
}

// Q5_0 and Q5_1: d (and m), 32 fifth bits, 16 bytes of low nibbles.
static void decode_q5(const uint8_t *b, float *y, int with_min) {
    const float d = half(b), m = with_min ? half(b + 2) : 0;
    const uint8_t *qh = b + (with_min ? 4 : 2), *qs = qh + 4;
    const uint32_t high = (uint32_t)qh[0] | (uint32_t)qh[1] << 8 | (uint32_t)qh[2] << 16 | (uint32_t)qh[3] << 24;
    for (int j = 0; j < 16; j++) {
        const int x0 = (qs[j] & 0xf) | (int)((high >> j) << 4 & 0x10);
        const int x1 = (qs[j] >> 4) | (int)((high >> (j + 12)) & 0x10);
        if (with_min) {
            y[j] = (float)x0 * d + m;
            y[j + 16] = (float)x1 * d + m;
        } else {
            y[j] = (float)(x0 - 16) * d;
            y[j + 16] = (float)(x1 - 16) * d;
        }
    }
}

// Q2_K: 16 scale bytes (low nibble scale, high nibble min), 64 bytes of 2-bit quants, d, dmin.
static void decode_q2_k(const uint8_t *b, float *y) {
    const uint8_t *scales = b, *q = b + 16;
    const float d = half(b + 80), min = half(b + 82);
    int is = 0;
    for (int n = 0; n < 256; n += 128, q += 32) {
        for (int shift = 0; shift < 8; shift += 2) {
            for (int half_ = 0; half_ < 2; half_++) {
                const uint8_t sc = scales[is++];
                const float dl = d * (float)(sc & 0xf), ml = min * (float)(sc >> 4);
                for (int l = 0; l < 16; l++) *y++ = dl * (float)((q[l + 16 * half_] >> shift) & 3) - ml;
            }
        }
    }
}

// Q3_K: 32 bytes of high bits, 64 of low 2 bits, 12 bytes of 6-bit scales, d.
static void decode_q3_k(const uint8_t *b, float *y) {
    const uint8_t *hm = b, *q = b + 32, *packed = b + 96;
    const float d_all = half(b + 108);
    int8_t scales[16];
    for (int j = 0; j < 16; j++) {
        // Low 4 bits from byte j % 8 (low nibble for j < 8, high for j ≥ 8); high 2 bits from
        // byte 8 + j % 4, at bit 2·(j / 4).
        const int low = j < 8 ? packed[j] & 0xf : packed[j - 8] >> 4;
        const int high = (packed[8 + j % 4] >> (2 * (j / 4))) & 3;
        scales[j] = (int8_t)((low | high << 4) - 32);
    }
    int is = 0;
    uint8_t m = 1;
    for (int n = 0; n < 256; n += 128, q += 32) {
        for (int shift = 0; shift < 8; shift += 2, m <<= 1) {
            for (int half_ = 0; half_ < 2; half_++) {
                const float dl = d_all * (float)scales[is++];
                for (int l = 0; l < 16; l++) {
                    const int k = l + 16 * half_;
                    *y++ = dl * (float)(((q[k] >> shift) & 3) - ((hm[k] & m) ? 0 : 4));
                }
            }
        }
    }
}

// Q4_K and Q5_K: d, dmin, 12 scale bytes, (Q5_K: 32 bytes of fifth bits), 128 bytes of nibbles.
static void decode_q45_k(const uint8_t *b, float *y, int five) {
    const float d = half(b), min = half(b + 2);
    const uint8_t *scales = b + 4, *qh = b + 16, *ql = b + (five ? 48 : 16);
    uint8_t u1 = 1, u2 = 2;
    for (int j = 0, is = 0; j < 256; j += 64, ql += 32, is += 2, u1 <<= 2, u2 <<= 2) {
        uint8_t sc, m;
        scale_min_k4(is, scales, &sc, &m);
        const float d1 = d * (float)sc, m1 = min * (float)m;
        scale_min_k4(is + 1, scales, &sc, &m);
        const float d2 = d * (float)sc, m2 = min * (float)m;
        for (int l = 0; l < 32; l++) *y++ = d1 * (float)((ql[l] & 0xf) + (five && (qh[l] & u1) ? 16 : 0)) - m1;
        for (int l = 0; l < 32; l++) *y++ = d2 * (float)((ql[l] >> 4) + (five && (qh[l] & u2) ? 16 : 0)) - m2;
    }
}

// Q6_K: 128 bytes of low nibbles, 64 of high 2 bits, 16 int8 scales, d.
static void decode_q6_k(const uint8_t *b, float *y) {
    const uint8_t *ql = b, *qh = b + 128;
    const int8_t *sc = (const int8_t *)(b + 192);
    const float d = half(b + 208);
    for (int n = 0; n < 256; n += 128, y += 128, ql += 64, qh += 32, sc += 8) {
        for (int l = 0; l < 32; l++) {
            const int is = l / 16;
            const int q1 = ((ql[l] & 0xf) | ((qh[l] >> 0) & 3) << 4) - 32;
            const int q2 = ((ql[l + 32] & 0xf) | ((qh[l] >> 2) & 3) << 4) - 32;
            const int q3 = ((ql[l] >> 4) | ((qh[l] >> 4) & 3) << 4) - 32;
            const int q4 = ((ql[l + 32] >> 4) | ((qh[l] >> 6) & 3) << 4) - 32;
            y[l] = d * (float)sc[is] * (float)q1;
            y[l + 32] = d * (float)sc[is + 2] * (float)q2;
            y[l + 64] = d * (float)sc[is + 4] * (float)q3;
            y[l + 96] = d * (float)sc[is + 6] * (float)q4;
        }
    }
}

// IQ4_NL: d, 16 bytes of indices into the grid.
static void decode_iq4_nl(const uint8_t *b, float *y) {
    const float d = half(b);
    for (int j = 0; j < 16; j++) {
        y[j] = d * (float)iq4_grid[b[2 + j] & 0xf];
        y[j + 16] = d * (float)iq4_grid[b[2 + j] >> 4];
    }
}

// IQ4_XS: d, the scales' high 2 bits (16 bits), their low 4 bits (4 bytes), 128 bytes of indices.
static void decode_iq4_xs(const uint8_t *b, float *y) {
    const float d = half(b);
    const uint32_t high = (uint32_t)b[2] | (uint32_t)b[3] << 8;
    const uint8_t *low = b + 4, *qs = b + 8;
    for (int ib = 0; ib < 8; ib++, y += 32, qs += 16) {
        const int ls = ((low[ib / 2] >> (4 * (ib % 2))) & 0xf) | (int)((high >> (2 * ib)) & 3) << 4;
        const float dl = d * (float)(ls - 32);
        for (int j = 0; j < 16; j++) {
            y[j] = dl * (float)iq4_grid[qs[j] & 0xf];
            y[j + 16] = dl * (float)iq4_grid[qs[j] >> 4];
        }
    }
}

int st_ggml_decode(int type, const uint8_t *blocks, int64_t n, float *out) {
    int elements, bytes;
    switch (type) {
    case ST_GGML_Q4_1: elements = 32, bytes = 20; break;
    case ST_GGML_Q5_0: elements = 32, bytes = 22; break;
    case ST_GGML_Q5_1: elements = 32, bytes = 24; break;
    case ST_GGML_Q2_K: elements = 256, bytes = 84; break;
    case ST_GGML_Q3_K: elements = 256, bytes = 110; break;
    case ST_GGML_Q4_K: elements = 256, bytes = 144; break;
    case ST_GGML_Q5_K: elements = 256, bytes = 176; break;
    case ST_GGML_Q6_K: elements = 256, bytes = 210; break;
    case ST_GGML_IQ4_NL: elements = 32, bytes = 18; break;
    case ST_GGML_IQ4_XS: elements = 256, bytes = 136; break;
    default: return -1;
    }
    if (n % elements != 0) return -1;
    for (int64_t i = 0; i < n / elements; i++) {
        const uint8_t *b = blocks + i * bytes;
        float *y = out + i * elements;
        switch (type) {
        case ST_GGML_Q4_1: decode_q4_1(b, y); break;
        case ST_GGML_Q5_0: decode_q5(b, y, 0); break;
        case ST_GGML_Q5_1: decode_q5(b, y, 1); break;
        case ST_GGML_Q2_K: decode_q2_k(b, y); break;
        case ST_GGML_Q3_K: decode_q3_k(b, y); break;
        case ST_GGML_Q4_K: decode_q45_k(b, y, 0); break;
        case ST_GGML_Q5_K: decode_q45_k(b, y, 1); break;
        case ST_GGML_Q6_K: decode_q6_k(b, y); break;
        case ST_GGML_IQ4_NL: decode_iq4_nl(b, y); break;
        case ST_GGML_IQ4_XS: decode_iq4_xs(b, y); break;
        }
    }
    return 0;
}
