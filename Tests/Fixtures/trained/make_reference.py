#!/usr/bin/env python3
"""Computes reference.json for the trained fixture with smallthinker.py (checked against the
authors' outputs by check_reference.py), in the structure of the authors' tiny fixtures, plus
routing statistics on held-out text.

    python3 make_reference.py FIXTURE_DIR

The weights are the checkpoint's bf16 values upcast to float32; activations float32; one thread.
Sequences are held-out text (chapters training never saw), both longer than the 32-token window.
"""
import base64
import hashlib
import json
import math
import os
import sys

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import corpus  # noqa: E402
import smallthinker  # noqa: E402

GREEDY = 16
STATS_WINDOW = 1024
CHECK_WINDOW = 128
CHECK_TOKENS = 256


def array(t):
    a = np.ascontiguousarray(t.detach().float().numpy().astype("<f4"))
    raw = a.tobytes()
    return {"dtype": "float32", "byteorder": "little", "shape": list(a.shape), "sha256": hashlib.sha256(raw).hexdigest(),
            "b64": base64.b64encode(raw).decode()}


@torch.no_grad()
def sequence(model, ids):
    x = torch.tensor([ids])
    trace = {}
    logits = model(x, trace=trace)[0]
    tokens, steps, margins = [], [], []
    seq = list(ids)
    for _ in range(GREEDY):
        last = model(torch.tensor([seq]))[0, -1]
        top = torch.topk(last, 2).values
        nxt = int(torch.argmax(last))
        tokens.append(nxt)
        steps.append(last)
        margins.append(float(top[0] - top[1]))
        seq.append(nxt)
    return {
        "input_ids": ids,
        "logits": array(logits),
        "argmax_per_position": logits.argmax(-1).tolist(),
        "greedy_tokens": tokens,
        "greedy_step_logits": array(torch.stack(steps)),
        "greedy_top1_top2_margins": margins,
        "greedy_min_margin": min(margins),
        "full_sequence_ids": seq,
        "router_logits": array(torch.stack([r[0] for r in trace["router_logits"]])),
        "topk_experts": [c[0].tolist() for c in trace["topk_experts"]],
        "topk_weights": array(torch.stack([w[0] for w in trace["topk_weights"]])),
        "layer_inputs": array(torch.stack([h[0] for h in trace["layer_inputs"]])),
        "final_norm_out": array(trace["final_norm_out"][0]),
    }


@torch.no_grad()
def routing_statistics(model, ids, window):
    """The quantities `strun stats` reports, over `ids` in windows of `window` tokens (each
    window a fresh sequence, as the Swift side resets its session when the context fills)."""
    c = model.c
    counts = np.zeros((c.layers, c.experts), dtype=np.int64)
    idle = np.zeros(c.layers)
    neurons = np.zeros(c.layers)
    found = np.zeros(c.layers)
    by_rank = np.zeros((c.layers, c.active))
    predicted = np.zeros(c.layers)
    for start in range(0, len(ids), window):
        chunk = ids[start:start + window]
        trace = {}
        x = torch.tensor([chunk])
        h2s = []
        hooks = [layer.post_attention_layernorm.register_forward_hook(lambda m, i, o: h2s.append(o[0].clone()))
                 for layer in model.layers]
        model(x, trace=trace)
        for h in hooks:
            h.remove()
        for l, layer in enumerate(model.layers):
            chosen = trace["topk_experts"][l][0]
            for e in chosen.flatten().tolist():
                counts[l, e] += 1
            experts = layer.block_sparse_moe.experts
            for e in range(c.experts):
                rows = (chosen == e).any(-1)
                if rows.any():
                    g = experts[e].gate(h2s[l][rows])
                    idle[l] += int((g <= 0).sum())
                    neurons[l] += g.numel()
            if l > 0:
                logits = layer.block_sparse_moe.primary_router(trace["layer_inputs"][l - 1][0])
                guess = torch.topk(logits, c.active, dim=-1).indices
                hit = (chosen.unsqueeze(-1) == guess.unsqueeze(-2)).any(-1)  # [T, k]: true choice of rank r predicted
                found[l] += int(hit.sum())
                by_rank[l] += hit.sum(0).numpy()
                predicted[l] += len(chunk)
    quarter = (c.experts + 3) // 4
    layers = []
    for l in range(c.layers):
        total = counts[l].sum()
        layers.append({
            "layer": l, "expert_counts": counts[l].tolist(),
            "top_quarter_share": float(np.sort(counts[l])[::-1][:quarter].sum() / total),
            "unused_experts": int((counts[l] == 0).sum()),
            "idle_neuron_fraction": float(idle[l] / neurons[l]),
            "predicted_recall": float(found[l] / (predicted[l] * c.active)) if l > 0 else None,
            "predicted_by_rank": (by_rank[l] / predicted[l]).tolist() if l > 0 else None,
        })
    return {"tokens": len(ids), "window": window, "experts": c.experts, "active": c.active, "layers": layers}


def tokenizer_samples(held):
    """Held-out text, a conversation with ChatML's special tokens, and text unlike the corpus."""
    return [corpus.document(held[-1]), corpus.document(held[-2])[:300],
            corpus.conversation("And the LORD spake unto Moses, saying,", "Speak unto the children of Israel."),
            "Numbers 3.14159, e-mail: someone@example.com; naïve café — “quoted” 日本語 🙂\n\n\tindented   spaces",
            "<|endoftext|>after<|im_start|>user\n<|im_end|>"]


def main():
    directory = sys.argv[1]
    torch.set_num_threads(1)
    from tokenizers import Tokenizer

    model = smallthinker.load(directory)
    tok = Tokenizer.from_file(os.path.join(directory, "tokenizer.json"))
    _, held = corpus.split()
    held_ids = []
    for c in held:
        held_ids.extend(tok.encode(corpus.document(c)).ids + [0])
    # Two held-out passages, each the shortest run of whole words from a chapter's start that
    # encodes to at least 40 (100) tokens: longer than the window, and text a user could type.
    def passage(chapter, tokens):
        words = corpus.document(chapter).split(" ")
        for n in range(1, len(words) + 1):
            text = " ".join(words[:n])
            if len(tok.encode(text).ids) >= tokens:
                return text
        raise SystemExit("chapter too short")
    # The first chapters whose greedy continuations have clear margins (at least 0.05 between
    # the first and second logits at every step), so that a test may compare generated text.
    sequences, used = {}, set()
    for name, tokens in [("short", 40), ("long", 100)]:
        for i, chapter in enumerate(held):
            if i in used:
                continue
            text = passage(chapter, tokens)
            q = sequence(model, tok.encode(text).ids)
            if q["greedy_min_margin"] >= 0.05:
                used.add(i)
                sequences[name] = dict(q, text=text, chapter=chapter[0])
                break
    with open(os.path.join(directory, "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(directory, "training.json")) as f:
        training = json.load(f)
    reference = {
        "preset": "trained-21b-like",
        "description": "Reference outputs of the trained fixture from Tests/Fixtures/trained/smallthinker.py (checked "
                       "against the SmallThinker authors' modeling code on the tiny fixtures by check_reference.py), bf16 "
                       "checkpoint weights upcast to float32, explicit attention, CPU, batch 1, positions 0..T-1.",
        "versions": {"torch": torch.__version__, "numpy": np.__version__, "python": sys.version.split()[0]},
        "compute": {"weights": "bfloat16 on disk -> float32", "activations": "float32", "attn_implementation": "eager",
                    "torch_threads": 1},
        "config": config,
        "training": {k: v for k, v in training.items() if k != "log"},
        "greedy_note": f"{GREEDY} greedy (argmax) tokens, no EOS stopping; computed without a KV cache (the whole "
                       "sequence recomputed each step). greedy_step_logits[i] is the last-position logit vector that "
                       "picked token i.",
        "hidden_states_note": "layer_inputs[l] = residual stream entering layer l (l=0 is the token embedding); "
                              "final_norm_out = model.norm(output of the last layer), the lm_head input.",
        "router_note": "router_logits[l] = primary_router(layer_inputs[l]) over all experts (pre-top-k); "
                       "topk_experts/topk_weights: top k by logit, sigmoid weights normalised over the chosen k.",
        "sequences": sequences,
        "tokenizer_check": [{"text": t, "ids": tok.encode(t).ids} for t in tokenizer_samples(held)],
        "routing_check": dict(routing_statistics(model, held_ids[:CHECK_TOKENS], CHECK_WINDOW), input_ids=held_ids[:CHECK_TOKENS]),
        "routing_statistics_held_out": routing_statistics(model, held_ids, STATS_WINDOW),
    }
    # A held-out sample for the README's `strun compare` and `strun stats`: whole held-out
    # chapters, about 2,000 tokens (within any context the commands default to).
    sample = ""
    verses = [v for c in held[len(held) // 2:] for v in c[1]]
    for verse in verses:
        if len(tok.encode(sample + verse + "\n").ids) > 2000:
            break
        sample += verse + "\n"
    with open(os.path.join(HERE, "held-out-sample.txt"), "w") as f:
        f.write(sample)
    reference["held_out_sample_tokens"] = len(tok.encode(sample).ids)
    for q in reference["sequences"].values():
        q["greedy_text"] = tok.decode(q["greedy_tokens"])
    with open(os.path.join(directory, "reference.json"), "w") as f:
        json.dump(reference, f)
    s = reference["routing_statistics_held_out"]
    print(f"held-out routing statistics over {s['tokens']} tokens (windows of {s['window']}):")
    for layer in s["layers"]:
        rec = layer["predicted_recall"]
        print(f"  layer {layer['layer']}: top quarter {layer['top_quarter_share']:.1%}, idle neurons "
              f"{layer['idle_neuron_fraction']:.1%}" + (f", predicted from the previous layer {rec:.1%}" if rec is not None else ""))
    for name in ["short", "long"]:
        q = reference["sequences"][name]
        print(name, "greedy:", repr(tok.decode(q["greedy_tokens"])), "min margin", round(q["greedy_min_margin"], 3))


if __name__ == "__main__":
    main()
