#!/usr/bin/env python3
"""GGUF files in the block types llama-quantize's presets write, for the import's tests.

    kquants.py samples OUT_DIR
        For each block type the import decodes: TYPE.blocks (random blocks with finite scales)
        and TYPE.f32 (the gguf package's dequantisation of them, float32): the authority the
        decoder is held to, value for value.

    kquants.py requantize IN.gguf OUT.gguf q4_k_m|q6_k
        IN (an f32 or f16 GGUF of a SmallThinker model) with its weight matrices re-encoded as
        llama-quantize's preset would type them: q6_k every matrix Q6_K; q4_k_m Q4_K, with Q6_K
        for the output head, the value projections and half the layers' expert down matrices.
        Rows that are not whole 256-value super-blocks take llama-quantize's fallbacks (Q5_0 for
        Q4_K, Q8_0 for Q6_K). Norms and routers stay f32, as llama-quantize leaves them. The
        K-quant encoders here are simple (max-based scales, nearest codes), not llama-quantize's
        search: what is tested is decoding, and each file's blocks are checked against the gguf
        package's dequantisation of them after writing.
"""
import sys

import numpy as np
import gguf
from gguf import GGMLQuantizationType as T
from gguf import quants

DECODED = [T.Q4_1, T.Q5_0, T.Q5_1, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.IQ4_NL, T.IQ4_XS]


def samples(out):
    rng = np.random.default_rng(7)
    for t in DECODED:
        block_size, type_size = gguf.GGML_QUANT_SIZES[t]
        blocks = rng.integers(0, 256, size=(64, type_size), dtype=np.uint8)
        # Every half in the block that is a scale: finite, of both signs and several magnitudes,
        # subnormals included. Their places, from ggml's block structs.
        halves = {T.Q4_1: [0, 2], T.Q5_0: [0], T.Q5_1: [0, 2], T.Q2_K: [80, 82], T.Q3_K: [108], T.Q4_K: [0, 2],
                  T.Q5_K: [0, 2], T.Q6_K: [208], T.IQ4_NL: [0], T.IQ4_XS: [0]}[t]
        for i in range(len(blocks)):
            for h in halves:
                value = np.float16(rng.choice([1e-3, 0.02, 0.5, 3.0, 6e-8]) * rng.uniform(-1, 1))
                blocks[i, h:h + 2] = np.frombuffer(value.tobytes(), dtype=np.uint8)
        values = quants.dequantize(blocks, t).astype(np.float32)
        assert values.size == len(blocks) * block_size and np.isfinite(values).all()
        blocks.tofile(f"{out}/{t.name}.blocks")
        values.tofile(f"{out}/{t.name}.f32")


def f16(x):
    return np.asarray(x, dtype=np.float16).reshape(-1, 1).view(np.uint8)


def encode_q6_k(x):
    """x: [n, 256] float32 → [n, 210] Q6_K blocks."""
    n = len(x)
    sub = x.reshape(n, 16, 16)
    scale = np.abs(sub).max(axis=2) / 31  # per 16 values: codes −32..31
    d = np.abs(scale).max(axis=1) / 127
    d16 = d.astype(np.float16).astype(np.float32)
    sc = np.where(d16[:, None] > 0, np.round(scale / np.where(d16[:, None] > 0, d16[:, None], 1)), 0).clip(-127, 127)
    step = (d16[:, None] * sc)[:, :, None]
    q = (np.where(step > 0, np.round(sub / np.where(step > 0, step, 1)), 0).clip(-32, 31) + 32).astype(np.uint8).reshape(n, 256)
    ql = np.zeros((n, 128), np.uint8)
    qh = np.zeros((n, 64), np.uint8)
    for half in range(2):
        y = q[:, 128 * half:128 * half + 128]
        q1, q2, q3, q4 = y[:, 0:32], y[:, 32:64], y[:, 64:96], y[:, 96:128]
        ql[:, 64 * half:64 * half + 32] = (q1 & 0xF) | (q3 & 0xF) << 4
        ql[:, 64 * half + 32:64 * half + 64] = (q2 & 0xF) | (q4 & 0xF) << 4
        qh[:, 32 * half:32 * half + 32] = (q1 >> 4) | (q2 >> 4) << 2 | (q3 >> 4) << 4 | (q4 >> 4) << 6
    return np.concatenate([ql, qh, sc.astype(np.int8).view(np.uint8), f16(d)], axis=1)


def encode_q4_k(x):
    """x: [n, 256] float32 → [n, 144] Q4_K blocks: x = d·sc·q − dmin·m, q 0..15, sc and m 6 bits."""
    n = len(x)
    sub = x.reshape(n, 8, 32)
    low = np.minimum(sub.min(axis=2), 0)
    scale = (sub.max(axis=2) - low) / 15
    d = scale.max(axis=1) / 63
    dmin = (-low).max(axis=1) / 63
    d16, m16 = d.astype(np.float16).astype(np.float32), dmin.astype(np.float16).astype(np.float32)
    safe = lambda v: np.where(v > 0, v, 1)
    sc = np.where(d16[:, None] > 0, np.round(scale / safe(d16)[:, None]), 0).clip(0, 63).astype(np.uint8)
    m = np.where(m16[:, None] > 0, np.round(-low / safe(m16)[:, None]), 0).clip(0, 63).astype(np.uint8)
    step = (d16[:, None] * sc)[:, :, None]
    offset = (m16[:, None] * m)[:, :, None]
    q = np.where(step > 0, np.round((sub + offset) / safe(step)), 0).clip(0, 15).astype(np.uint8).reshape(n, 256)
    scales = np.zeros((n, 12), np.uint8)
    for j in range(4):
        scales[:, j] = (sc[:, j] & 63) | (sc[:, j + 4] >> 4) << 6
        scales[:, j + 4] = (m[:, j] & 63) | (m[:, j + 4] >> 4) << 6
        scales[:, j + 8] = (sc[:, j + 4] & 0xF) | (m[:, j + 4] & 0xF) << 4
    qs = np.zeros((n, 128), np.uint8)
    for c in range(4):
        qs[:, 32 * c:32 * c + 32] = q[:, 64 * c:64 * c + 32] | q[:, 64 * c + 32:64 * c + 64] << 4
    return np.concatenate([f16(d), f16(dmin), scales, qs], axis=1)


def encode(values, t):
    rows = values.reshape(-1, values.shape[-1]).astype(np.float32)
    if t in (T.Q4_K, T.Q6_K):
        blocks = (encode_q4_k if t == T.Q4_K else encode_q6_k)(rows.reshape(-1, 256))
        return blocks.reshape(rows.shape[0], -1)
    return quants.quantize(rows, t)


def requantize(source, destination, preset):
    reader = gguf.GGUFReader(source)
    arch = reader.get_field("general.architecture").contents()
    writer = gguf.GGUFWriter(destination, arch)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name in ("general.architecture", "general.alignment"):
            continue
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), kind, sub)
    layers = reader.get_field(f"{arch}.block_count").contents()
    written = {}
    for tensor in reader.tensors:
        name, values = tensor.name, np.asarray(tensor.data)
        shape = [int(s) for s in reversed(tensor.shape)]  # numpy order, slowest first
        if len(shape) == 1 or "norm" in name or "ffn_gate_inp" in name:
            writer.add_tensor(name, values.astype(np.float32).reshape(shape))
            continue
        wide = preset == "q6_k" or name == "output.weight" or "attn_v" in name or (
            "ffn_down" in name and int(name.split(".")[1]) < layers // 2)
        t = T.Q6_K if wide else T.Q4_K
        if shape[-1] % 256 != 0:
            t = T.Q8_0 if t == T.Q6_K else T.Q5_0
        blocks = encode(values.astype(np.float32).reshape(shape), t)
        blocks = blocks.reshape(shape[:-1] + [-1])
        writer.add_tensor(name, blocks, raw_dtype=t)
        written[name] = t
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    # The blocks as written decode, by the gguf package, to values near the source's.
    check = gguf.GGUFReader(destination)
    original = {t.name: np.asarray(t.data).astype(np.float32) for t in reader.tensors}
    counts = {}
    for tensor in check.tensors:
        if tensor.name not in written:
            continue
        decoded = quants.dequantize(np.asarray(tensor.data), tensor.tensor_type).reshape(-1)
        base = original[tensor.name].reshape(-1)
        error = np.sqrt(((decoded - base) ** 2).mean() / max((base ** 2).mean(), 1e-30))
        assert error < 0.2, f"{tensor.name}: relative RMS error {error}"
        counts[tensor.tensor_type.name] = counts.get(tensor.tensor_type.name, 0) + 1
    print(" ".join(f"{k}:{v}" for k, v in sorted(counts.items())))


if __name__ == "__main__":
    if sys.argv[1] == "samples":
        samples(sys.argv[2])
    elif sys.argv[1] == "requantize":
        requantize(sys.argv[2], sys.argv[3], sys.argv[4])
    else:
        sys.exit(__doc__)
