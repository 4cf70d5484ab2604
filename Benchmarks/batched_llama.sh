#!/usr/bin/env bash
# Many sequences in one forward step, ours against llama.cpp on the same model and threads:
#   ours:      strun bench PKG --parallel 1,2,4,8 -p 128 -n 64 --json
#   llama.cpp: llama-batched-bench -m OUR_EXPORT.gguf -c 4096 -b 512 -ub 512 -npp 128 -ntg 64 -npl 1,2,4,8
# Each sequence: a 128-token prompt, then 64 decoded tokens, every sequence decoding one token
# per step. llama.cpp runs on our GGUF export of the same package (`stconvert PKG -o X.gguf
# --dtype q4_0`), built from the pinned llama-cpp-python sdist (llama_cpp.sh). Run by hand,
# never by the tests:
#
#   [TIER=avx2] [ROUNDS=5] [COUNTS=1,2,4,8] bash Benchmarks/batched_llama.sh [WORK_DIR] [THREADS] [-- make_checkpoint.py options]
#   PKG=model-q4_0.stpk bash Benchmarks/batched_llama.sh WORK_DIR 2     # an existing Q4_0 package
#
# Without PKG it makes the checkpoint (default options `--skewed`, the 4B shape; `-- --shape 21b
# --layers 4 --skewed` for the 21B width) and converts it to Q4_0 in one step. TIER forces our
# kernel tier and builds llama.cpp to match (as compare_llama.sh). The engines alternate which
# goes first from round to round. Prints the CPU, both engines' tiers, then per count and round
# the aggregate decode and prompt tokens/s of each and their ratio, and the medians over rounds,
# with our weights read per decode step.
set -euo pipefail
cd "$(dirname "$0")/.."
work="${1:-Benchmarks/work}"; threads="${2:-2}"
shift $(( $# > 2 ? 2 : $# )) || true
[ "${1:-}" = "--" ] && shift
options=("$@"); [ ${#options[@]} -gt 0 ] || options=(--skewed)
mkdir -p "$work"; work=$(cd "$work" && pwd)
rounds="${ROUNDS:-3}"; counts="${COUNTS:-1,2,4,8}"
source Benchmarks/llama_cpp.sh   # pinned version, fetch and build

tier="${TIER:-}"
if [ -n "$tier" ]; then export STRUN_KERNELS="$tier"; else unset STRUN_KERNELS; fi
llama_build="${LLAMA_BUILD:-$([ "$tier" = avx2 ] && echo avx2 || echo native)}"

swift build -c release >/dev/null
strun=.build/release/strun
$strun --version >/dev/null  # a bad TIER fails here, before any work
pkg="${PKG:-}"
if [ -z "$pkg" ]; then
    pkg="$work/batched-q4_0.stpk"
    if [ ! -f "$pkg" ]; then
        [ -f "$work/checkpoint/config.json" ] \
            || python3 Benchmarks/make_checkpoint.py "$work/checkpoint" --tokenizer Tests/Fixtures/qwen-tokenizer "${options[@]}"
        .build/release/stconvert "$work/checkpoint" -o "$pkg" --type q4_0 --force --quiet
    fi
fi
gguf="$work/$(basename "$pkg" .stpk).gguf"
# --force-layout: a speed comparison does not care that llama.cpp would compute another layout differently.
[ -f "$gguf" ] && [ "$gguf" -nt "$pkg" ] || .build/release/stconvert "$pkg" -o "$gguf" --dtype q4_0 --force --force-layout >/dev/null

llama="${LLAMA_DIR:-$work/llama.cpp}"
llama_cpp_fetch "$llama"
build=$(llama_cpp_build "$llama" "$llama_build" llama-batched-bench)
echo "cpu: $(lscpu | sed -n 's/^Model name: *//p' | head -1); $(grep -m1 -o -w -E 'avx2|avx512f|avx512_vnni|avx_vnni' /proc/cpuinfo | sort -u | tr '\n' ' ')"
echo "ours: $($strun --version | sed -n 's/^kernels: //p')"
echo "llama.cpp: llama-cpp-python $(cat "$llama/LLAMA_CPP_PYTHON_VERSION" 2>/dev/null || echo '?') sources, build '$llama_build': $(llama_cpp_flags "$llama_build")"
echo "model: $pkg ($(du -h "$pkg" | cut -f1)), export $gguf; $threads threads; sequences $counts; each 128 prompt + 64 decoded tokens"

: > "$work/batched.jsonl"
for round in $(seq 1 "$rounds"); do
    order=(ours llama); [ $((round % 2)) -eq 0 ] && order=(llama ours)
    for engine in "${order[@]}"; do
        if [ "$engine" = ours ]; then
            $strun bench "$pkg" --parallel "$counts" -p 128 -n 64 -r 1 -t "$threads" --json > "$work/ours.json"
            python3 - "$work/ours.json" "$round" >> "$work/batched.jsonl" <<'EOF'
import json, sys
d = json.load(open(sys.argv[1]))
for r in d["runs"]:
    print(json.dumps({"engine": "ours", "round": int(sys.argv[2]), "n": r["sequences"],
                      "decode": r["aggregate_decode_tokens_per_second"], "prompt": r["aggregate_prompt_tokens_per_second"],
                      "bytes_per_step": r["weight_bytes_per_decode_step"], "experts_per_step": r["experts_per_decode_step"]}))
EOF
        else
            "$build/bin/llama-batched-bench" -m "$gguf" -c 4096 -b 512 -ub 512 -npp 128 -ntg 64 -npl "$counts" -t "$threads" \
                --output-format jsonl 2>"$work/llama-batched.err" > "$work/llama.jsonl"
            python3 - "$work/llama.jsonl" "$round" >> "$work/batched.jsonl" <<'EOF'
import json, sys
for line in open(sys.argv[1]):
    if not line.startswith("{"): continue
    r = json.loads(line)
    print(json.dumps({"engine": "llama", "round": int(sys.argv[2]), "n": r["pl"], "decode": r["speed_tg"], "prompt": r["speed_pp"]}))
EOF
        fi
    done
done

python3 - "$work/batched.jsonl" <<'EOF'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
ours = {(r["round"], r["n"]): r for r in rows if r["engine"] == "ours"}
llama = {(r["round"], r["n"]): r for r in rows if r["engine"] == "llama"}
counts = sorted({n for _, n in ours})
rounds = sorted({r for r, _ in ours})
print("\naggregate decode tokens/s, ours / llama.cpp, per round (prompt in brackets)")
for n in counts:
    cells = []
    for r in rounds:
        o, l = ours[(r, n)], llama[(r, n)]
        cells.append("%.1f/%.1f=%.2f [%.2f]" % (o["decode"], l["decode"], o["decode"] / l["decode"], o["prompt"] / l["prompt"]))
    print("N=%d  " % n + "  ".join(cells))
print("\nmedians over %d rounds" % len(rounds))
print("   N  ours decode  llama decode  ratio  ours/own N=1  llama/own N=1  prompt ratio  ours GiB/step  experts/step")
one = {r: ours[(r, counts[0])]["decode"] for r in rounds}
lone = {r: llama[(r, counts[0])]["decode"] for r in rounds}
for n in counts:
    med = lambda f: statistics.median(f(r) for r in rounds)
    print("%4d %12.1f %13.1f %6.2f %13.2f %14.2f %13.2f %14.3f %13.1f" % (
        n, med(lambda r: ours[(r, n)]["decode"]), med(lambda r: llama[(r, n)]["decode"]),
        med(lambda r: ours[(r, n)]["decode"] / llama[(r, n)]["decode"]),
        med(lambda r: ours[(r, n)]["decode"] / one[r]), med(lambda r: llama[(r, n)]["decode"] / lone[r]),
        med(lambda r: ours[(r, n)]["prompt"] / llama[(r, n)]["prompt"]),
        med(lambda r: ours[(r, n)]["bytes_per_step"]) / 2**30, med(lambda r: ours[(r, n)]["experts_per_step"])))
EOF
