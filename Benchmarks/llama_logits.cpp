// llama.cpp's logits for a token sequence, one token at a time with its KV cache (as
// `strun logits` computes them), written as raw little-endian float32 [tokens, vocab]:
//
//   llama_logits MODEL.gguf THREADS "1,2,3" OUT.f32
//
// Built by Benchmarks/gguf_llama.sh against the llama.cpp it builds; never part of the tests.
#include "llama.h"

#include <cstdio>
#include <cstdlib>
#include <sstream>
#include <string>
#include <vector>

int main(int argc, char **argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: llama_logits MODEL.gguf THREADS IDS OUT.f32\n");
        return 2;
    }
    std::vector<llama_token> tokens;
    std::stringstream ids(argv[3]);
    for (std::string id; std::getline(ids, id, ',');) tokens.push_back((llama_token)std::stol(id));
    llama_backend_init();
    llama_model_params mp = llama_model_default_params();
    llama_model *model = llama_model_load_from_file(argv[1], mp);
    if (!model) { fprintf(stderr, "cannot load %s\n", argv[1]); return 1; }
    llama_context_params cp = llama_context_default_params();
    cp.n_ctx = (uint32_t)tokens.size() + 16;
    cp.n_threads = cp.n_threads_batch = atoi(argv[2]);
    // Keys and values in float32, as strun keeps them (llama.cpp's default is f16).
    cp.type_k = GGML_TYPE_F32;
    cp.type_v = GGML_TYPE_F32;
    llama_context *ctx = llama_init_from_model(model, cp);
    if (!ctx) { fprintf(stderr, "cannot make a context\n"); return 1; }
    const int vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));
    FILE *out = fopen(argv[4], "wb");
    for (llama_token &t : tokens) {
        if (llama_decode(ctx, llama_batch_get_one(&t, 1)) != 0) { fprintf(stderr, "decode failed\n"); return 1; }
        fwrite(llama_get_logits_ith(ctx, -1), sizeof(float), (size_t)vocab, out);
    }
    fclose(out);
    llama_free(ctx);
    llama_model_free(model);
    return 0;
}
