// Memory read bandwidth with T threads: each sums its share of a 1 GiB array of floats, best of 5.
// Built (with -ffast-math, so the sum vectorises and the loop is bound by memory, not by the
// latency of one add chain) and run by Benchmarks/compare_llama.sh; prints GB/s.
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

int main(int argc, char **argv) {
    const int threads = argc > 1 ? atoi(argv[1]) : 2;
    const size_t n = (size_t)1 << 28;  // 1 GiB of float
    float *a = aligned_alloc(64, n * sizeof(float));
    for (size_t i = 0; i < n; i++) a[i] = (float)(i & 7);
    double best = 0;
    volatile float sink = 0;
    for (int r = 0; r < 5; r++) {
        struct timespec t0, t1;
        clock_gettime(CLOCK_MONOTONIC, &t0);
        float total = 0;
#pragma omp parallel for num_threads(threads) reduction(+ : total)
        for (size_t i = 0; i < n; i++) total += a[i];
        clock_gettime(CLOCK_MONOTONIC, &t1);
        sink += total;
        const double s = (t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) * 1e-9;
        const double gbs = n * sizeof(float) / s / 1e9;
        if (gbs > best) best = gbs;
    }
    printf("%.2f\n", best);
    free(a);
    return 0;
}
