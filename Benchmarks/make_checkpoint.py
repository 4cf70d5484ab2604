#!/usr/bin/env python3
"""Write a synthetic SmallThinker checkpoint in exact Hugging Face layout.

config.json, generation_config.json, sharded bf16 safetensors with model.safetensors.index.json,
and (with --tokenizer DIR) the tokenizer files. Weights are seeded random numbers scaled like a
trained model's; shards are written one tensor at a time, so memory stays small whatever the size.

    python3 Benchmarks/make_checkpoint.py --shape 4b OUT_DIR
    python3 Benchmarks/make_checkpoint.py --shape 21b --layers 8 OUT_DIR   # 21B widths, fewer layers
    python3 Benchmarks/make_checkpoint.py --shape 4b --skewed OUT_DIR      # a few hot experts per layer
    python3 Benchmarks/make_checkpoint.py --shape 21b --sizes              # bytes per layer count, no files

--sizes prints, for every layer count from 1 to the shape's (or --layers), "layers checkpoint
q4_0 q4_0_nonexpert" in bytes: the bf16 checkpoint, a Q4_0 package or GGUF of it (weight matrices
18 bytes per 32 weights; norms and routers f32; headers and alignment not counted) and that
package's non-expert part. The benchmark harnesses plan their disk with it.

Needs numpy only.
"""
import argparse
import json
import os
import shutil
import struct

import numpy as np

SHAPES = {
    # SmallThinker-4B-A0.6B
    "4b": dict(num_hidden_layers=32, hidden_size=1536, num_attention_heads=12, num_key_value_heads=2,
               head_dim=128, moe_num_primary_experts=32, moe_num_active_primary_experts=4,
               moe_ffn_hidden_size=768, vocab_size=151936, rope_theta=1.5e6,
               max_position_embeddings=32768, sliding_window_size=4096, tie_word_embeddings=True),
    # SmallThinker-21B-A3B
    "21b": dict(num_hidden_layers=52, hidden_size=2560, num_attention_heads=28, num_key_value_heads=4,
                head_dim=128, moe_num_primary_experts=64, moe_num_active_primary_experts=6,
                moe_ffn_hidden_size=768, vocab_size=151936, rope_theta=1.5e6,
                max_position_embeddings=16384, sliding_window_size=4096, tie_word_embeddings=True,
                moe_primary_router_apply_softmax=True),
}


def bf16_bytes(a):
    """float32 array -> bfloat16 bytes, round to nearest even."""
    bits = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    return rounded.tobytes()


def tensor_list(c, skewed):
    """(name, shape, kind) in Hugging Face order."""
    h, q = c["hidden_size"], c["num_attention_heads"] * c["head_dim"]
    kv = c["num_key_value_heads"] * c["head_dim"]
    out = [("model.embed_tokens.weight", (c["vocab_size"], h), "embed")]
    for n in range(c["num_hidden_layers"]):
        p = f"model.layers.{n}."
        out += [(p + "input_layernorm.weight", (h,), "norm"),
                (p + "self_attn.q_proj.weight", (q, h), "linear"),
                (p + "self_attn.k_proj.weight", (kv, h), "linear"),
                (p + "self_attn.v_proj.weight", (kv, h), "linear"),
                (p + "self_attn.o_proj.weight", (h, q), "linear"),
                (p + "post_attention_layernorm.weight", (h,), "norm"),
                (p + "block_sparse_moe.primary_router.weight", (c["moe_num_primary_experts"], h),
                 "router_skewed" if skewed else "linear")]
        for e in range(c["moe_num_primary_experts"]):
            ep = f"{p}block_sparse_moe.experts.{e}."
            f = c["moe_ffn_hidden_size"]
            out += [(ep + "gate.weight", (f, h), "linear"), (ep + "up.weight", (f, h), "linear"),
                    (ep + "down.weight", (h, f), "linear")]
    out.append(("model.norm.weight", (h,), "norm"))
    if not c["tie_word_embeddings"]:
        out.append(("lm_head.weight", (c["vocab_size"], h), "embed"))
    return out


def sizes(c, skewed):
    """(checkpoint, q4_0, q4_0 non-expert) bytes of this configuration."""
    checkpoint = q4_0 = nonexpert = 0
    for name, shape, kind in tensor_list(c, skewed):
        n = int(np.prod(shape))
        checkpoint += 2 * n
        quantized = len(shape) == 2 and "router" not in name and kind != "norm"
        size = n // 32 * 18 if quantized else 4 * n
        q4_0 += size
        nonexpert += 0 if ".experts." in name else size
    return checkpoint, q4_0, nonexpert


def values(rng, shape, kind):
    if kind == "norm":
        return 1.0 + 0.1 * rng.standard_normal(shape, dtype=np.float32)
    fan_in = shape[-1]
    a = rng.standard_normal(shape, dtype=np.float32) * np.float32(1.0 / np.sqrt(fan_in))
    if kind == "router_skewed":
        # Trained SmallThinker routers favour a minority of experts: give about a quarter of the
        # experts a shared direction along the residual stream's mean, so they win most tokens.
        hot = max(1, shape[0] // 4)
        direction = np.ones(shape[1], dtype=np.float32) / np.float32(np.sqrt(shape[1]))
        a[:hot] += np.float32(3.0) * direction
    return a


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", nargs="?", help="output folder (created)")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="4b")
    ap.add_argument("--layers", type=int, help="override the layer count (scaling runs)")
    ap.add_argument("--shard-bytes", type=int, default=2 << 30, help="target shard size")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skewed", action="store_true", help="skewed routing: a few hot experts per layer")
    ap.add_argument("--tokenizer", help="folder with tokenizer.json and tokenizer_config.json to copy")
    ap.add_argument("--sizes", action="store_true", help="print the sizes table (above) and write nothing")
    args = ap.parse_args()
    if args.sizes:
        for layers in range(1, (args.layers or SHAPES[args.shape]["num_hidden_layers"]) + 1):
            c = dict(SHAPES[args.shape], num_hidden_layers=layers)
            print(layers, *sizes(c, args.skewed))
        return
    if not args.out:
        ap.error("the output folder is required (unless --sizes)")

    c = dict(SHAPES[args.shape])
    if args.layers:
        c["num_hidden_layers"] = args.layers
    layers = c["num_hidden_layers"]
    if args.shape == "21b":
        c["rope_layout"] = [0 if n % 4 == 0 else 1 for n in range(layers)]
        c["sliding_window_layout"] = list(c["rope_layout"])
    else:
        c["rope_layout"] = [1] * layers
        c["sliding_window_layout"] = [0] * layers
    config = {"architectures": ["SmallThinkerForCausalLM"], "model_type": "smallthinker",
              "bos_token_id": 151643, "eos_token_id": [151645, 151643], "rms_norm_eps": 1e-6,
              "torch_dtype": "bfloat16", "norm_topk_prob": True, "use_cache": True, **c}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(args.out, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": 151643, "eos_token_id": [151645, 151643], "do_sample": True,
                   "temperature": 0.6, "top_k": 20, "top_p": 0.95}, f, indent=2)
    if args.tokenizer:
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copyfile(os.path.join(args.tokenizer, name), os.path.join(args.out, name))

    tensors = tensor_list(c, args.skewed)
    shards, current, size = [], [], 0
    for t in tensors:
        n = int(np.prod(t[1])) * 2
        if current and size + n > args.shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(t)
        size += n
    shards.append(current)

    rng = np.random.default_rng(args.seed)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for tname, shape, _ in shard:
            n = int(np.prod(shape)) * 2
            header[tname] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
            weight_map[tname] = name
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        with open(os.path.join(args.out, name), "wb") as f:
            f.write(struct.pack("<Q", len(text)))
            f.write(text)
            for tname, shape, kind in shard:
                f.write(bf16_bytes(values(rng, shape, kind)))
        total += offset
        print(f"wrote {name}: {len(shard)} tensors, {offset / 2**30:.2f} GiB", flush=True)
    with open(os.path.join(args.out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
    print(f"{args.out}: {len(tensors)} tensors, {total / 2**30:.2f} GiB in {len(shards)} shards")


if __name__ == "__main__":
    main()
