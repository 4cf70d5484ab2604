"""Reads a GGUF with llama.cpp's own Python reader (the `gguf` package) and prints what the tests
compare with ours, as JSON: every metadata value (arrays as their length and first items), and
every tensor's name, ggml type, shape and the SHA-256 of its data.

    python3 read_gguf.py FILE.gguf
"""
import hashlib
import json
import sys

import gguf


def value(field):
    v = field.contents()
    if isinstance(v, list):
        return {"length": len(v), "first": v[:3]}
    return v


reader = gguf.GGUFReader(sys.argv[1])
out = {
    "metadata": {name: value(f) for name, f in reader.fields.items() if not name.startswith("GGUF.")},
    "tensors": [
        {
            "name": t.name,
            "type": t.tensor_type.name,
            "shape": [int(d) for d in t.shape],
            "sha256": hashlib.sha256(bytes(t.data.tobytes())).hexdigest(),
            "offset": int(t.data_offset),
        }
        for t in reader.tensors
    ],
}
print(json.dumps(out))
