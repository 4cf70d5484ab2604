// llama.cpp's own Q4_0 quantiser (ggml-quants.c from the pinned llama-cpp-python sdist, compiled
// in whole by the test), for the tests that hold ours to it:
//
//     ggml_quantize IN OUT
//
// IN: int64 rows, int64 row_length, int64 weighted (0 or 1), rows·row_length float32 values,
// then (weighted) row_length float32 importances. OUT: the Q4_0 blocks quantize_q4_0 writes
// (with the importances as its quant_weights, or NULL). The ggml functions it does not need are
// stubbed below.
#include "ggml-quants.c"

void ggml_abort(const char *file, int line, const char *fmt, ...) {
    fprintf(stderr, "ggml_abort at %s:%d (%s)\n", file, line, fmt);
    abort();
}
size_t ggml_row_size(enum ggml_type type, int64_t ne) {
    if (type != GGML_TYPE_Q4_0) abort();
    return (size_t)(ne / 32 * 18);
}
size_t ggml_type_size(enum ggml_type type) { (void)type; abort(); }
const char *ggml_type_name(enum ggml_type type) { (void)type; return "?"; }

int main(int argc, char **argv) {
    if (argc != 3) return 2;
    FILE *in = fopen(argv[1], "rb");
    int64_t header[3];
    if (!in || fread(header, 8, 3, in) != 3) return 3;
    const int64_t rows = header[0], length = header[1];
    if (rows <= 0 || length <= 0 || length % 32 || rows * length > (1 << 26)) return 4;
    float *x = malloc(sizeof(float) * rows * length), *w = header[2] ? malloc(sizeof(float) * length) : NULL;
    if (fread(x, 4, rows * length, in) != (size_t)(rows * length)) return 5;
    if (w && fread(w, 4, length, in) != (size_t)length) return 6;
    fclose(in);
    uint8_t *out = malloc(rows * length / 32 * 18);
    quantize_q4_0(x, out, rows, length, w);
    FILE *o = fopen(argv[2], "wb");
    if (!o || fwrite(out, 1, rows * length / 32 * 18, o) != (size_t)(rows * length / 32 * 18)) return 7;
    return fclose(o) ? 8 : 0;
}
