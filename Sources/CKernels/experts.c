// One token through a slice of a ReGLU expert's neurons, gate, up and down rows of each neuron
// side by side in the neuron-major bundle: gate for every neuron, up and down only where
// relu(gate) lets the neuron through (ReGLU sparsity: a neuron with gate ≤ 0 adds exactly
// nothing), then weight · Σ_j relu(gate_j)·up_j · down_j added to the output. Loops over the
// tier's kernels; the tier shows only through the table.
#include "internal.h"

void st_prefetch(const void *p, int bytes) { st_prefetch_l1(p, bytes); }

void st_expert_q4_0(const void *gate, const void *up, const void *down, int row_bytes, int first, int last,
                    const float *xs, const int8_t *xq, const int32_t *xsum, int blocks, float weight, float *out,
                    float *scratch) {
    const st_kernel_table *k = st_table();
    const uint8_t *g = gate, *u = up, *d = down;
    const int n = last - first;
    float *act = scratch;
    int *active = (int *)(scratch + n);
    int count = 0;
    for (int j = first; j < last; j++) {
        const float v = k->dot_q4_0(g + (size_t)j * row_bytes, xs, xq, xsum, blocks);
        if (v > 0) { act[count] = v; active[count] = j; count++; }
    }
    for (int a = 0; a < count; a++) {
        if (a + 2 < count) st_prefetch_l1(u + (size_t)active[a + 2] * row_bytes, row_bytes);
        act[a] *= k->dot_q4_0(u + (size_t)active[a] * row_bytes, xs, xq, xsum, blocks);
    }
    for (int a = 0; a < count; a++) act[a] *= weight;
    k->axpy_rows_q4_0(d, row_bytes, active, act, count, out, blocks * ST_QK, NULL, 0);
}

// The up rows of row_major_b8 experts are gathered UP_LAG gate groups behind the gate pass, and
// each row's read asks for the row UP_AHEAD active neurons further on, an octet per octet read.
// Asking for each whole row as its gate was found positive kept too few fetches in flight. On a
// 2-core Zen 5 with the AVX2 tier, decode's expert phase (4-layer 21B-width model) took 1.99
// instead of 2.13 ms per token (8 alternating runs, 1.03-1.19x each; AVX-512 tier 1.01-1.22x in
// 6), and a microbenchmark of the phase ran 1.06-1.23x as fast in ten rounds; asking for whole
// rows UP_AHEAD ahead gained less.
#define UP_LAG 3
#define UP_AHEAD 3

// act *= up row active[a] · x (row_major_b8), asking for row active[a + UP_AHEAD] (when there is
// one) meanwhile, and start fetching down row active[a].
static inline void up_b8_row(const st_kernel_table *k, const uint8_t *u, const uint8_t *d, int row_bytes, const int *active, int a,
                             int count, const float *xs, const int8_t *xr, const int32_t *xsum, int blocks, float *act) {
    const uint8_t *ahead = a + UP_AHEAD < count ? u + (size_t)active[a + UP_AHEAD] * row_bytes : NULL;
    act[a] *= k->dot_q4_0_b8_ahead(u + (size_t)active[a] * row_bytes, ahead, xs, xr, xsum, blocks);
    st_prefetch_l2(d + (size_t)active[a] * row_bytes, row_bytes);
}

void st_expert_q4_0_x8(const void *gate, const void *up, const void *down, int row_bytes, int first, int last,
                       const float *xs, const int8_t *xq, const int8_t *xr, const int32_t *xsum, int blocks, float weight,
                       float *out, float *scratch, const void *next, int next_bytes) {
    const st_kernel_table *k = st_table();
    const uint8_t *g = gate, *u = up, *d = down;
    const int n = last - first;
    float *act = scratch;
    int *active = (int *)(scratch + n);
    int count = 0;
    float gv[8], uv[8];
    int done = 0;  // active neurons whose up row has been read (xr)
    for (int r = first; r < last; r += 8) {
        k->dot_q4_0_x8(g + (size_t)r * row_bytes, xs, xq, xsum, blocks, 1, gv, 8);
        if (xr) {
            // Up rows one by one, UP_LAG groups behind the gate pass, while the next UP_AHEAD
            // active neurons are known; the first UP_AHEAD rows are asked for as found.
            for (int i = 0; i < 8; i++) {
                if (gv[i] > 0) {
                    if (count < UP_AHEAD) st_prefetch_l2(u + (size_t)(r + i) * row_bytes, row_bytes);
                    act[count] = gv[i];
                    active[count] = r + i;
                    count++;
                }
            }
            for (; done + UP_AHEAD < count && active[done] < r - 8 * UP_LAG; done++) {
                up_b8_row(k, u, d, row_bytes, active, done, count, xs, xr, xsum, blocks, act);
            }
            continue;
        }
        int any = 0;
        for (int i = 0; i < 8; i++) any |= gv[i] > 0;
        if (!any) continue;
        k->dot_q4_0_x8(u + (size_t)r * row_bytes, xs, xq, xsum, blocks, 1, uv, 8);
        for (int i = 0; i < 8; i++) {
            if (gv[i] > 0) {
                act[count] = gv[i] * uv[i];
                active[count] = r + i;
                count++;
                // Its down row will be read after this pass: start fetching it into L2 now,
                // while the next groups' gate and up rows stream (measured ~20% per expert).
                st_prefetch_l2(d + (size_t)(r + i) * row_bytes, row_bytes);
            }
        }
    }
    for (; xr && done < count; done++) up_b8_row(k, u, d, row_bytes, active, done, count, xs, xr, xsum, blocks, act);
    for (int a = 0; a < count; a++) act[a] *= weight;
    k->axpy_rows_q4_0(d, row_bytes, active, act, count, out, blocks * ST_QK, next, next_bytes);
}
