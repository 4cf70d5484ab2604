// ggml's Q4_0 quantiser with an importance matrix (quantize_row_q4_0_impl with quant_weights),
// operation for operation, each product and sum rounded on its own (see cquantize.h).
#include "cquantize.h"

#include <math.h>
#include <string.h>

#pragma clang fp contract(off)

// Round to nearest, ties to even, by adding 1.5·2^23 (ggml's nearest_int; |f| < 2^22).
static inline int nearest(float f) {
    const float v = f + 12582912.f;
    int32_t i;
    memcpy(&i, &v, 4);
    return (i & 0x007fffff) - 0x00400000;
}

static inline int clamp8(int l) { return l < -8 ? -8 : l > 7 ? 7 : l; }

// The block's scale chosen to minimise Σ w·(x − d·l)² over the codes of 19 trial scales around
// the one that maps the largest magnitude to −8 (ggml's make_qx_quants, nmax 8, rmse_type 1,
// with weights); L gets the codes + 8.
static float search(const float *x, int8_t *L, const float *w) {
    float max = 0, amax = 0;
    for (int i = 0; i < 32; i++) {
        const float ax = fabsf(x[i]);
        if (ax > amax) {
            amax = ax;
            max = x[i];
        }
    }
    if (amax < 1e-15f) {
        memset(L, 0, 32);
        return 0;
    }
    float iscale = -8 / max;
    float sumlx = 0, suml2 = 0;
    for (int i = 0; i < 32; i++) {
        const int l = clamp8(nearest(iscale * x[i]));
        L[i] = (int8_t)(l + 8);
        sumlx += w[i] * x[i] * (float)l;
        suml2 += w[i] * (float)l * (float)l;
    }
    float scale = suml2 != 0 ? sumlx / suml2 : 0.0f;
    float best = scale * sumlx;
    for (int is = -9; is <= 9; is++) {
        if (is == 0) continue;
        iscale = -(8 + 0.1f * (float)is) / max;
        sumlx = suml2 = 0;
        for (int i = 0; i < 32; i++) {
            const int l = clamp8(nearest(iscale * x[i]));
            sumlx += w[i] * x[i] * (float)l;
            suml2 += w[i] * (float)l * (float)l;
        }
        if (suml2 > 0 && sumlx * sumlx > best * suml2) {
            for (int i = 0; i < 32; i++) L[i] = (int8_t)(clamp8(nearest(iscale * x[i])) + 8);
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    return scale;
}

void st_quantize_q4_0_weighted(const float *x, int64_t rows, int64_t row_length, const float *importance, uint8_t *out) {
    float weight[32];
    int8_t L[32];
    for (int64_t r = 0; r < rows; r++) {
        const float *row = x + r * row_length;
        float sum_x2 = 0;
        for (int64_t j = 0; j < row_length; j++) sum_x2 += row[j] * row[j];
        const float sigma2 = sum_x2 / (float)row_length;
        for (int64_t b = 0; b < row_length / 32; b++) {
            const float *xb = row + 32 * b, *qw = importance + 32 * b;
            for (int j = 0; j < 32; j++) weight[j] = qw[j] * sqrtf(sigma2 + xb[j] * xb[j]);
            const float d = search(xb, L, weight);
            uint8_t *block = out + (r * (row_length / 32) + b) * 18;
            const _Float16 h = (_Float16)d;
            memcpy(block, &h, 2);
            for (int j = 0; j < 16; j++) block[2 + j] = (uint8_t)(L[j] | L[j + 16] << 4);
        }
    }
}
