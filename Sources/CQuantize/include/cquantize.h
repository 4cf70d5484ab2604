#ifndef ST_CQUANTIZE_H
#define ST_CQUANTIZE_H

#include <stdint.h>

// The converter's quantiser, apart from the runtime kernels (Format uses this target only).

/// Quantises `n` floats (a multiple of 32) to ggml Q4_0 blocks, operation for operation as its
/// reference quantiser (`quantize_row_q4_0_ref`), so the bytes are identical. With non-NULL
/// statistics pointers it also decodes each block and sums the squared round-trip error and the
/// squared values (in double, eight partial sums added pairwise), and takes the largest absolute
/// error (NaN differences are skipped; the caller checks the sums for NaN).
void st_quantize_q4_0(const float *x, int64_t n, uint8_t *out, double *sum_squared_error, double *sum_squared_value,
                      float *max_abs_error);

#endif
