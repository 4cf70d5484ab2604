#ifndef ST_CKERNELS_H
#define ST_CKERNELS_H

#include <stdint.h>

// Row kernels for the runtime, one implementation per instruction set, chosen once at run time
// (st_kernels_select). The sources are one file per operation family (dot.c, grouped.c, axpy.c,
// attention.c, activations.c, experts.c), each with its portable version first and its SIMD
// versions beside it; dispatch.c holds the tables. Every variant computes the same function as the portable C version; the
// tests compare them. Activations in Q8_0 form are a float32 scale per block of 32 and 32 int8s.

enum {
    ST_ISA_PORTABLE = 0,
    ST_ISA_AVX2 = 1,      // AVX2 + FMA + F16C
    ST_ISA_AVX512 = 2,    // AVX-512 F/BW/VL + VNNI
    ST_ISA_NEON = 3,      // aarch64 Advanced SIMD (every aarch64 CPU)
    ST_ISA_DOTPROD = 4,   // NEON with the dot-product extension (SDOT)
};

/// The best instruction set this CPU supports.
int st_detect_isa(void);
/// Selects the kernels for `isa` (the best this CPU has when it lacks `isa`); returns the one selected.
int st_kernels_select(int isa);
/// The instruction set this thread's kernel calls use: its bound one, else the selected one.
int st_kernels_isa(void);
/// Binds the calling thread to `isa`'s kernels (-1: back to the process-wide selection), so
/// that computations on different tiers can run side by side. Returns the previous binding
/// (-1 for none), or -2 without changing anything when this CPU lacks `isa`.
int st_kernels_bind(int isa);
/// The calling thread's binding, or -1 for none.
int st_kernels_bound(void);

/// One instruction set's kernels (the functions below dispatch through the selected one).
typedef struct st_kernel_table {
    float (*dot_q4_0)(const void *row, const float *xs, const int8_t *xq, const int32_t *xsum, int blocks);
    float (*dot_q8_0)(const void *row, const float *xs, const int8_t *xq, const int32_t *xsum, int blocks);
    /// One weight row against `tokens` activation vectors (stride: blocks per token), results
    /// to out[t * out_stride]: the weight block is unpacked once for all of them.
    void (*dot_q4_0_tokens)(const void *row, const float *xs, const int8_t *xq, const int32_t *xsum, int blocks,
                            int tokens, float *out, int out_stride);
    void (*dot_q8_0_tokens)(const void *row, const float *xs, const int8_t *xq, const int32_t *xsum, int blocks,
                            int tokens, float *out, int out_stride);
    float (*dot_f32)(const float *row, const float *x, int n);
    float (*dot_bf16)(const uint16_t *row, const float *x, int n);
    float (*dot_f16)(const uint16_t *row, const float *x, int n);
    void (*axpy_q4_0)(const void *row, float a, float *y, int n);
    void (*axpy_q8_0)(const void *row, float a, float *y, int n);
    void (*axpy_f32)(const float *row, float a, float *y, int n);
    void (*axpy_bf16)(const uint16_t *row, float a, float *y, int n);
    void (*axpy_f16)(const uint16_t *row, float a, float *y, int n);
    void (*quantize_q8_0)(const float *x, float *scales, int8_t *q, int32_t *sums, int n);
    /// Eight interleaved Q4_0 rows (one group of the row_major_x8 layout) against `tokens`
    /// activation vectors: row i of token t to out[t * out_stride + i].
    void (*dot_q4_0_x8)(const void *group, const float *xs, const int8_t *xq, const int32_t *xsum, int blocks,
                        int tokens, float *out, int out_stride);
    /// `rows` (1 or 2) Q4_0 rows in the row_major_b8 layout, row_bytes apart, against `tokens`
    /// activation vectors interleaved by st_interleave_q8_0_b8 (`xr`; blocks a multiple of 8):
    /// row r · x_t to out[t * out_stride + r], for t = which[0..<tokens] (`which` NULL: 0..<tokens).
    void (*dot_q4_0_b8)(const void *row, int row_bytes, int rows, const float *xs, const int8_t *xr, const int32_t *xsum,
                        int blocks, int tokens, const int32_t *which, float *out, int out_stride);
    /// One row_major_b8 row against one token's interleaved activations (dot_q4_0_b8 with one row
    /// and one token, the same bits), asking meanwhile for the row at `ahead` (NULL: none) a part
    /// at a time: for gathering rows scattered through memory (expert up rows of active neurons).
    float (*dot_q4_0_b8_ahead)(const void *row, const void *ahead, const float *xs, const int8_t *xr, const int32_t *xsum,
                               int blocks);
    /// y += Σ coefficients[a] · (row rows[a] of the Q4_0 matrix at base), for `count` rows, while
    /// prefetching about `next_bytes` at `next` (NULL for none) into L2, spread over the work.
    void (*axpy_rows_q4_0)(const void *base, int row_bytes, const int *rows, const float *coefficients, int count, float *y, int n,
                           const void *next, int next_bytes);
    /// Attention for a tile of `tokens` × `heads` queries (at most ST_ATTEND_MAX_QUERIES): the
    /// heads sharing one key/value head, for consecutive tokens of one sequence, token t at
    /// `position` + t (its queries at queries + t · query_stride, heads `head_dim` floats apart;
    /// its outputs likewise at outs + t · out_stride). out = Σ_j softmax_j(q·k_j · scale) v_j
    /// over positions first_t...position + t, first_t = 0, or with a sliding `window` (> 0)
    /// max(0, position + t − window + 1). Position j's key and value rows (KV cache `type`,
    /// `row_bytes` each, st_kv_row_bytes) are at (j % capacity) · row_bytes from keys and values.
    void (*attend)(const float *queries, int query_stride, int tokens, int heads, const void *keys, const void *values, int type,
                   int capacity, int row_bytes, int position, int window, int head_dim, float scale, float *outs, int out_stride);
    /// y0 += Σ c0[a] · row rows[a] and y1 += Σ c1[a] · row rows[a] over one list of `count`
    /// rows of the Q4_0 matrix at base (a zero coefficient adds nothing).
    void (*axpy_rows2_q4_0)(const void *base, int row_bytes, const int *rows, const float *c0, const float *c1, int count,
                            float *y0, float *y1, int n);
} st_kernel_table;

/// The kernels of `isa`, or NULL when this CPU (or build) does not have it. For tests.
const st_kernel_table *st_kernels_for(int isa);

/// W row (Q4_0 blocks) · activations (Q8_0): Σ_b d_w[b] · xs[b] · Σ_i (nibble_i − 8) · xq_i.
/// xsum[b] is Σ_i xq_i of block b (made by st_quantize_q8_0; fast kernels use it).
float st_dot_q4_0(const void *row, const float *xs, const int8_t *xq, const int32_t *xsum, int blocks);
/// W row (Q8_0 blocks) · activations (Q8_0).
float st_dot_q8_0(const void *row, const float *xs, const int8_t *xq, const int32_t *xsum, int blocks);
/// One row against several activation vectors: out[t * out_stride] = row · x_t.
void st_dot_q4_0_tokens(const void *row, const float *xs, const int8_t *xq, const int32_t *xsum, int blocks,
                        int tokens, float *out, int out_stride);
void st_dot_q8_0_tokens(const void *row, const float *xs, const int8_t *xq, const int32_t *xsum, int blocks,
                        int tokens, float *out, int out_stride);
/// Float rows · float32 vector.
float st_dot_f32(const float *row, const float *x, int n);
float st_dot_bf16(const uint16_t *row, const float *x, int n);
float st_dot_f16(const uint16_t *row, const float *x, int n);

/// y += a · row, for each dtype (the neuron-major down matrices).
void st_axpy_q4_0(const void *row, float a, float *y, int n);
void st_axpy_q8_0(const void *row, float a, float *y, int n);
void st_axpy_f32(const float *row, float a, float *y, int n);
void st_axpy_bf16(const uint16_t *row, float a, float *y, int n);
void st_axpy_f16(const uint16_t *row, float a, float *y, int n);

/// Quantises n floats (n a multiple of 32) to Q8_0 activations: d = amax/127 (float32),
/// q = round-half-away(x/d), sums[b] = Σ q of block b.
void st_quantize_q8_0(const float *x, float *scales, int8_t *q, int32_t *sums, int n);

/// Rows first..<last of a Q4_0 (or Q8_0, `q8` != 0) matrix (row_bytes apart) against `tokens`
/// activation vectors: out[t * out_stride + r]. One call per worker slice, so the per-row work
/// has no call overhead beyond the kernel's.
void st_matmul_quantized(int q8, const void *rows, int row_bytes, int first, int last, const float *xs, const int8_t *xq,
                         const int32_t *xsum, int blocks, int tokens, float *out, int out_stride);

/// One token through neurons first..<last of a Q4_0 ReGLU expert (gate, up, down all neuron-major,
/// row_bytes apart): gate for every neuron, up and down only where gate > 0, adding
/// weight · relu(gate)·up · down_j to out (hidden floats). `scratch` holds 2·(last − first) floats.
void st_expert_q4_0(const void *gate, const void *up, const void *down, int row_bytes, int first, int last,
                    const float *xs, const int8_t *xq, const int32_t *xsum, int blocks, float weight, float *out,
                    float *scratch);

/// Groups first_group..<last_group of a matrix in the row_major_x8 layout (specs/FORMAT.md)
/// against `tokens` activation vectors: out[t * out_stride + r] for rows r of those groups.
void st_matmul_q4_0_x8(const void *packed, int blocks, int first_group, int last_group, const float *xs, const int8_t *xq,
                       const int32_t *xsum, int tokens, float *out, int out_stride);

/// The same with gate in the row_major_x8 layout (first and last multiples of 8), and up either
/// row_major_x8 too (`xr` NULL: a group of eight neurons whose gates are all ≤ 0 skips its up
/// rows) or row_major_b8 (`xr` the activations interleaved for it: up rows of active neurons only).
/// `next_bytes` at `next` (NULL for none), the caller's next gate rows, are fetched into L2 while
/// the down rows are added.
void st_expert_q4_0_x8(const void *gate, const void *up, const void *down, int row_bytes, int first, int last,
                       const float *xs, const int8_t *xq, const int8_t *xr, const int32_t *xsum, int blocks, float weight,
                       float *out, float *scratch, const void *next, int next_bytes);

/// Rows first..<last of a Q4_0 matrix in the row_major_b8 layout against `tokens` interleaved
/// activation vectors: out[t * out_stride + r], for t = which[0..<tokens] in any order (`which`
/// NULL: 0..<tokens). A listed vector gets the value the whole batch gives it.
void st_matmul_q4_0_b8(const void *rows, int row_bytes, int first, int last, const float *xs, const int8_t *xr, const int32_t *xsum,
                       int blocks, int tokens, const int32_t *which, float *out, int out_stride);

/// Q8_0 activation values (blocks a multiple of 8) in the order the row_major_b8 kernels read:
/// per group of eight blocks, vector c (0..7) holds in lane k the four values of block k that
/// meet chunk c % 4's low (c < 4) or high nibbles.
void st_interleave_q8_0_b8(const int8_t *xq, int8_t *xr, int blocks);

/// y += Σ coefficients[a] · (row rows[a] of the Q4_0 matrix at base), for `count` rows.
void st_axpy_rows_q4_0(const void *base, int row_bytes, const int *rows, const float *coefficients, int count, float *y, int n);

/// Two tokens' down rows at once: y0 += Σ c0[a] · row rows0[a] (n0 rows) and y1 likewise, each
/// row list ascending; the rows both lists hold go through the two-output kernel (each unpacked
/// once for both), the others through the one-output kernel. On the AVX2 tier the two-output
/// kernel works in 16-bit integers where n is a multiple of 256: each c · (block scale) is rounded
/// to 1/32767 of the largest such product at that block among up to 64 rows at a time. `merged`,
/// `m0` and `m1` are scratch for n0 + n1 entries.
void st_axpy_rows_q4_0_pair(const void *base, int row_bytes, const int *rows0, const float *c0, int n0, const int *rows1,
                            const float *c1, int n1, float *y0, float *y1, int n, int *merged, float *m0, float *m1);

/// KV cache element types: float32, float16 (round to nearest even), and ggml's q8_0 blocks (a
/// float16 scale d = amax / 127 and 32 int8s round(x / d) per block of 32 values).
enum { ST_KV_F32 = 0, ST_KV_F16 = 1, ST_KV_Q8_0 = 2 };

/// The most queries (tokens × heads) one attend call of the table takes; st_attend splits more.
#define ST_ATTEND_MAX_QUERIES 256
/// Tiles of at most this many queries (and at least two tokens) are computed as small matrix
/// products where a tier has that form (AVX-512); a caller that wants it keeps tiles this small.
#define ST_TILE_QUERIES 128

/// Bytes one cached key or value row of `head_dim` values takes as `type` (0: that type cannot
/// hold such a row; q8_0 needs head_dim a multiple of 32).
int st_kv_row_bytes(int type, int head_dim);
/// Stores `head_dim` floats as one row of `type` (the same bits on every tier).
void st_kv_store(int type, const float *x, void *row, int head_dim);
/// A stored row's values as floats.
void st_kv_load(int type, const void *row, float *x, int head_dim);

/// The table's attend, with any number of tokens (split into tiles of at most
/// ST_ATTEND_MAX_QUERIES queries).
void st_attend(const float *queries, int query_stride, int tokens, int heads, const void *keys, const void *values, int type,
               int capacity, int row_bytes, int position, int window, int head_dim, float scale, float *outs, int out_stride);

/// y[i] += rows[k · stride + i] for k = 0, 1, …, count − 1 in that order (the same sums, in the
/// same order, as adding the rows one after another).
void st_add_rows(float *y, const float *rows, int count, int stride, int n);

/// out[i] = weight[i] · (x[i] · r), r = 1 / √(Σx² / n + eps) with Σx² in double; returns r.
float st_rms_norm(const float *x, const float *weight, double eps, float *out, int n);

/// Asks the cache to fetch `bytes` bytes at `p` (rows the next loop iteration will read).
void st_prefetch(const void *p, int bytes);

#endif
