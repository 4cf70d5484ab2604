"""SmallThinker in plain PyTorch, for training the small trained fixture and computing its reference.

Written from the forward pass in the project's notes (router on the raw residual stream before
attention, ReGLU experts, per-layer RoPE/NoPE and sliding-window layouts, softmax or sigmoid
routing over the chosen k) and checked against the SmallThinker authors' own outputs by
check_reference.py: max |logit difference| <= 1e-4 on every tiny fixture, both sequences.

Float32 throughout; attention is computed explicitly (matmul, mask, softmax) as the authors'
eager path does, so the check is not blurred by a fused kernel's summation order.
"""
import json
import math
import os

import torch
import torch.nn.functional as F
from torch import nn


class Config:
    def __init__(self, d):
        self.raw = d
        self.vocab = d["vocab_size"]
        self.hidden = d["hidden_size"]
        self.layers = d["num_hidden_layers"]
        self.heads = d["num_attention_heads"]
        self.kv_heads = d["num_key_value_heads"]
        self.head_dim = d["head_dim"]
        self.experts = d["moe_num_primary_experts"]
        self.active = d["moe_num_active_primary_experts"]
        self.ffn = d["moe_ffn_hidden_size"]
        # A missing key means sigmoid routing, as in the authors' code.
        self.softmax_routing = bool(d.get("moe_primary_router_apply_softmax", False))
        self.rope_layout = d["rope_layout"]
        self.sliding_layout = d["sliding_window_layout"]
        self.window = d.get("sliding_window_size", 0)
        self.theta = d["rope_theta"]
        self.eps = d["rms_norm_eps"]
        self.tied = d.get("tie_word_embeddings", True)

    @staticmethod
    def load(directory):
        with open(os.path.join(directory, "config.json")) as f:
            return Config(json.load(f))


class RMSNorm(nn.Module):
    def __init__(self, size, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Attention(nn.Module):
    def __init__(self, c, layer):
        super().__init__()
        self.c = c
        self.q_proj = nn.Linear(c.hidden, c.heads * c.head_dim, bias=False)
        self.k_proj = nn.Linear(c.hidden, c.kv_heads * c.head_dim, bias=False)
        self.v_proj = nn.Linear(c.hidden, c.kv_heads * c.head_dim, bias=False)
        self.o_proj = nn.Linear(c.heads * c.head_dim, c.hidden, bias=False)
        self.rope = c.rope_layout[layer] == 1
        self.sliding = c.sliding_layout[layer] == 1

    def forward(self, h, cos, sin, masks):
        b, t, _ = h.shape
        c = self.c
        q = self.q_proj(h).view(b, t, c.heads, c.head_dim).transpose(1, 2)
        k = self.k_proj(h).view(b, t, c.kv_heads, c.head_dim).transpose(1, 2)
        v = self.v_proj(h).view(b, t, c.kv_heads, c.head_dim).transpose(1, 2)
        if self.rope:
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
        group = c.heads // c.kv_heads
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
        scores = torch.matmul(q, k.transpose(2, 3)) * (c.head_dim ** -0.5)
        scores = scores + masks["sliding" if self.sliding else "causal"]
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
        out = torch.matmul(probs, v).transpose(1, 2).reshape(b, t, c.heads * c.head_dim)
        return self.o_proj(out)


class Expert(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.gate = nn.Linear(c.hidden, c.ffn, bias=False)
        self.up = nn.Linear(c.hidden, c.ffn, bias=False)
        self.down = nn.Linear(c.ffn, c.hidden, bias=False)

    def forward(self, x):
        return self.down(F.relu(self.gate(x)) * self.up(x))


class MoE(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c = c
        self.primary_router = nn.Linear(c.hidden, c.experts, bias=False)
        self.experts = nn.ModuleList([Expert(c) for _ in range(c.experts)])

    def route(self, r):
        """Router logits over all experts, the chosen k, and their weights."""
        logits = self.primary_router(r)
        top, chosen = torch.topk(logits, self.c.active, dim=-1)
        if self.c.softmax_routing:
            weights = torch.softmax(top, dim=-1)
        else:
            s = torch.sigmoid(top)
            weights = s / s.sum(-1, keepdim=True)
        return logits, chosen, weights

    def forward(self, h2, chosen, weights, stats=None):
        shape = h2.shape
        x = h2.reshape(-1, shape[-1])
        chosen = chosen.reshape(-1, self.c.active)
        weights = weights.reshape(-1, self.c.active)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            rows, slot = torch.nonzero(chosen == e, as_tuple=True)
            if rows.numel() == 0:
                continue
            xe = x[rows]
            gate = F.relu(expert.gate(xe))
            if stats is not None:
                stats.append((e, (gate > 0).float().mean(-1)))
            y = expert.down(gate * expert.up(xe))
            out.index_add_(0, rows, y * weights[rows, slot].unsqueeze(-1))
        return out.view(shape)


class Layer(nn.Module):
    def __init__(self, c, index):
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden, c.eps)
        self.self_attn = Attention(c, index)
        self.post_attention_layernorm = RMSNorm(c.hidden, c.eps)
        self.block_sparse_moe = MoE(c)


class SmallThinker(nn.Module):
    """Parameter names match the Hugging Face checkpoint's (`model.` prefix added on save/load)."""

    def __init__(self, c):
        super().__init__()
        self.c = c
        self.embed_tokens = nn.Embedding(c.vocab, c.hidden)
        self.layers = nn.ModuleList([Layer(c, i) for i in range(c.layers)])
        self.norm = RMSNorm(c.hidden, c.eps)
        self.lm_head = None if c.tied else nn.Linear(c.hidden, c.vocab, bias=False)

    def rope_tables(self, t, device):
        c = self.c
        inv_freq = 1.0 / (c.theta ** (torch.arange(0, c.head_dim, 2, dtype=torch.int64).float().to(device) / c.head_dim))
        freqs = torch.arange(t, device=device).float()[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()

    def masks(self, t, device):
        i = torch.arange(t, device=device)[:, None]
        j = torch.arange(t, device=device)[None, :]
        neg = torch.finfo(torch.float32).min
        causal = torch.where(j <= i, 0.0, neg)
        sliding = torch.where((j <= i) & (j > i - self.c.window), 0.0, neg) if self.c.window > 0 else causal
        return {"causal": causal, "sliding": sliding}

    def forward(self, ids, trace=None, aux=None):
        """ids: [batch, T]. trace (a dict) collects layer inputs, router logits, choices, weights
        and final-norm output; aux (a list) collects per-layer router probabilities and choices for
        a load-balancing loss."""
        b, t = ids.shape
        x = self.embed_tokens(ids)
        cos, sin = self.rope_tables(t, ids.device)
        masks = self.masks(t, ids.device)
        for layer in self.layers:
            moe = layer.block_sparse_moe
            logits, chosen, weights = moe.route(x)  # before attention, on the raw residual stream
            if trace is not None:
                trace.setdefault("layer_inputs", []).append(x.detach().clone())
                trace.setdefault("router_logits", []).append(logits.detach().clone())
                trace.setdefault("topk_experts", []).append(chosen.detach().clone())
                trace.setdefault("topk_weights", []).append(weights.detach().clone())
            if aux is not None:
                aux.append((logits, chosen))
            x = x + layer.self_attn(layer.input_layernorm(x), cos, sin, masks)
            stats = trace.setdefault("active_fraction", []) if trace is not None else None
            if stats is not None:
                stats.append([])
            x = x + moe(layer.post_attention_layernorm(x), chosen, weights, stats[-1] if stats is not None else None)
        out = self.norm(x)
        if trace is not None:
            trace["final_norm_out"] = out.detach().clone()
        head = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return out @ head.t()


def state_dict_hf(model):
    """The model's tensors under the Hugging Face names."""
    out = {}
    for name, tensor in model.state_dict().items():
        out[name if name.startswith("lm_head") else "model." + name] = tensor
    return out


def load(directory, device="cpu"):
    """A checkpoint folder (single file or shards with an index) as a float32 SmallThinker."""
    from safetensors.torch import load_file

    c = Config.load(directory)
    model = SmallThinker(c)
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    tensors = {}
    for name in files:
        tensors.update(load_file(os.path.join(directory, name)))
    state = {}
    for name, tensor in tensors.items():
        key = name[len("model."):] if name.startswith("model.") else name
        state[key] = tensor.float()
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [m for m in missing if not m.startswith("lm_head")]:
        raise SystemExit(f"{directory}: unexpected {unexpected}, missing {missing}")
    return model.to(device).eval()


def decode_array(obj):
    """A reference.json array ({dtype float32, shape, b64}) as a tensor."""
    import base64

    import numpy as np

    data = np.frombuffer(base64.b64decode(obj["b64"]), dtype="<f4").reshape(obj["shape"])
    return torch.from_numpy(data.copy())
