#!/usr/bin/env bash
# Importance matrices on the trained fixture, ours against llama.cpp's. Run by hand, never by the
# tests (it builds llama.cpp):
#
#   bash Benchmarks/imatrix_llama.sh [WORK_DIR] [THREADS]
#
# 1. The trained fixture: `strun imatrix` over Tests/Fixtures/trained/calibration-sample.txt
#    (training chapters, chunks of 512), then Q4_0 plain, with the matrix, and both with the tied
#    embedding in q8_0 (llama.cpp's presets never store a tied embedding in Q4_0), and with
#    `stquant --router-aware` (the embedding's blocks with error feedback against the routers): `strun compare`
#    against the float package over the held-out sample (mean and 99th-percentile KL, top-1,
#    perplexity), and each group of matrices quantised alone, to see where the loss is.
# 2. A variant llama.cpp routes as we do: every router scaled by 1/8 (exact in bf16), so that no
#    sigmoid saturates to a tie at 1.0 (README, "sigmoid ties"); the choice by logit is unchanged.
#    `strun imatrix --chunk 32` and `llama-imatrix -c 32` (chunks inside the window of 32 that
#    llama.cpp replaces with 4096) over the same whole chunks of the calibration text: the two
#    files compared entry by entry; Q4_0 with each judged as above; and `llama-quantize --pure
#    --imatrix` with our file on our float export against our `stquant --imatrix` package's
#    export, block for block.
# llama.cpp comes from the llama-cpp-python sdist (version pinned in llama_cpp.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
work="${1:-Benchmarks/work-imatrix}"; threads="${2:-2}"
mkdir -p "$work"; work=$(cd "$work" && pwd)
source Benchmarks/llama_cpp.sh
llama="${LLAMA_DIR:-$work/llama.cpp}"
llama_cpp_fetch "$llama"
build=$(llama_cpp_build "$llama" native llama-imatrix llama-quantize)
swift build -c release >/dev/null
B=$(pwd)/.build/release
F=$(pwd)/Tests/Fixtures/trained
echo "cpu: $(lscpu | sed -n 's/^Model name: *//p' | head -1); llama.cpp from llama-cpp-python $LLAMA_CPP_PYTHON_VERSION; $threads threads"

judge() {  # label base.stpk other.stpk
    "$B/strun" compare "$2" "$3" --file "$F/held-out-sample.txt" --json -t "$threads" | python3 -c "
import json, sys; d = json.load(sys.stdin)
print('  %-48s mean KL %.4f  p99 %.3f  top-1 %.1f%%  perplexity %.2f (base %.2f)' % ('$1', d['mean_kl'], d['p99_kl'],
      100 * d['top1_agreement'], d['other_perplexity'], d['base_perplexity']))"
}

quant() {  # out.stpk in.stpk stquant-args...
    local out=$1 in=$2; shift 2
    "$B/stquant" "$in" -o "$out" --type q4_0 --force "$@" >/dev/null 2>"$work/stquant.log" || { cat "$work/stquant.log"; exit 1; }
}

echo "== 1. the trained fixture: plain Q4_0 against Q4_0 with our importance matrix"
"$B/stconvert" "$F/trained-21b-like" -o "$work/f32.stpk" --dtype f32 --force >/dev/null
"$B/strun" imatrix "$work/f32.stpk" --file "$F/calibration-sample.txt" -o "$work/ours.gguf" --force --quiet -t "$threads"
for embedding in q4_0 q8_0; do
    quant "$work/plain.stpk" "$work/f32.stpk" --embedding-type $embedding
    quant "$work/weighted.stpk" "$work/f32.stpk" --embedding-type $embedding --imatrix "$work/ours.gguf"
    judge "embedding $embedding, plain" "$work/f32.stpk" "$work/plain.stpk"
    judge "embedding $embedding, our imatrix" "$work/f32.stpk" "$work/weighted.stpk"
done
quant "$work/aware.stpk" "$work/f32.stpk" --router-aware
judge "embedding q4_0, --router-aware" "$work/f32.stpk" "$work/aware.stpk"
quant "$work/aware.stpk" "$work/f32.stpk" --router-aware --imatrix "$work/ours.gguf"
judge "embedding q4_0, our imatrix and --router-aware" "$work/f32.stpk" "$work/aware.stpk"
echo "  each group alone in Q4_0 (the rest float32):"
keep_attn=(--tensor-type 'layers.*.attn_*=f32')
keep_in=(--tensor-type 'layers.*.experts.*.gate=f32' --tensor-type 'layers.*.experts.*.up=f32')
keep_down=(--tensor-type 'layers.*.experts.*.down=f32')
keep_embd=(--embedding-type f32)
for group in attention gate-up down embedding; do
    case $group in
        attention) args=("${keep_in[@]}" "${keep_down[@]}" "${keep_embd[@]}") ;;
        gate-up) args=("${keep_attn[@]}" "${keep_down[@]}" "${keep_embd[@]}") ;;
        down) args=("${keep_attn[@]}" "${keep_in[@]}" "${keep_embd[@]}") ;;
        embedding) args=("${keep_attn[@]}" "${keep_in[@]}" "${keep_down[@]}") ;;
    esac
    quant "$work/plain.stpk" "$work/f32.stpk" "${args[@]}"
    quant "$work/weighted.stpk" "$work/f32.stpk" "${args[@]}" --imatrix "$work/ours.gguf"
    judge "$group, plain" "$work/f32.stpk" "$work/plain.stpk"
    judge "$group, our imatrix" "$work/f32.stpk" "$work/weighted.stpk"
done

echo "== 2. a variant llama.cpp routes as we do (routers x 1/8): our imatrix against llama-imatrix's"
rm -rf "$work/variant"; cp -r "$F/trained-21b-like" "$work/variant"
python3 - "$work/variant" <<'PY'
import json, os, struct, sys
import numpy as np
folder = sys.argv[1]
for name in sorted(os.listdir(folder)):
    if not name.endswith(".safetensors"):
        continue
    path = os.path.join(folder, name)
    with open(path, "rb") as f:
        length = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(length))
    data = np.memmap(path, dtype=np.uint8, mode="r+", offset=8 + length)
    for tensor, info in header.items():
        if tensor.endswith("primary_router.weight"):
            assert info["dtype"] == "BF16"
            start, end = info["data_offsets"]
            bits = data[start:end].view(np.uint16)
            values = (bits.astype(np.uint32) << 16).view(np.float32) * np.float32(0.125)
            back = (values.view(np.uint32) >> 16).astype(np.uint16)
            assert np.array_equal((back.astype(np.uint32) << 16).view(np.float32), values)  # exact
            bits[:] = back
    data.flush()
PY
"$B/stconvert" "$work/variant" -o "$work/v-f32.stpk" --dtype f32 --force >/dev/null
# At 32 bytes: llama-quantize writes offsets at 32 but keeps the alignment key it read (see --alignment).
"$B/stconvert" "$work/v-f32.stpk" -o "$work/v-f32.gguf" --force-layout --alignment 32 --force >/dev/null 2>&1
# The same whole chunks of 32 tokens for both tools.
"$B/strun" tokenize "$work/v-f32.stpk" --file "$F/calibration-sample.txt" > "$work/calibration.ids"
python3 - "$work/calibration.ids" <<'PY'
import sys
ids = open(sys.argv[1]).read().strip().strip("[]").replace(",", " ").split()
open(sys.argv[1], "w").write(" ".join(ids[: len(ids) // 32 * 32]))
PY
"$B/strun" imatrix "$work/v-f32.stpk" --tokens-file "$work/calibration.ids" --chunk 32 -o "$work/v-ours.gguf" --force --quiet -t "$threads"
"$build/bin/llama-imatrix" -m "$work/v-f32.gguf" -f "$F/calibration-sample.txt" -c 32 -o "$work/v-llama.gguf" -t "$threads" \
    --no-ppl > "$work/llama-imatrix.log" 2>&1 || { tail -20 "$work/llama-imatrix.log"; exit 1; }
grep -E "tokenizing the input|computing over" "$work/llama-imatrix.log" | sed 's/^/  llama-imatrix: /'
echo "  our token count: $(wc -w < "$work/calibration.ids")"
python3 - "$work/v-ours.gguf" "$work/v-llama.gguf" <<'PY'
import sys
import numpy as np, gguf
def entries(path):
    t = {x.name: np.array(x.data, dtype=np.float64) for x in gguf.GGUFReader(path).tensors}
    return {n[:-8]: (t[n], t[n[:-8] + ".counts"].reshape(-1)) for n in t if n.endswith(".in_sum2")}
ours, theirs = entries(sys.argv[1]), entries(sys.argv[2])
common = sorted(set(ours) & set(theirs))
print(f"  entries: ours {len(ours)}, llama-imatrix's {len(theirs)}, in common {len(common)}; only ours: "
      f"{sorted(set(ours) - set(theirs))}; only theirs: {sorted(set(theirs) - set(ours))}")
worst, counts_equal, moved, routed = 0.0, 0, 0, 0
for n in common:
    (s1, c1), (s2, c2) = ours[n], theirs[n]
    counts_equal += np.array_equal(c1, c2)
    if len(c1) > 1:
        moved, routed = moved + np.abs(c1 - c2).sum() / 2, routed + c2.sum()
    i1 = s1.reshape(len(c1), -1) / np.maximum(c1, 1)[:, None]
    i2 = s2.reshape(len(c2), -1) / np.maximum(c2, 1)[:, None]
    worst = max(worst, float(np.max(np.abs(i1 - i2) / np.maximum(i2.max(axis=1, keepdims=True), 1e-30))))
print(f"  token counts identical in {counts_equal} of {len(common)} entries (expert routings that differ: {moved:.0f} of "
      f"{routed:.0f}); importances differ by at most {worst:.2g} of each matrix's largest")
PY
quant "$work/v-plain.stpk" "$work/v-f32.stpk"
quant "$work/v-ours.stpk" "$work/v-f32.stpk" --imatrix "$work/v-ours.gguf"
quant "$work/v-llama.stpk" "$work/v-f32.stpk" --imatrix "$work/v-llama.gguf"
judge "variant, plain" "$work/v-f32.stpk" "$work/v-plain.stpk"
judge "variant, our imatrix" "$work/v-f32.stpk" "$work/v-ours.stpk"
judge "variant, llama-imatrix file" "$work/v-f32.stpk" "$work/v-llama.stpk"
"$build/bin/llama-quantize" --pure --imatrix "$work/v-ours.gguf" "$work/v-f32.gguf" "$work/v-llamaq.gguf" q4_0 "$threads" \
    > "$work/llama-quantize.log" 2>&1 || { tail -20 "$work/llama-quantize.log"; exit 1; }
"$B/stconvert" "$work/v-ours.stpk" -o "$work/v-ours-q4.gguf" --force-layout --force >/dev/null 2>&1
PYTHONPATH="$llama/gguf-py" python3 - "$work/v-llamaq.gguf" "$work/v-ours-q4.gguf" <<'PY'
import hashlib, sys, gguf
def tensors(path):
    return {t.name: (t.tensor_type.name, hashlib.sha256(bytes(t.data.tobytes())).hexdigest()) for t in gguf.GGUFReader(path).tensors}
theirs, ours = tensors(sys.argv[1]), tensors(sys.argv[2])
quantised = [n for n in theirs if theirs[n][0] == "Q4_0"]
same = [n for n in quantised if ours.get(n) == theirs[n]]
differ = sorted(n for n in quantised if ours.get(n) != theirs[n])
print(f"  llama-quantize --pure --imatrix (our file) against stquant --imatrix: {len(same)} of {len(quantised)} Q4_0 tensors "
      f"byte-identical; differing: {differ[:4]}{' ...' if len(differ) > 4 else ''} ({len(differ)})")
PY
