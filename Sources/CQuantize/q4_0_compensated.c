// Q4_0 with error feedback (GPTQ's order of work, on ggml's blocks): see cquantize.h.
#include "cquantize.h"
#include "q4_0_rule.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

// L lower triangular with L Lᵀ = A (n × n, row-major; l zeroed by the caller). Returns 0, or −1
// when A is not positive definite.
static int cholesky(const double *a, int64_t n, double *l) {
    for (int64_t j = 0; j < n; j++) {
        double s = a[j * n + j];
        for (int64_t k = 0; k < j; k++) s -= l[j * n + k] * l[j * n + k];
        if (!(s > 0)) return -1;
        const double d = sqrt(s);
        l[j * n + j] = d;
        for (int64_t i = j + 1; i < n; i++) {
            double t = a[i * n + j];
            for (int64_t k = 0; k < j; k++) t -= l[i * n + k] * l[j * n + k];
            l[i * n + j] = t / d;
        }
    }
    return 0;
}

int st_gptq_factor(const double *h, int64_t n, double *u) {
    // L Lᵀ = H; H⁻¹ = L⁻ᵀ L⁻¹; M Mᵀ = H⁻¹; U = Mᵀ (upper, Uᵀ U = H⁻¹).
    const size_t size = (size_t)(n * n);
    double *l = calloc(size, sizeof(double)), *inverse = calloc(size, sizeof(double)), *columns = calloc(size, sizeof(double));
    int status = l && inverse && columns ? cholesky(h, n, l) : -1;
    if (status == 0) {
        // Column c of L⁻¹ by forward substitution, kept as row c of `columns`: columns[c][r] = (L⁻¹)[r][c].
        for (int64_t c = 0; c < n; c++) {
            for (int64_t r = c; r < n; r++) {
                double t = r == c ? 1.0 : 0.0;
                for (int64_t k = c; k < r; k++) t -= l[r * n + k] * columns[c * n + k];
                columns[c * n + r] = t / l[r * n + r];
            }
        }
        // H⁻¹[i][j] = Σ_r (L⁻¹)[r][i] (L⁻¹)[r][j], over r ≥ max(i, j).
        for (int64_t i = 0; i < n; i++) {
            for (int64_t j = i; j < n; j++) {
                double t = 0;
                for (int64_t r = j; r < n; r++) t += columns[i * n + r] * columns[j * n + r];
                inverse[i * n + j] = inverse[j * n + i] = t;
            }
        }
        memset(l, 0, size * sizeof(double));
        status = cholesky(inverse, n, l);
        for (int64_t i = 0; i < n && status == 0; i++) {
            for (int64_t j = 0; j < n; j++) u[i * n + j] = l[j * n + i];
        }
    }
    free(l);
    free(inverse);
    free(columns);
    return status;
}

void st_quantize_q4_0_compensated(const float *x, int64_t rows, int64_t n, const double *u, uint8_t *out) {
#pragma clang fp contract(off)
    double *w = malloc((size_t)n * sizeof(double));
    if (!w) abort();
    for (int64_t r = 0; r < rows; r++) {
        for (int64_t j = 0; j < n; j++) w[j] = x[r * n + j];
        for (int64_t b = 0; b < n / 32; b++) {
            uint8_t *block = out + (r * (n / 32) + b) * 18;
            // The reference's scale from the block's values as the earlier errors left them.
            float v[32];
            for (int j = 0; j < 32; j++) v[j] = (float)w[b * 32 + j];
            const float d = st_q4_0_scale(v);
            const float id = d != 0 ? 1.0f / d : 0.0f;
            const _Float16 h = (_Float16)d;
            memcpy(block, &h, 2);
            const double scale = (double)(float)h;
            int8_t q[32];
            for (int j = 0; j < 32; j++) {
                const int64_t c = b * 32 + j;
                // Rounded as the reference rounds (the same byte when nothing was carried here),
                // clamped before the conversion when a carried error took the value past the
                // block's largest (where the byte conversion would wrap).
                const float t = (float)w[c] * id + 8.5f;
                const int8_t k = t >= 16.0f ? 15 : t < 0.0f ? 0 : st_low_byte_like_x86(t);
                q[j] = k;
                const double error = (w[c] - scale * (k - 8)) / u[c * n + c];
                const double *row = u + c * n;
                for (int64_t i = c + 1; i < n; i++) w[i] -= error * row[i];
            }
            for (int j = 0; j < 16; j++) block[2 + j] = (uint8_t)((uint8_t)q[j] | (uint8_t)((uint8_t)q[j + 16] << 4));
        }
    }
    free(w);
}
