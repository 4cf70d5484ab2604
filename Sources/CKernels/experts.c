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

// How many gate groups the up rows of row_major_b8 experts trail behind.
#define UP_LAG 3

// act *= up row j · x (row_major_b8), and start fetching down row j.
static inline void up_b8_row(const st_kernel_table *k, const uint8_t *u, const uint8_t *d, int row_bytes, int j, const float *xs,
                             const int8_t *xr, const int32_t *xsum, int blocks, float *act) {
    float v;
    k->dot_q4_0_b8(u + (size_t)j * row_bytes, row_bytes, 1, xs, xr, xsum, blocks, 1, NULL, &v, 1);
    *act *= v;
    st_prefetch_l2(d + (size_t)j * row_bytes, row_bytes);
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
            // Up rows one by one, UP_LAG groups behind the gate pass: each active neuron's row
            // is asked for as its gate is found positive and read once the gate pass has moved
            // on, so the fetches overlap the gate stream.
            for (int i = 0; i < 8; i++) {
                if (gv[i] > 0) {
                    act[count] = gv[i];
                    active[count] = r + i;
                    count++;
                    st_prefetch_l2(u + (size_t)(r + i) * row_bytes, row_bytes);
                }
            }
            for (; done < count && active[done] < r - 8 * UP_LAG; done++) {
                up_b8_row(k, u, d, row_bytes, active[done], xs, xr, xsum, blocks, act + done);
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
    for (; xr && done < count; done++) up_b8_row(k, u, d, row_bytes, active[done], xs, xr, xsum, blocks, act + done);
    for (int a = 0; a < count; a++) act[a] *= weight;
    k->axpy_rows_q4_0(d, row_bytes, active, act, count, out, blocks * ST_QK, next, next_bytes);
}
