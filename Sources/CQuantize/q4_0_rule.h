// The reference Q4_0 quantiser's rule for one block (ggml's quantize_row_q4_0_ref), shared by
// q4_0.c and q4_0_compensated.c. Private to this target.
#ifndef ST_Q4_0_RULE_H
#define ST_Q4_0_RULE_H

#include <math.h>
#include <stdint.h>

// The low byte of cvttss2si(v), defined for every input: NaN or out of range gives INT32_MIN,
// whose low byte is 0, so those become 0 here; written as a select so that loops vectorise.
static inline int8_t st_low_byte_like_x86(float v) {
    const float t = (v != v || v >= 2147483648.0f || v < -2147483648.0f) ? 0.0f : v;
    return (int8_t)(int32_t)t;
}

// The block's scale: its first value of largest magnitude (sign and all; NaN skipped) over −8,
// +0 when every value is ±0 (the reference's starting max). Two passes that vectorise: the
// largest magnitude, then its first value.
static inline float st_q4_0_scale(const float v[32]) {
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
    return max / -8;
}

#endif
