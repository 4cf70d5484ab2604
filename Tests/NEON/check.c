// Every NEON kernel (and its SDOT form, where the CPU has the extension) against the portable
// one on random data and awkward lengths, the way KernelTests does for the x86 tiers: byte-exact
// for activation quantisation, within float rounding (1e-5 relative, 1e-5 absolute, as
// KernelTests) for everything that sums floats. Built for aarch64 and run under qemu-aarch64 by
// run.sh; also builds and runs natively on an aarch64 machine. Exits non-zero on any mismatch.
#include "../../Sources/CKernels/internal.h"

#include <stdio.h>
#include <stdlib.h>

static uint64_t state = 0x9E3779B97F4A7C15ull;
static uint32_t next(void) {
    state ^= state << 13, state ^= state >> 7, state ^= state << 17;
    return (uint32_t)(state >> 16);
}
static float uniform(float lo, float hi) { return lo + (hi - lo) * (float)(next() & 0xFFFFFF) / 16777216.0f; }
static uint16_t fp16_of(float f) {  // normal float16 values only (the generator's range)
    uint32_t b;
    memcpy(&b, &f, 4);
    const uint32_t sign = (b >> 16) & 0x8000, exponent = ((b >> 23) & 0xFF) - 127 + 15, mantissa = (b >> 13) & 0x3FF;
    return (uint16_t)(sign | (exponent << 10) | mantissa);
}

static int failures = 0, checks = 0;
static void close_enough(const char *what, const char *tier, int size, float fast, float reference) {
    checks++;
    if (!(fabsf(fast - reference) <= 1e-5f * fabsf(reference) + 1e-5f)) {
        if (failures++ < 20) printf("MISMATCH %s (%s) size %d: %.9g vs portable %.9g\n", what, tier, size, fast, reference);
    }
}
static void exactly(const char *what, const char *tier, int size, int same) {
    checks++;
    if (!same && failures++ < 20) printf("MISMATCH %s (%s) size %d: not the portable bytes\n", what, tier, size);
}

// Random Q4_0 / Q8_0 rows and Q8_0 activations (made by the portable quantiser from floats).
static void q4_0_rows(st_block_q4_0 *w, int count) {
    for (int i = 0; i < count; i++) {
        w[i].d = fp16_of(uniform(0.002f, 0.05f) * (next() & 1 ? 1 : -1));
        for (int j = 0; j < 16; j++) w[i].qs[j] = (uint8_t)next();
    }
}
static void q8_0_rows(st_block_q8_0 *w, int count) {
    for (int i = 0; i < count; i++) {
        w[i].d = fp16_of(uniform(0.0005f, 0.01f));
        for (int j = 0; j < 32; j++) w[i].qs[j] = (int8_t)next();
    }
}
static void activations(int blocks, float *xs, int8_t *xq, int32_t *xsum) {
    float *x = malloc(sizeof(float) * blocks * ST_QK);
    for (int i = 0; i < blocks * ST_QK; i++) x[i] = uniform(-1, 1);
    st_quantize_q8_0_portable(x, xs, xq, xsum, blocks * ST_QK);
    free(x);
}

static void check_tier(const char *tier, const st_kernel_table *k) {
    const st_kernel_table *p = st_kernels_for(ST_ISA_PORTABLE);
    enum { MAXB = 40, MAXN = MAXB * ST_QK, MAXT = 5 };
    static st_block_q4_0 w4[4 * MAXB];
    static st_block_q8_0 w8[MAXB];
    static st_octet_q4_0 oct[MAXB];
    static float xs[MAXT * MAXB], xf[MAXN], y0[MAXN], y1[MAXN], out0[MAXT * 16], out1[MAXT * 16];
    static int8_t xq[MAXT * MAXN];
    static int32_t xsum[MAXT * MAXB];
    static uint16_t h[MAXN];
    const int block_counts[] = {1, 2, 3, 7, 8, 9, 16, 33, 40};
    for (unsigned bi = 0; bi < sizeof block_counts / sizeof *block_counts; bi++) {
        const int blocks = block_counts[bi], n = blocks * ST_QK;
        q4_0_rows(w4, 4 * blocks);
        q8_0_rows(w8, blocks);
        for (int t = 0; t < MAXT; t++) activations(blocks, xs + t * blocks, xq + t * n, xsum + t * blocks);
        close_enough("dot_q4_0", tier, blocks, k->dot_q4_0(w4, xs, xq, xsum, blocks), p->dot_q4_0(w4, xs, xq, xsum, blocks));
        close_enough("dot_q8_0", tier, blocks, k->dot_q8_0(w8, xs, xq, xsum, blocks), p->dot_q8_0(w8, xs, xq, xsum, blocks));
        for (int tokens = 1; tokens <= MAXT; tokens += 2) {
            k->dot_q4_0_tokens(w4, xs, xq, xsum, blocks, tokens, out0, 3);
            p->dot_q4_0_tokens(w4, xs, xq, xsum, blocks, tokens, out1, 3);
            for (int t = 0; t < tokens; t++) close_enough("dot_q4_0_tokens", tier, blocks, out0[3 * t], out1[3 * t]);
            k->dot_q8_0_tokens(w8, xs, xq, xsum, blocks, tokens, out0, 3);
            p->dot_q8_0_tokens(w8, xs, xq, xsum, blocks, tokens, out1, 3);
            for (int t = 0; t < tokens; t++) close_enough("dot_q8_0_tokens", tier, blocks, out0[3 * t], out1[3 * t]);
            // One x8 group: random octets are as good as arranged rows to the kernels.
            for (int b = 0; b < blocks; b++) {
                for (int i = 0; i < 8; i++) oct[b].d[i] = fp16_of(uniform(0.002f, 0.05f));
                for (int c = 0; c < 4; c++)
                    for (int j = 0; j < 32; j++) oct[b].qs[c][j] = (uint8_t)next();
            }
            k->dot_q4_0_x8(oct, xs, xq, xsum, blocks, tokens, out0, 9);
            p->dot_q4_0_x8(oct, xs, xq, xsum, blocks, tokens, out1, 9);
            for (int t = 0; t < tokens; t++)
                for (int i = 0; i < 8; i++) close_enough("dot_q4_0_x8", tier, blocks, out0[9 * t + i], out1[9 * t + i]);
            if (blocks % 8 == 0) {  // b8 rows: blocks / 8 octets each; two rows, octets apart
                for (int rows = 1; rows <= 2; rows++) {
                    k->dot_q4_0_b8(oct, (blocks / 8) * (int)sizeof(st_octet_q4_0), rows, xs, xq, xsum, blocks, tokens, NULL, out0, 2);
                    p->dot_q4_0_b8(oct, (blocks / 8) * (int)sizeof(st_octet_q4_0), rows, xs, xq, xsum, blocks, tokens, NULL, out1, 2);
                    for (int t = 0; t < tokens; t++)
                        for (int r = 0; r < rows; r++) close_enough("dot_q4_0_b8", tier, blocks, out0[2 * t + r], out1[2 * t + r]);
                }
                // One row against the first token, asking for the second row meanwhile.
                {
                    const int row_bytes = (blocks / 8) * (int)sizeof(st_octet_q4_0);
                    const float v0 = k->dot_q4_0_b8_ahead(oct, (const uint8_t *)oct + row_bytes, xs, xq, xsum, blocks);
                    const float v1 = p->dot_q4_0_b8_ahead(oct, NULL, xs, xq, xsum, blocks);
                    close_enough("dot_q4_0_b8_ahead", tier, blocks, v0, v1);
                    k->dot_q4_0_b8(oct, row_bytes, 1, xs, xq, xsum, blocks, 1, NULL, out0, 1);
                    checks++;
                    if (out0[0] != v0 && failures++ < 20)
                        printf("MISMATCH dot_q4_0_b8_ahead (%s) size %d: not the plain kernel's\n", tier, blocks);
                }
                // A list of tokens (from the last down, every other one): those tokens only.
                int32_t which[MAXT];
                int listed = 0;
                for (int t = tokens - 1; t >= 0; t -= 2) which[listed++] = t;
                for (int rows = 1; rows <= 2; rows++) {
                    const int row_bytes = (blocks / 8) * (int)sizeof(st_octet_q4_0);
                    k->dot_q4_0_b8(oct, row_bytes, rows, xs, xq, xsum, blocks, listed, which, out0, 2);
                    p->dot_q4_0_b8(oct, row_bytes, rows, xs, xq, xsum, blocks, listed, which, out1, 2);
                    for (int i = 0; i < listed; i++)
                        for (int r = 0; r < rows; r++)
                            close_enough("dot_q4_0_b8 listed", tier, blocks, out0[2 * which[i] + r], out1[2 * which[i] + r]);
                }
            }
        }
        // Axpys of quantised rows, and lists of rows (one and two outputs).
        for (int i = 0; i < n; i++) y0[i] = y1[i] = uniform(-1, 1);
        const float a = uniform(-2, 2);
        k->axpy_q4_0(w4, a, y0, n), p->axpy_q4_0(w4, a, y1, n);
        for (int i = 0; i < n; i++) close_enough("axpy_q4_0", tier, n, y0[i], y1[i]);
        k->axpy_q8_0(w8, a, y0, n), p->axpy_q8_0(w8, a, y1, n);
        for (int i = 0; i < n; i++) close_enough("axpy_q8_0", tier, n, y0[i], y1[i]);
        int rows[6] = {3, 0, 2, 2, 1, 3};
        float c0[6], c1[6], z0[MAXN], z1[MAXN];
        for (int r = 0; r < 6; r++) c0[r] = uniform(-1, 1), c1[r] = r == 2 ? 0 : uniform(-1, 1);
        const int row_bytes = blocks * (int)sizeof(st_block_q4_0);
        k->axpy_rows_q4_0(w4, row_bytes, rows, c0, 6, y0, n, w8, 512);
        p->axpy_rows_q4_0(w4, row_bytes, rows, c0, 6, y1, n, w8, 512);
        for (int i = 0; i < n; i++) close_enough("axpy_rows_q4_0", tier, n, y0[i], y1[i]);
        for (int i = 0; i < n; i++) z0[i] = z1[i] = uniform(-1, 1);
        k->axpy_rows2_q4_0(w4, row_bytes, rows, c0, c1, 6, y0, z0, n);
        p->axpy_rows2_q4_0(w4, row_bytes, rows, c0, c1, 6, y1, z1, n);
        for (int i = 0; i < n; i++) close_enough("axpy_rows2_q4_0 y0", tier, n, y0[i], y1[i]);
        for (int i = 0; i < n; i++) close_enough("axpy_rows2_q4_0 y1", tier, n, z0[i], z1[i]);
        // Quantisation: the same bytes, scales and sums; every eighth block has exact ties.
        for (int i = 0; i < n; i++) xf[i] = uniform(-3, 3);
        for (int b = 0; b < blocks; b += 8) {
            for (int j = 0; j < ST_QK; j++) xf[b * ST_QK + j] = (float)((int)(next() % 253) - 126) * 0.5f;
            xf[b * ST_QK] = 127;  // d = 1: halves are ties
        }
        float s0[MAXB], s1[MAXB];
        int8_t q0[MAXN], q1[MAXN];
        int32_t m0[MAXB], m1[MAXB];
        k->quantize_q8_0(xf, s0, q0, m0, n), p->quantize_q8_0(xf, s1, q1, m1, n);
        exactly("quantize_q8_0", tier, n,
                !memcmp(s0, s1, sizeof(float) * blocks) && !memcmp(q0, q1, n) && !memcmp(m0, m1, sizeof(int32_t) * blocks));
    }
    // Float rows of every length, tails included.
    for (int n = 1; n <= 130; n += (n < 20 ? 1 : 11)) {
        for (int i = 0; i < n; i++) xf[i] = uniform(-1, 1), y0[i] = y1[i] = uniform(-1, 1);
        for (int i = 0; i < n; i++) h[i] = fp16_of(uniform(0.01f, 1.0f) * (next() & 1 ? 1 : -1));
        close_enough("dot_f32", tier, n, k->dot_f32(xf, y0, n), p->dot_f32(xf, y0, n));
        close_enough("dot_f16", tier, n, k->dot_f16(h, y0, n), p->dot_f16(h, y0, n));
        close_enough("dot_bf16", tier, n, k->dot_bf16(h, y0, n), p->dot_bf16(h, y0, n));
        const float a = uniform(-2, 2);
        k->axpy_f32(xf, a, y0, n), p->axpy_f32(xf, a, y1, n);
        for (int i = 0; i < n; i++) close_enough("axpy_f32", tier, n, y0[i], y1[i]);
        k->axpy_f16(h, a, y0, n), p->axpy_f16(h, a, y1, n);
        for (int i = 0; i < n; i++) close_enough("axpy_f16", tier, n, y0[i], y1[i]);
        k->axpy_bf16(h, a, y0, n), p->axpy_bf16(h, a, y1, n);
        for (int i = 0; i < n; i++) close_enough("axpy_bf16", tier, n, y0[i], y1[i]);
    }
    // Attention over a ring of 12 slots for tiles of 1 to 5 tokens, with and without a window
    // that wraps, for several head shapes and every KV cache type.
    const int dims[] = {4, 6, 16, 32, 64};
    for (unsigned di = 0; di < sizeof dims / sizeof *dims; di++) {
        for (int type = ST_KV_F32; type <= ST_KV_Q8_0; type++) {
            const int head_dim = dims[di], heads = 3, capacity = 12, row_bytes = st_kv_row_bytes(type, head_dim);
            if (!row_bytes) continue;
            const int stride = heads * head_dim + 2;
            float q[5 * (3 * 64 + 2)], row[64], o0[5 * (3 * 64 + 2)], o1[5 * (3 * 64 + 2)];
            unsigned char keys[12 * 256], values[12 * 256];
            for (int i = 0; i < 5 * stride; i++) q[i] = uniform(-2, 2);
            for (int slot = 0; slot < capacity; slot++) {
                for (int i = 0; i < head_dim; i++) row[i] = uniform(-2, 2);
                st_kv_store(type, row, keys + slot * row_bytes, head_dim);
                for (int i = 0; i < head_dim; i++) row[i] = uniform(-1, 1);
                st_kv_store(type, row, values + slot * row_bytes, head_dim);
            }
            for (int tokens = 1; tokens <= 5; tokens += 2) {
                for (int position = 0; position < 20; position += 6) {
                    for (int window = 0; window <= 7; window += 7) {
                        const int first = window && position - window + 1 > 0 ? position - window + 1 : 0;
                        if (position + tokens - first > capacity) continue;  // the ring holds every position the tile sees
                        k->attend(q, stride, tokens, heads, keys, values, type, capacity, row_bytes, position, window, head_dim, 0.25f, o0,
                                  stride);
                        p->attend(q, stride, tokens, heads, keys, values, type, capacity, row_bytes, position, window, head_dim, 0.25f, o1,
                                  stride);
                        for (int t = 0; t < tokens; t++) {
                            for (int i = 0; i < heads * head_dim; i++) {
                                close_enough("attend", tier, head_dim, o0[t * stride + i], o1[t * stride + i]);
                            }
                        }
                    }
                }
            }
        }
    }
}

int main(void) {
    const struct { int isa; const char *name; } tiers[] = {{ST_ISA_NEON, "neon"}, {ST_ISA_DOTPROD, "neon-dotprod"}};
    int ran = 0;
    for (int i = 0; i < 2; i++) {
        const st_kernel_table *k = st_kernels_for(tiers[i].isa);
        if (!k) {
            printf("%s: not on this CPU, skipped\n", tiers[i].name);
            continue;
        }
        const int before = failures, checked = checks;
        check_tier(tiers[i].name, k);
        printf("%s: %d checks against portable, %d mismatches\n", tiers[i].name, checks - checked, failures - before);
        ran++;
    }
    printf("detected: %d (3 neon, 4 neon-dotprod)\n", st_detect_isa());
    return failures || !ran ? 1 : 0;
}
