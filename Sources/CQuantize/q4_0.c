// ggml's Q4_0 quantiser, bit for bit (see cquantize.h). Written so that clang vectorises it: the
// searches are selects, and the float-to-byte conversion is defined for every input.
#include "cquantize.h"
#include "q4_0_rule.h"

#include <math.h>
#include <string.h>

/// ggml's block_q4_0 (the runtime's kernels read the same struct): a float16 scale d and 16
/// bytes, byte j holding weight j in its low nibble and weight j + 16 in its high one.
typedef struct {
    uint16_t d;
    uint8_t qs[16];
} block_q4_0;
_Static_assert(sizeof(block_q4_0) == 18, "Q4_0 blocks are 18 bytes");

void st_quantize_q4_0(const float *x, int64_t n, uint8_t *out, double *sum_squared_error, double *sum_squared_value,
                      float *max_abs_error) {
    // Every product and sum rounded on its own, as in the reference (no fused multiply-adds).
#pragma clang fp contract(off)
    double errors[8] = {0}, squares[8] = {0};
    float worst[8] = {0};
    for (int64_t b = 0; b < n / 32; b++) {
        const float *v = x + b * 32;
        block_q4_0 *block = (block_q4_0 *)out + b;
        // The reference keeps the first value of largest magnitude (sign and all) and skips NaN.
        const float d = st_q4_0_scale(v);
        const float id = d != 0 ? 1.0f / d : 0.0f;
        const _Float16 h = (_Float16)d;
        uint16_t bits;
        memcpy(&bits, &h, 2);
        block->d = bits;
        for (int j = 0; j < 16; j++) {
            const float x0 = v[j] * id, x1 = v[j + 16] * id;
            int8_t q0 = st_low_byte_like_x86(x0 + 8.5f);
            int8_t q1 = st_low_byte_like_x86(x1 + 8.5f);
            if (q0 > 15) q0 = 15;
            if (q1 > 15) q1 = 15;
            block->qs[j] = (uint8_t)((uint8_t)q0 | (uint8_t)((uint8_t)q1 << 4));
        }
        if (!sum_squared_error) continue;
        // The round trip, as the stored block decodes; eight partial sums in double (vector
        // lanes), added pairwise at the end.
        const float scale = (float)h;
        float back[32];
        for (int j = 0; j < 16; j++) {
            back[j] = (float)((block->qs[j] & 0x0F) - 8) * scale;
            back[j + 16] = (float)((block->qs[j] >> 4) - 8) * scale;
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
        *sum_squared_value =
            ((squares[0] + squares[1]) + (squares[2] + squares[3])) + ((squares[4] + squares[5]) + (squares[6] + squares[7]));
        float largest = 0;
        for (int l = 0; l < 8; l++) largest = worst[l] > largest ? worst[l] : largest;
        *max_abs_error = largest;
    }
}
