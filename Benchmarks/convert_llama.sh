#!/usr/bin/env bash
# Checkpoint to Q4_0, ours against llama.cpp's, on one synthetic full-size checkpoint: wall time
# and peak RSS of every step. Run by hand, never by the tests:
#
#   [SHAPE=4b|21b] [LAYERS=N] bash Benchmarks/convert_llama.sh [WORK_DIR] [THREADS]
#
#   ours:      stconvert CHECKPOINT -o OUT.stpk --type q4_0   (one step, no float package)
#   llama.cpp: convert_hf_to_gguf.py --outtype bf16, then llama-quantize --pure
#              --token-embedding-type q4_0 --output-tensor-type q4_0 ... q4_0 THREADS
#
# The disk holds the checkpoint and one output at a time: checkpoint (make_checkpoint.py --skewed,
# Qwen tokenizer) -> our package, timed, then deleted -> llama.cpp's bf16 GGUF -> the checkpoint
# is deleted -> its Q4_0 GGUF, timed -> both deleted. The peak is the checkpoint beside the bf16
# GGUF, twice the checkpoint. Free disk is checked first against that (sizes from
# make_checkpoint.py --sizes, plus 2 GiB); when it is short the script refuses, saying how much
# it needs and the largest layer count that fits. The page cache is dropped before each step, so
# every step reads its input from the disk. llama.cpp is the pinned source of llama_cpp.sh (built
# for the native CPU); its converter's Python packages come from llama_cpp_converter (VENV, by
# default WORK_DIR/converter-venv). LLAMA_DIR shares one llama.cpp tree between work folders.
set -euo pipefail
cd "$(dirname "$0")/.."
work="${1:-Benchmarks/work-convert}"; threads="${2:-2}"
shape="${SHAPE:-4b}"
table=$(python3 Benchmarks/make_checkpoint.py --shape "$shape" --skewed --sizes ${LAYERS:+--layers "$LAYERS"})
layers="${LAYERS:-$(tail -1 <<< "$table" | cut -d' ' -f1)}"
mkdir -p "$work"; work=$(cd "$work" && pwd)
source Benchmarks/llama_cpp.sh

ckpt="$work/checkpoint-$shape-$layers"; ours="$work/ours-q4_0.stpk"
bf16="$work/llama-bf16.gguf"; q4="$work/llama-q4_0.gguf"
rm -rf "$ckpt" "$ours" "$bf16" "$q4"   # every run starts from nothing: a leftover is from a run that failed

margin=$((2 << 30))
free=$(($(df -P -B1 "$work" | awk 'NR==2 {print $4}')))
read -r _ ckpt_bytes q4_bytes _ < <(awk -v l="$layers" '$1 == l' <<< "$table")
need=$((2 * ckpt_bytes + margin))
fit=$(awk -v free="$free" -v m="$margin" '2 * $2 + m <= free {n = $1} END {print n + 0}' <<< "$table")
gb() { awk -v b="$1" 'BEGIN { printf "%.1f GB", b / 1e9 }'; }
if [ "$need" -gt "$free" ]; then
    echo "convert_llama: $work has $(gb "$free") free; $layers layers of the $shape shape need $(gb "$need")" \
        "(the $(gb "$ckpt_bytes") checkpoint beside llama.cpp's bf16 GGUF of the same size, and 2 GiB to spare)." >&2
    echo "convert_llama: the largest that fits has $fit layers: SHAPE=$shape LAYERS=$fit bash $0 $*" >&2
    exit 1
fi

llama="${LLAMA_DIR:-$work/llama.cpp}"
llama_cpp_fetch "$llama"
build=$(llama_cpp_build "$llama" native llama-quantize)
python=$(llama_cpp_converter "$llama" "${VENV:-$work/converter-venv}")
swift build -c release >/dev/null
B=.build/release

: > "$work/times.txt"
timed() {  # label command... -> "label seconds peak_rss_kb" appended to $work/times.txt
    local label=$1; shift
    sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true
    /usr/bin/time -f "%e %M" -o "$work/time.txt" "$@" >"$work/$label.out" 2>"$work/$label.err" \
        || { echo "convert_llama: $label failed:" >&2; tail -5 "$work/$label.err" >&2; exit 1; }
    echo "$label $(cat "$work/time.txt")" >> "$work/times.txt"
}
size() { stat -c %s "$1"; }

echo "writing the $layers-layer $shape checkpoint ($(gb "$ckpt_bytes")) ..."
timed checkpoint python3 Benchmarks/make_checkpoint.py "$ckpt" --shape "$shape" --layers "$layers" --skewed \
    --tokenizer Tests/Fixtures/qwen-tokenizer
echo "ours: stconvert --type q4_0 ..."
timed ours_convert "$B/stconvert" "$ckpt" -o "$ours" --type q4_0 --quiet
ours_size=$(size "$ours"); rm -f "$ours"
echo "llama.cpp: convert_hf_to_gguf.py --outtype bf16 ..."
timed llama_convert env PYTHONPATH="$llama/gguf-py" "$python" "$llama/convert_hf_to_gguf.py" "$ckpt" \
    --outtype bf16 --outfile "$bf16"
rm -rf "$ckpt"
echo "llama.cpp: llama-quantize q4_0 ..."
timed llama_quantize "$build/bin/llama-quantize" --pure --token-embedding-type q4_0 --output-tensor-type q4_0 \
    "$bf16" "$q4" q4_0 "$threads"
bf16_size=$(size "$bf16"); q4_size=$(size "$q4"); rm -f "$bf16" "$q4"

python3 - "$work/times.txt" "$ckpt_bytes" "$ours_size" "$bf16_size" "$q4_size" "$threads" <<PY
import sys
times = {l.split()[0]: (float(l.split()[1]), int(l.split()[2]) / 1024) for l in open(sys.argv[1])}
ckpt, ours, bf16, q4, threads = (int(a) for a in sys.argv[2:7])
print("cpu: $(lscpu | sed -n 's/^Model name: *//p' | head -1), $(nproc) cores, threads $threads for llama-quantize;"
      " llama.cpp: llama-cpp-python $(cat "$llama/LLAMA_CPP_PYTHON_VERSION") sources, $(llama_cpp_flags native)")
print(f"model: $shape shape, $layers layers, checkpoint {ckpt / 1e9:.1f} GB bf16 (written in {times['checkpoint'][0]:.0f} s)")
for label, name in (("ours_convert", "ours: stconvert --type q4_0"), ("llama_convert", "llama.cpp: convert_hf_to_gguf bf16"),
                    ("llama_quantize", "llama.cpp: llama-quantize q4_0")):
    s, rss = times[label]
    print(f"  {name:38} {s:8.1f} s  {ckpt / 1e6 / s:6.0f} MB/s of checkpoint  peak RSS {rss:7.0f} MiB")
llama = times["llama_convert"][0] + times["llama_quantize"][0]
print(f"checkpoint to Q4_0: ours {times['ours_convert'][0]:.1f} s, llama.cpp {llama:.1f} s:"
      f" llama.cpp takes {llama / times['ours_convert'][0]:.2f}x as long")
print(f"peak RSS: ours {times['ours_convert'][1]:.0f} MiB, llama.cpp {max(times['llama_convert'][1], times['llama_quantize'][1]):.0f} MiB")
print(f"files: ours {ours / 1e9:.2f} GB; llama.cpp bf16 {bf16 / 1e9:.2f} GB, Q4_0 {q4 / 1e9:.2f} GB")
PY
