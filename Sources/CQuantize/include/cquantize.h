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

/// Quantises `rows` rows of `row_length` floats (a multiple of 32) to Q4_0 blocks weighted by
/// an importance matrix (`importance`: `row_length` values, one per column, shared by every
/// row), operation for operation as ggml's quantize_q4_0 with quant_weights: per row σ² = the
/// mean square; per block the weights importance·√(σ² + x²) and the scale of least weighted
/// error among 19 trials (make_qx_quants). Products and sums are rounded one by one (a build of
/// ggml that fuses them into FMAs can differ in the last bit of a sum, and so in a choice).
void st_quantize_q4_0_weighted(const float *x, int64_t rows, int64_t row_length, const float *importance, uint8_t *out);

/// Q4_0 blocks chosen with error feedback, in GPTQ's order of work, so that each row's rounding
/// error e keeps eᵀ H e small for a positive definite H given through `u`, the upper Cholesky
/// factor of H⁻¹ (`n` × `n`, row-major, from st_gptq_factor). Values are taken left to right;
/// each block's scale is the reference quantiser's (its largest value / −8) on the block's values
/// as the errors carried so far left them, each value rounds as the reference rounds it (clamped
/// to the format), and its error e_c is carried into the values after it: w_i −= e_c · u[c][i] /
/// u[c][c]. With H the identity nothing is carried and the bytes are st_quantize_q4_0's.
void st_quantize_q4_0_compensated(const float *x, int64_t rows, int64_t n, const double *u, uint8_t *out);

/// The factor st_quantize_q4_0_compensated takes: U upper triangular with Uᵀ U = H⁻¹, for `h`
/// (`n` × `n`, row-major, symmetric). Returns 0, or −1 when H is not positive definite (or
/// memory ran out).
int st_gptq_factor(const double *h, int64_t n, double *u);

/// ggml's type codes (ggml.h's `ggml_type`) of the block formats st_ggml_decode reads.
enum {
    ST_GGML_Q4_1 = 3,
    ST_GGML_Q5_0 = 6,
    ST_GGML_Q5_1 = 7,
    ST_GGML_Q2_K = 10,
    ST_GGML_Q3_K = 11,
    ST_GGML_Q4_K = 12,
    ST_GGML_Q5_K = 13,
    ST_GGML_Q6_K = 14,
    ST_GGML_IQ4_NL = 20,
    ST_GGML_IQ4_XS = 23,
};

/// Decodes `n` values of ggml type `type` (one of the above; `n` a multiple of its block) from
/// `blocks` into `out`, as ggml's reference dequantize_row_* computes them. Returns 0, or −1 for
/// another type or a count that is not whole blocks (nothing written).
int st_ggml_decode(int type, const uint8_t *blocks, int64_t n, float *out);

#endif
