#!/usr/bin/env python3
"""Writes Tests/Fuzz/Seeds: a valid micro SmallThinker checkpoint (hidden 32, one layer, two
experts, vocabulary 64, two shards) that the checkpoint target fuzzes one file of at a time, and
the seed corpora. Run by fuzz.sh --seeds after a change to a format; the output is checked in.

Needs numpy and the built stconvert (for the package and GGUF seeds)."""
import json, os, shutil, struct, subprocess, sys
import numpy as np

root = os.path.dirname(os.path.abspath(__file__))
seeds = os.path.join(root, "Seeds")
stconvert = sys.argv[1] if len(sys.argv) > 1 else os.path.join(root, "../../.build/debug/stconvert")
# Seeds/regressions (inputs that once failed, one folder per target) are kept.
for part in ("micro-checkpoint", "corpus"):
    shutil.rmtree(os.path.join(seeds, part), ignore_errors=True)
ck = os.path.join(seeds, "micro-checkpoint")
os.makedirs(ck)

H, HEAD, HEADS, KV, FFN, E, K, V = 32, 16, 2, 1, 32, 2, 1, 64
config = {
    "architectures": ["SmallThinkerForCausalLM"], "model_type": "smallthinker", "bos_token_id": 1,
    "eos_token_id": [2], "head_dim": HEAD, "hidden_size": H, "max_position_embeddings": 64,
    "moe_ffn_hidden_size": FFN, "moe_num_active_primary_experts": K, "moe_num_primary_experts": E,
    "moe_primary_router_apply_softmax": False, "norm_topk_prob": True, "num_attention_heads": HEADS,
    "num_hidden_layers": 1, "num_key_value_heads": KV, "rms_norm_eps": 1e-6, "rope_layout": [1],
    "rope_scaling": None, "rope_theta": 10000.0, "sliding_window_size": 16, "sliding_window_layout": [1],
    "tie_word_embeddings": True, "torch_dtype": "bfloat16", "vocab_size": V,
}
rng = np.random.default_rng(7)
def bf16(shape, scale=0.1, mean=0.0):
    a = (rng.standard_normal(shape).astype(np.float32) * scale + mean).astype(np.float32)
    return (a.view(np.uint32) >> 16).astype(np.uint16)
p = "model.layers.0."
tensors = {
    "model.embed_tokens.weight": bf16((V, H)), "model.norm.weight": bf16((H,), mean=1.0),
    p + "input_layernorm.weight": bf16((H,), mean=1.0), p + "post_attention_layernorm.weight": bf16((H,), mean=1.0),
    p + "self_attn.q_proj.weight": bf16((HEADS * HEAD, H)), p + "self_attn.k_proj.weight": bf16((KV * HEAD, H)),
    p + "self_attn.v_proj.weight": bf16((KV * HEAD, H)), p + "self_attn.o_proj.weight": bf16((H, HEADS * HEAD)),
    p + "block_sparse_moe.primary_router.weight": bf16((E, H)),
}
for e in range(E):
    for w, shape in (("gate", (FFN, H)), ("up", (FFN, H)), ("down", (H, FFN))):
        tensors[f"{p}block_sparse_moe.experts.{e}.{w}.weight"] = bf16(shape)
names = sorted(tensors)
shards = {1: names[: len(names) // 2], 2: names[len(names) // 2 :]}
weight_map = {}
for n, part in shards.items():
    file = f"model-0000{n}-of-00002.safetensors"
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name in part:
        raw = tensors[name].tobytes()
        header[name] = {"dtype": "BF16", "shape": list(tensors[name].shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw); offset += len(raw); weight_map[name] = file
    text = json.dumps(header).encode()
    with open(os.path.join(ck, file), "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + b"".join(blobs))
with open(os.path.join(ck, "config.json"), "w") as f:
    json.dump(config, f, indent=1)
with open(os.path.join(ck, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {"total_size": sum(t.nbytes for t in tensors.values())}, "weight_map": weight_map}, f, indent=1)

def corpus(target, name, data):
    d = os.path.join(seeds, "corpus", target); os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f: f.write(data)
def read(path):
    with open(path, "rb") as f: return f.read()

for i, name in enumerate(["config.json", "model.safetensors.index.json", "model-00001-of-00002.safetensors"]):
    corpus("checkpoint", name, bytes([i]) + read(os.path.join(ck, name)))
for name in ["config.json", "model.safetensors.index.json"]:
    corpus("json", name, read(os.path.join(ck, name)))
corpus("json", "escapes.json", '{"a":[1,-2.5e-3,true,false,null],"s":"\\u00e9\\ud83d\\ude00\\n\\"x\\""}'.encode())
fixtures = os.path.join(root, "..", "Fixtures")
corpus("tokenizer", "tiny-tokenizer.json", read(os.path.join(fixtures, "tiny-tokenizer", "tokenizer.json")))
corpus("tokenizer", "text.txt", "Hello, world! 123 <|im_start|>user\nhéllo 日本語 \t\r\n  spaces".encode())
# strun serve's requests: the first byte picks the endpoint (0 chat, 1 completions, 2 /tokenize, 3 /detokenize).
corpus("request", "chat.json", b"\x00" + json.dumps({
    "model": "example", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
                                     {"role": "assistant", "content": None}, {"role": "user", "content": "héllo <|im_end|>"}],
    "temperature": 0.7, "top_p": 0.9, "top_k": 20, "min_p": 0.05, "seed": 3, "max_tokens": 64, "stop": ["\n\n", "User:"],
    "stream": True, "stream_options": {"include_usage": True}, "logprobs": True, "top_logprobs": 2,
    "frequency_penalty": 0.5, "presence_penalty": 0.1, "logit_bias": {"15": -100}}).encode())
corpus("request", "completion.json", b"\x01" + json.dumps({"prompt": [[1, 2, 3]], "max_tokens": 5, "logprobs": 1, "stop": "x"}).encode())
corpus("request", "completion-text.json", b"\x01" + json.dumps({"prompt": "And it came to pass", "echo": False, "n": 1}).encode())
corpus("request", "tokenize.json", b"\x02" + json.dumps({"content": "Hello, world!", "with_pieces": True}).encode())
corpus("request", "detokenize.json", b"\x03" + json.dumps({"tokens": [9707, 11, 1879, 0]}).encode())
pkg, gguf = os.path.join(seeds, "micro.stpk"), os.path.join(seeds, "micro.gguf")
for args in ([ck, "-o", pkg], [pkg, "-o", pkg + ".q4_0", "--type", "q4_0"], [pkg, "-o", gguf, "--force-layout", "--alignment", "32"]):
    subprocess.run([stconvert if "--type" not in args else stconvert.replace("stconvert", "stquant")] + args + ["-q"], check=True)
corpus("package", "micro-bf16.stpk", read(pkg)); corpus("package", "micro-q4_0.stpk", read(pkg + ".q4_0"))
corpus("gguf", "micro.gguf", read(gguf))
for path in (pkg, pkg + ".q4_0", gguf): os.remove(path)
for d in sorted(os.listdir(os.path.join(seeds, "corpus"))):
    files = os.listdir(os.path.join(seeds, "corpus", d))
    print(d, len(files), "seeds,", sum(os.path.getsize(os.path.join(seeds, "corpus", d, f)) for f in files), "bytes")
