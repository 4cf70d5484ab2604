#!/usr/bin/env python3
"""Golden vectors for Q4_0, Q8_0 and float16, from the `gguf` package (bit-exact with ggml).

    pip install gguf numpy && python3 Tests/Fixtures/quant/make_golden.py

Writes golden.json beside this script: for each case, float32 input and the expected Q4_0, Q8_0
and float16 bytes, base64. The one documented difference between gguf's numpy code and ggml's C
is applied: for a Q4_0 block whose values are all zero, ggml starts from max = +0.0, so
d = +0.0 / -8 = -0.0 and its scale is stored as 0x8000; numpy takes the first element, which
gives +0.0 when that element is -0.0. We follow ggml.
"""
import base64
import json
import os

import numpy as np
from gguf import quants
from gguf.constants import GGMLQuantizationType as T


def cases():
    rng = np.random.default_rng(1234)
    out = {}
    out["all zero"] = np.zeros(64, np.float32)
    out["all negative zero"] = np.full(32, -0.0, np.float32)
    mixed = np.zeros(32, np.float32); mixed[0] = -0.0; mixed[5] = -0.0
    out["zeros starting with negative zero"] = mixed
    tie = rng.standard_normal(32).astype(np.float32); tie[3] = 3.0; tie[20] = -3.0
    out["tie, positive first"] = tie
    tie2 = rng.standard_normal(32).astype(np.float32); tie2[1] = -3.0; tie2[30] = 3.0
    out["tie, negative first"] = tie2
    neg = rng.standard_normal(32).astype(np.float32); neg[7] = -9.5
    out["negative maximum"] = neg
    out["huge, scale overflows float16"] = (rng.standard_normal(32) * 1e37).astype(np.float32)
    out["near float16 max"] = (rng.standard_normal(32) * 3e5).astype(np.float32)
    out["tiny, scale subnormal in float16"] = (rng.standard_normal(32) * 1e-6).astype(np.float32)
    out["tinier, scale flushes to zero in float16"] = (rng.standard_normal(32) * 1e-9).astype(np.float32)
    out["float32 subnormals"] = (rng.standard_normal(32) * 1e-40).astype(np.float32)
    one_big = np.zeros(32, np.float32); one_big[31] = 1.0
    out["single nonzero value"] = one_big
    # Q8_0 with amax 127 has d = 1: k + 0.5 tests rounding half away from zero.
    halves = (np.arange(32, dtype=np.float32) - 16) + np.float32(0.5); halves[0] = 127.0
    out["exact halves (q8_0 rounding)"] = halves
    # Q4_0 with max -8 has d = 1, id = 1: x + 8.5 lands on integers and halves.
    steps = np.linspace(-8, 8, 32).astype(np.float32); steps[0] = -8.0
    out["grid (q4_0 truncation)"] = steps
    out["all equal"] = np.full(32, 0.7, np.float32)
    out["random normal, 64 blocks"] = rng.standard_normal(64 * 32).astype(np.float32)
    out["random uniform wide range, 16 blocks"] = (rng.uniform(-1, 1, 16 * 32) * 10.0 ** rng.integers(-8, 8, 16 * 32)).astype(np.float32)
    return out


def b64(a):
    return base64.b64encode(np.ascontiguousarray(a).tobytes()).decode()


def main():
    result = []
    for name, x in cases().items():
        q4 = quants.quantize(x.reshape(1, -1), T.Q4_0).reshape(-1, 18).copy()
        blocks = x.reshape(-1, 32)
        for i, block in enumerate(blocks):
            if not np.any(block != 0):
                q4[i, 0:2] = np.frombuffer(np.float16(-0.0).tobytes(), np.uint8)
        q8 = quants.quantize(x.reshape(1, -1), T.Q8_0)
        result.append({"name": name, "input": b64(x), "q4_0": b64(q4), "q8_0": b64(q8),
                       "f16": b64(x.astype(np.float16))})
    here = os.path.dirname(os.path.abspath(__file__))
    with open(os.path.join(here, "golden.json"), "w") as f:
        json.dump({"generator": "gguf " + __import__("importlib.metadata").metadata.version("gguf"),
                   "cases": result}, f, indent=1)
    print(f"wrote {len(result)} cases")


if __name__ == "__main__":
    main()
