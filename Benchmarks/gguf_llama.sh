#!/usr/bin/env bash
# GGUF against llama.cpp itself, both ways, on the same machine. Run by hand, never by the tests:
#
#   bash Benchmarks/gguf_llama.sh [WORK_DIR] [THREADS]
#
# 1. The trained fixture (Tests/Fixtures/trained; its NoPE layers 0 and 4 are llama.cpp's rule,
#    and 32 tokens of held-out text stay inside its window of 32, so llama.cpp's forced window of
#    4096 changes nothing): our f32, bf16 and Q4_0 packages exported to GGUF, llama.cpp's logits
#    on them against strun's on the packages (KL, top-1); and `llama-quantize --pure` of our bf16
#    export against our own `--dtype q4_0` export, tensor data compared by SHA-256.
# 2. Unless SKIP_CONVERTER=1, a 4B-shaped synthetic checkpoint
#    (Benchmarks/make_checkpoint.py, Qwen's tokenizer, which that converter recognises):
#    llama.cpp's own conversion (bf16) and `llama-quantize --pure` Q4_0 against our export of the
#    same checkpoint with --dtype q4_0; then llama.cpp's GGUF imported with stconvert and strun's
#    logits on it against llama.cpp's on the file.
# llama.cpp comes from the llama-cpp-python sdist (version pinned in llama_cpp.sh), built here
# with cmake; its converter's torch and transformers come from llama_cpp_converter (llama_cpp.sh:
# python3's when it has them, else installed into VENV, default WORK_DIR/converter-venv).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
work="${1:-Benchmarks/work-gguf}"; threads="${2:-2}"
mkdir -p "$work"; work=$(cd "$work" && pwd)
source Benchmarks/llama_cpp.sh   # pinned version, fetch and build
llama="${LLAMA_DIR:-$work/llama.cpp}"
llama_cpp_fetch "$llama"
build=$(llama_cpp_build "$llama" native llama llama-quantize)
lib=$(dirname "$(find "$build" -name 'libllama.so' | head -1)")
c++ -O2 -std=c++17 -I"$llama/include" -I"$llama/ggml/include" Benchmarks/llama_logits.cpp -L"$lib" -lllama \
    -Wl,-rpath,"$lib" -o "$work/llama_logits"
swift build -c release >/dev/null
B=.build/release
echo "cpu: $(lscpu | sed -n 's/^Model name: *//p' | head -1); llama.cpp from llama-cpp-python $LLAMA_CPP_PYTHON_VERSION, native build"

# KL(ours ‖ llama.cpp) per position, mean and worst, and top-1 agreement.
compare() {  # label ours.f32 theirs.f32 vocab
    python3 - "$@" <<'PY'
import sys, numpy as np
label, a, b, vocab = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
x = np.fromfile(a, dtype=np.float32).reshape(-1, vocab).astype(np.float64)
y = np.fromfile(b, dtype=np.float32).reshape(-1, vocab).astype(np.float64)
def logsoftmax(v): v = v - v.max(axis=1, keepdims=True); return v - np.log(np.exp(v).sum(axis=1, keepdims=True))
p, q = logsoftmax(x), logsoftmax(y)
kl = (np.exp(p) * (p - q)).sum(axis=1)
top = (x.argmax(axis=1) == y.argmax(axis=1)).mean()
print(f"{label}: {len(kl)} positions, mean KL {kl.mean():.3g}, max KL {kl.max():.3g}, top-1 agreement {top:.1%}, "
      f"max |logit difference| {np.abs(x - y).max():.3g}")
PY
}

same_tensors() {  # label theirs.gguf ours.gguf
    PYTHONPATH="$llama/gguf-py" python3 - "$@" <<'PY'
import hashlib, sys, gguf
def tensors(path):
    return {t.name: (t.tensor_type.name, [int(d) for d in t.shape], hashlib.sha256(bytes(t.data.tobytes())).hexdigest())
            for t in gguf.GGUFReader(path).tensors}
label, theirs, ours = sys.argv[1], tensors(sys.argv[2]), tensors(sys.argv[3])
same = [n for n in theirs if ours.get(n) == theirs[n]]
differ = sorted(set(theirs) ^ set(ours)) + [n for n in theirs if n in ours and ours[n] != theirs[n]]
print(f"{label}: {len(same)} of {len(theirs)} tensors byte-identical" + (f"; differing: {differ[:8]}" if differ else ""))
PY
}

# 1. The trained fixture.
fixture=Tests/Fixtures/trained/trained-21b-like
$B/stconvert $fixture -o "$work/trained-bf16.stpk" --force -q
$B/stconvert $fixture -o "$work/trained-f32.stpk" --dtype f32 --force -q
$B/stquant "$work/trained-bf16.stpk" -o "$work/trained-q4_0.stpk" --type q4_0 --force -q
ids=$($B/strun tokenize "$work/trained-bf16.stpk" --file Tests/Fixtures/trained/held-out-sample.txt | tr -d '[]' | cut -d, -f1-32)
$B/stconvert "$work/trained-bf16.stpk" -o "$work/trained-bf16-a32.gguf" --force-layout --alignment 32 --force -q
"$build/bin/llama-quantize" --pure --token-embedding-type q4_0 --output-tensor-type q4_0 "$work/trained-bf16-a32.gguf" \
    "$work/llama-trained-q4_0.gguf" q4_0 "$threads" >/dev/null 2>&1
$B/stconvert "$work/trained-bf16.stpk" -o "$work/ours-trained-q4_0.gguf" --dtype q4_0 --force-layout --force -q
same_tensors "trained Q4_0: our --dtype q4_0 export vs llama-quantize --pure of our bf16 export" \
    "$work/llama-trained-q4_0.gguf" "$work/ours-trained-q4_0.gguf"
for type in f32 bf16 q4_0; do
    $B/stconvert "$work/trained-$type.stpk" -o "$work/trained-$type.gguf" --force-layout --force -q
    $B/strun logits "$work/trained-$type.stpk" --tokens "$ids" -o "$work/ours.f32" -t "$threads"
    "$work/llama_logits" "$work/trained-$type.gguf" "$threads" "$ids" "$work/theirs.f32" 2>"$work/llama.err"
    compare "trained $type: strun on the package vs llama.cpp on its export" "$work/ours.f32" "$work/theirs.f32" 4096
done

# 2. The 4B shape, through llama.cpp's own converter.
if [ -n "${SKIP_CONVERTER:-}" ]; then
    echo "4B shape through llama.cpp's converter: skipped (SKIP_CONVERTER)"
    exit 0
fi
python=$(llama_cpp_converter "$llama" "${VENV:-$work/converter-venv}")
ckpt="$work/checkpoint-4b"
[ -f "$ckpt/config.json" ] || python3 Benchmarks/make_checkpoint.py "$ckpt" --shape 4b --tokenizer Tests/Fixtures/qwen-tokenizer
PYTHONPATH="$llama/gguf-py" "$python" "$llama/convert_hf_to_gguf.py" "$ckpt" --outtype bf16 --outfile "$work/llama-bf16.gguf" >/dev/null 2>&1
"$build/bin/llama-quantize" --pure --token-embedding-type q4_0 --output-tensor-type q4_0 "$work/llama-bf16.gguf" \
    "$work/llama-q4_0.gguf" q4_0 "$threads" >/dev/null 2>&1
rm -f "$work/llama-bf16.gguf"
$B/stconvert "$ckpt" -o "$work/ours-bf16.stpk" --force -q
$B/stconvert "$work/ours-bf16.stpk" -o "$work/ours-q4_0.gguf" --dtype q4_0 --force -q
same_tensors "4B Q4_0: our --dtype q4_0 export vs llama-quantize --pure of llama.cpp's conversion" "$work/llama-q4_0.gguf" "$work/ours-q4_0.gguf"
ids=$(python3 -c "import random; random.seed(7); print(','.join(str(random.randrange(151643)) for _ in range(32)))")
$B/stquant "$work/ours-bf16.stpk" -o "$work/ours-q4_0.stpk" --type q4_0 --force -q
$B/strun logits "$work/ours-q4_0.stpk" --tokens "$ids" -o "$work/ours.f32" -t "$threads" --context 64
"$work/llama_logits" "$work/ours-q4_0.gguf" "$threads" "$ids" "$work/theirs.f32" 2>"$work/llama.err"
compare "4B Q4_0: strun on our package vs llama.cpp on our export" "$work/ours.f32" "$work/theirs.f32" 151936
$B/stconvert "$work/llama-q4_0.gguf" -o "$work/imported-q4_0.stpk" --force 2>"$work/import.notes" >/dev/null
sed 's/^/  /' "$work/import.notes"
$B/strun logits "$work/imported-q4_0.stpk" --tokens "$ids" -o "$work/ours.f32" -t "$threads" --context 64
"$work/llama_logits" "$work/llama-q4_0.gguf" "$threads" "$ids" "$work/theirs.f32" 2>"$work/llama.err"
compare "4B Q4_0: strun on the package imported from llama.cpp's GGUF vs llama.cpp on that GGUF" "$work/ours.f32" "$work/theirs.f32" 151936
