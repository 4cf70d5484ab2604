#!/usr/bin/env python3
"""Trains the small SmallThinker fixture on the corpus (corpus.py) and writes a Hugging Face
checkpoint folder: config.json, generation_config.json, the tokenizer, bf16 safetensors in shards
with an index.

    python3 train.py OUT_DIR [--minutes 50] [--seed 20261201]

The model has the 21B's structure at small size (see CONFIG): NoPE global attention on every
fourth layer (0, 4), sliding-window RoPE on the others with a 32-token window, sigmoid routing
over 16 experts with 4 active, ReGLU experts, tied embeddings. Training: AdamW, 128-token
windows, 32 per step, cosine schedule over the time budget (the step count is fixed up front
from a timed warm-up so the run is deterministic for a given step count, which is printed and
recorded); the last 15% of steps mix in ChatML conversations (a verse from the user, the next
verse or two from the assistant) so that `strun chat` answers in kind. A small load-balancing
loss (Switch Transformer style, coefficient 0.01) keeps every expert in use, as the
SmallThinker report's training does with its own balancing.
"""
import argparse
import json
import math
import os
import random
import sys
import time

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import corpus  # noqa: E402
import smallthinker  # noqa: E402

CONFIG = {
    "architectures": ["SmallThinkerForCausalLM"],
    "model_type": "smallthinker",
    "model_name": "smallthinker-trained-kjv",
    "vocab_size": 4096,
    "hidden_size": 256,
    "num_hidden_layers": 8,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "moe_num_primary_experts": 16,
    "moe_num_active_primary_experts": 4,
    "moe_ffn_hidden_size": 128,
    "moe_primary_router_apply_softmax": False,
    "rope_layout": [0, 1, 1, 1, 0, 1, 1, 1],
    "sliding_window_layout": [0, 1, 1, 1, 0, 1, 1, 1],
    "sliding_window_size": 32,
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-06,
    "tie_word_embeddings": True,
    "bos_token_id": None,
    "eos_token_id": [2, 0],
    "max_position_embeddings": 4096,
    "torch_dtype": "bfloat16",
    "use_cache": True,
}
GENERATION = {"bos_token_id": None, "eos_token_id": [2, 0], "do_sample": True, "temperature": 0.7, "top_k": 40, "top_p": 0.95}
SEQ = 128
BATCH = 32
LR = 3e-3
BALANCE = 0.01
CHAT_FROM = 0.85
CHAT_SHARE = 0.5


def encode_stream(tok, texts):
    ids = []
    for text in texts:
        ids.extend(tok.encode(text).ids)
        ids.append(0)  # <|endoftext|>
    return torch.tensor(ids, dtype=torch.long)


def batch(stream, rng, count):
    starts = [rng.randrange(0, len(stream) - SEQ - 1) for _ in range(count)]
    x = torch.stack([stream[s:s + SEQ + 1] for s in starts])
    return x[:, :-1], x[:, 1:]


def init(model, seed):
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight") or "layernorm" in name:
            continue
        std = 0.02 / math.sqrt(2 * model.c.layers) if name.endswith(("o_proj.weight", "down.weight")) else 0.02
        with torch.no_grad():
            p.copy_(torch.randn(p.shape, generator=g) * std)


def loss_of(model, x, y):
    aux = []
    logits = model(x, aux=aux)
    lm = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
    balance = 0.0
    for router_logits, chosen in aux:
        e = router_logits.shape[-1]
        probs = torch.sigmoid(router_logits)
        probs = probs / probs.sum(-1, keepdim=True)
        share = F.one_hot(chosen, e).float().sum(-2).reshape(-1, e).mean(0) / chosen.shape[-1]
        balance = balance + e * (share * probs.reshape(-1, e).mean(0)).sum()
    return lm, balance / len(aux)


@torch.no_grad()
def held_out_loss(model, stream):
    model.eval()
    total, count = 0.0, 0
    for s in range(0, len(stream) - SEQ - 1, SEQ):
        x = stream[s:s + SEQ].unsqueeze(0)
        y = stream[s + 1:s + SEQ + 1].unsqueeze(0)
        logits = model(x)
        total += F.cross_entropy(logits[0], y[0], reduction="sum").item()
        count += SEQ
    model.train()
    return total / count


def save(model, out, tok_dir, record):
    from safetensors.torch import save_file

    os.makedirs(out, exist_ok=True)
    tensors = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in smallthinker.state_dict_hf(model).items()}
    names = sorted(tensors)
    # Two shards: the embedding and the first half of the layers, then the rest.
    first = [n for n in names if n == "model.embed_tokens.weight" or (n.startswith("model.layers.") and int(n.split(".")[2]) < 4)]
    shards = [first, [n for n in names if n not in first]]
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: tensors[n] for n in shard}, os.path.join(out, file), metadata={"format": "pt"})
        for n in shard:
            weight_map[n] = file
            total += tensors[n].numel() * 2
    with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        f.write("\n")
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(CONFIG, f, indent=2)
        f.write("\n")
    with open(os.path.join(out, "generation_config.json"), "w") as f:
        json.dump(GENERATION, f, indent=2)
        f.write("\n")
    for name in ["tokenizer.json", "tokenizer_config.json"]:
        if os.path.abspath(tok_dir) != os.path.abspath(out):
            with open(os.path.join(tok_dir, name)) as src, open(os.path.join(out, name), "w") as dst:
                dst.write(src.read())
    with open(os.path.join(out, "training.json"), "w") as f:
        json.dump(record, f, indent=2)
        f.write("\n")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--minutes", type=float, default=50)
    parser.add_argument("--steps", type=int, default=0, help="fix the step count instead of timing a warm-up")
    parser.add_argument("--seed", type=int, default=20261201)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)

    from tokenizers import Tokenizer

    if not os.path.exists(os.path.join(args.out, "tokenizer.json")):
        import subprocess
        subprocess.run([sys.executable, os.path.join(HERE, "train_tokenizer.py"), args.out], check=True)
    tok = Tokenizer.from_file(os.path.join(args.out, "tokenizer.json"))
    train_chapters, held_chapters = corpus.split()
    train = encode_stream(tok, [corpus.document(c) for c in train_chapters])
    held = encode_stream(tok, [corpus.document(c) for c in held_chapters])
    chats = corpus.conversations(train_chapters)
    rng.shuffle(chats)
    chat = encode_stream(tok, chats)
    print(f"tokens: train {len(train)}, held out {len(held)}, chat {len(chat)}", flush=True)

    c = smallthinker.Config(CONFIG)
    model = smallthinker.SmallThinker(c)
    init(model, args.seed)
    params = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=LR, betas=(0.9, 0.95))

    steps = args.steps
    start = time.time()
    if steps == 0:
        # Time a few steps (then start over from the same initial state) to fit the budget.
        state = {k: v.clone() for k, v in model.state_dict().items()}
        t0 = time.time()
        for _ in range(6):
            x, y = batch(train, random.Random(0), BATCH)
            lm, bal = loss_of(model, x, y)
            (lm + BALANCE * bal).backward()
            opt.zero_grad(set_to_none=True)
        per_step = (time.time() - t0) / 6
        steps = max(100, int(args.minutes * 60 / (per_step * 1.08)))
        model.load_state_dict(state)
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                lr=LR, betas=(0.9, 0.95))
        print(f"{per_step:.3f} s per step: {steps} steps", flush=True)
    warmup = max(20, steps // 50)
    log = []
    for step in range(steps):
        lr = LR * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, step / steps))))
        for g in opt.param_groups:
            g["lr"] = lr
        if step >= CHAT_FROM * steps:
            n_chat = int(BATCH * CHAT_SHARE)
            x1, y1 = batch(train, rng, BATCH - n_chat)
            x2, y2 = batch(chat, rng, n_chat)
            x, y = torch.cat([x1, x2]), torch.cat([y1, y2])
        else:
            x, y = batch(train, rng, BATCH)
        lm, bal = loss_of(model, x, y)
        opt.zero_grad(set_to_none=True)
        (lm + BALANCE * bal).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            entry = {"step": step, "loss": round(lm.item(), 4), "balance": round(bal.item(), 4), "lr": lr,
                     "minutes": round((time.time() - start) / 60, 2)}
            if step % 500 == 0 or step == steps - 1:
                entry["held_out_loss"] = round(held_out_loss(model, held), 4)
            log.append(entry)
            print(json.dumps(entry), flush=True)
    # The checkpoint holds bf16 weights: report the held-out loss of exactly those.
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    final = held_out_loss(model, held)
    record = {"seed": args.seed, "steps": steps, "batch": BATCH, "sequence": SEQ, "lr": LR, "balance_coefficient": BALANCE,
              "chat_from_step": int(CHAT_FROM * steps), "parameters": params,
              "tokens_seen": steps * BATCH * SEQ, "train_tokens": len(train), "held_out_tokens": len(held),
              "held_out_loss_bf16": round(final, 4), "held_out_perplexity_bf16": round(math.exp(final), 2),
              "minutes": round((time.time() - start) / 60, 1), "threads": args.threads,
              "torch": torch.__version__, "log": log}
    save(model, args.out, args.out, record)
    print(f"held-out loss {final:.4f} (perplexity {math.exp(final):.1f}) after {steps} steps; wrote {args.out}")


if __name__ == "__main__":
    main()
