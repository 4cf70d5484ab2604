// Why expert down matrices stay neuron-major (and a GGUF import requantises them): y = down · a
// for one 4B-shaped Q4_0 expert (hidden 1536, ffn 768) with a fraction of its neurons active,
// neuron-major (add the active rows: st_axpy_rows_q4_0, what the runtime does) against
// hidden-major as GGUF stores it (every row's dot with the sparse activations in Q8_0), on every
// kernel tier this CPU has. Run by hand:
//
//   S=Sources; clang -O3 -I$S/CKernels/include -I$S/CKernels -I$S/CQuantize/include $S/CKernels/*.c \
//       $S/CQuantize/q4_0.c Benchmarks/down_layout_bench.c -o /tmp/down_layout_bench -lm && /tmp/down_layout_bench
#include "ckernels.h"
#include "cquantize.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec * 1e-9; }
int main(int argc, char **argv) {
    const int hidden = 1536, ffn = 768, reps = 4000;
    float *w = malloc(sizeof(float) * hidden * ffn);
    srand(1);
    for (int i = 0; i < hidden * ffn; i++) w[i] = (rand() / (float)RAND_MAX - 0.5f) * 0.05f;
    // neuron-major [ffn][hidden] and hidden-major [hidden][ffn], both Q4_0
    uint8_t *nm = malloc(ffn * hidden / 32 * 18), *hm = malloc(ffn * hidden / 32 * 18);
    float *t = malloc(sizeof(float) * hidden * ffn);
    for (int j = 0; j < ffn; j++) for (int i = 0; i < hidden; i++) t[i * ffn + j] = w[j * hidden + i];
    st_quantize_q4_0(w, (int64_t)hidden * ffn, nm, 0, 0, 0);
    st_quantize_q4_0(t, (int64_t)hidden * ffn, hm, 0, 0, 0);
    float *y = calloc(hidden, sizeof(float)), *a = calloc(ffn, sizeof(float)), *xs = malloc(sizeof(float) * ffn / 32);
    int8_t *xq = malloc(ffn); int32_t *xsum = malloc(sizeof(int32_t) * ffn / 32);
    int *rows = malloc(sizeof(int) * ffn); float *coef = malloc(sizeof(float) * ffn);
    const char *names[] = {"portable", "avx2", "avx512"};
    for (int isa = 0; isa <= st_detect_isa(); isa++) {
        st_kernels_select(isa);
        for (int pct = 10; pct <= 60; pct += 10) {
            int count = 0;
            memset(a, 0, sizeof(float) * ffn);
            for (int j = 0; j < ffn; j++) if (rand() % 100 < pct) { rows[count] = j; coef[count] = a[j] = 0.1f; count++; }
            double t0 = now();
            for (int r = 0; r < reps; r++) st_axpy_rows_q4_0(nm, hidden / 32 * 18, rows, coef, count, y, hidden);
            double t1 = now();
            for (int r = 0; r < reps; r++) {
                st_quantize_q8_0(a, xs, xq, xsum, ffn);
                st_matmul_quantized(0, hm, ffn / 32 * 18, 0, hidden, xs, xq, xsum, ffn / 32, 1, y, 1);
            }
            double t2 = now();
            printf("%-8s active %2d%%: neuron-major %.2f us, hidden-major %.2f us per expert (ratio %.2f)\n", names[isa], pct,
                   (t1 - t0) / reps * 1e6, (t2 - t1) / reps * 1e6, (t2 - t1) / (t1 - t0));
        }
    }
    return y[0] > 1e30;
}
