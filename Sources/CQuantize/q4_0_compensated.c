// Q4_0 with error feedback (GPTQ's order of work, on ggml's blocks): see cquantize.h.
#include "cquantize.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

// The reference quantiser's float-to-byte conversion (q4_0.c), and its rounding of one value.
static inline int8_t low_byte_like_x86(float v) {
    const float t = (v != v || v >= 2147483648.0f || v < -2147483648.0f) ? 0.0f : v;
    return (int8_t)(int32_t)t;
}

int st_gptq_factor(const double *h, int64_t n, double *u) {
    // L Lᵀ = H (lower, in u's lower triangle as scratch), then H⁻¹ = L⁻ᵀ L⁻¹ in `inverse`, then
    // Uᵀ U = H⁻¹ with U upper.
    double *l = calloc((size_t)(n * n), sizeof(double)), *inverse = calloc((size_t)(n * n), sizeof(double));
    if (!l || !inverse) {
        free(l);
        free(inverse);
        return -1;
    }
    int status = 0;
    for (int64_t j = 0; j < n && status == 0; j++) {
        double s = h[j * n + j];
        for (int64_t k = 0; k < j; k++) s -= l[j * n + k] * l[j * n + k];
        if (!(s > 0)) {
            status = -1;
            break;
        }
        const double d = sqrt(s);
        l[j * n + j] = d;
        for (int64_t i = j + 1; i < n; i++) {
            double t = h[i * n + j];
            for (int64_t k = 0; k < j; k++) t -= l[i * n + k] * l[j * n + k];
            l[i * n + j] = t / d;
        }
    }
    if (status == 0) {
        // L⁻¹ column by column (lower), kept transposed in u as scratch: u[c][r] = (L⁻¹)[r][c].
        for (int64_t c = 0; c < n; c++) {
            for (int64_t r = c; r < n; r++) {
                double t = r == c ? 1.0 : 0.0;
                for (int64_t k = c; k < r; k++) t -= l[r * n + k] * u[c * n + k];
                u[c * n + r] = t / l[r * n + r];
            }
        }
        // H⁻¹[i][j] = Σ_r (L⁻¹)[r][i] (L⁻¹)[r][j], r ≥ max(i, j).
        for (int64_t i = 0; i < n; i++) {
            for (int64_t j = i; j < n; j++) {
                double t = 0;
                for (int64_t r = j; r < n; r++) t += u[i * n + r] * u[j * n + r];
                inverse[i * n + j] = inverse[j * n + i] = t;
            }
        }
        // Upper Cholesky: U[j][j] = √(A[j][j] − Σ_{k<j} U[k][j]²), U[j][i] = (A[j][i] − Σ_{k<j} U[k][j] U[k][i]) / U[j][j].
        memset(u, 0, (size_t)(n * n) * sizeof(double));
        for (int64_t j = 0; j < n && status == 0; j++) {
            double s = inverse[j * n + j];
            for (int64_t k = 0; k < j; k++) s -= u[k * n + j] * u[k * n + j];
            if (!(s > 0)) {
                status = -1;
                break;
            }
            const double d = sqrt(s);
            u[j * n + j] = d;
            for (int64_t i = j + 1; i < n; i++) {
                double t = inverse[j * n + i];
                for (int64_t k = 0; k < j; k++) t -= u[k * n + j] * u[k * n + i];
                u[j * n + i] = t / d;
            }
        }
    }
    free(l);
    free(inverse);
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
            float v[32], amax = 0, max = 0;
            for (int j = 0; j < 32; j++) v[j] = (float)w[b * 32 + j];
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
            const float d = max / -8;
            const float id = d != 0 ? 1.0f / d : 0.0f;
            const _Float16 h = (_Float16)d;
            memcpy(block, &h, 2);
            const double scale = (double)(float)h;
            int8_t q[32];
            for (int j = 0; j < 32; j++) {
                const int64_t c = b * 32 + j;
                // Rounded as the reference rounds (the same byte when nothing was carried here),
                // kept within the format when a carried error took the value past the block's largest.
                int8_t k = low_byte_like_x86((float)w[c] * id + 8.5f);
                k = k > 15 ? 15 : k < 0 ? 0 : k;
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
