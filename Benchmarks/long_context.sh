#!/usr/bin/env bash
# Long contexts, ours against llama.cpp on the same model and threads, for each prompt length P:
#   prompt:          strun bench PKG -p P -n N     against  llama-bench -m OUR_EXPORT.gguf -p P -n 0
#   decode at depth: (the same strun bench run)    against  llama-bench -m OUR_EXPORT.gguf -p 0 -n N -d P
# strun bench decodes N tokens right after its P-token prompt, so llama-bench's generation test
# runs at depth P (-d). Both use their default KV cache (f16; ours --kv-type, llama.cpp -ctk/-ctv
# f16); KV=q8_0 or KV=f32 sets both. llama.cpp runs on our GGUF export of the same package
# (`stconvert PKG -o X.gguf --dtype q4_0`), built from the pinned llama-cpp-python sdist
# (llama_cpp.sh). Run by hand, never by the tests:
#
#   PKG=model-q4_0.stpk [TIER=avx2] [ROUNDS=3] [PROMPTS="512 2048 4000"] [N=32] [KV=f16] \
#       bash Benchmarks/long_context.sh [WORK_DIR] [THREADS]
#
# Without PKG it makes the checkpoint (`--skewed`, the 4B shape; `-- --shape 21b --layers 4
# --skewed` after THREADS for the 21B width) and converts it to Q4_0 in one step. TIER forces
# our kernel tier and builds llama.cpp to match (as compare_llama.sh). The engines alternate
# which goes first from round to round; llama-bench runs one repetition after its warm-up, strun
# bench two (the median it reports of two is the faster; a P = 4000 prompt takes tens of seconds),
# and the rounds give the medians. Prints the CPU, both engines' tiers, each
# round's ratios, and per P the medians: prompt tokens/s and decode tokens/s at depth P of each,
# their ratios, and the bytes of keys and values each engine reads per decoded token there.
set -euo pipefail
cd "$(dirname "$0")/.."
work="${1:-Benchmarks/work}"; threads="${2:-2}"
shift $(( $# > 2 ? 2 : $# )) || true
[ "${1:-}" = "--" ] && shift
options=("$@"); [ ${#options[@]} -gt 0 ] || options=(--skewed)
mkdir -p "$work"; work=$(cd "$work" && pwd)
rounds="${ROUNDS:-3}"; prompts="${PROMPTS:-512 2048 4000}"; n="${N:-32}"; kv="${KV:-f16}"
source Benchmarks/llama_cpp.sh   # pinned version, fetch and build

tier="${TIER:-}"
if [ -n "$tier" ]; then export STRUN_KERNELS="$tier"; else unset STRUN_KERNELS; fi
llama_build="${LLAMA_BUILD:-$([ "$tier" = avx2 ] && echo avx2 || echo native)}"

swift build -c release >/dev/null
strun=.build/release/strun
$strun --version >/dev/null  # a bad TIER fails here, before any work
pkg="${PKG:-}"
if [ -z "$pkg" ]; then
    pkg="$work/long-q4_0.stpk"
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
build=$(llama_cpp_build "$llama" "$llama_build" llama-bench)
echo "cpu: $(lscpu | sed -n 's/^Model name: *//p' | head -1); $(grep -m1 -o -w -E 'avx2|avx512f|avx512_vnni|avx_vnni' /proc/cpuinfo | sort -u | tr '\n' ' ')"
echo "ours: $($strun --version | sed -n 's/^kernels: //p')"
echo "llama.cpp: llama-cpp-python $(cat "$llama/LLAMA_CPP_PYTHON_VERSION" 2>/dev/null || echo '?') sources, build '$llama_build': $(llama_cpp_flags "$llama_build")"
echo "model: $pkg ($(du -h "$pkg" | cut -f1)), export $gguf; $threads threads; KV cache $kv in both; prompts $prompts; $n decoded tokens after each"
$strun inspect "$pkg" --json > "$work/long-inspect.json"

results="$work/long_context.jsonl"
: > "$results"
for round in $(seq 1 "$rounds"); do
    order=(ours llama); [ $((round % 2)) -eq 0 ] && order=(llama ours)
    for p in $prompts; do
        for engine in "${order[@]}"; do
            if [ "$engine" = ours ]; then
                $strun bench "$pkg" -p "$p" -n "$n" -r 2 -t "$threads" --context $((p + n)) --kv-type "$kv" --json > "$work/long-ours.json"
                python3 - "$work/long-ours.json" "$round" "$p" >> "$results" <<'EOF'
import json, sys
d = json.load(open(sys.argv[1]))
print(json.dumps({"engine": "ours", "round": int(sys.argv[2]), "p": int(sys.argv[3]), "prompt": d["prompt_tokens_per_second"],
                  "decode": d["decode_tokens_per_second"], "kv_read": d["kv_bytes_read_per_decoded_token"], "tier": d["kernels"]}))
EOF
            else
                "$build/bin/llama-bench" -m "$gguf" -p "$p" -n 0 -r 1 -t "$threads" -ctk "$kv" -ctv "$kv" -o json \
                    > "$work/long-llama-pp.json" 2>>"$work/long-llama.err"
                "$build/bin/llama-bench" -m "$gguf" -p 0 -n "$n" -d "$p" -r 1 -t "$threads" -ctk "$kv" -ctv "$kv" -o json \
                    > "$work/long-llama-tg.json" 2>>"$work/long-llama.err"
                python3 - "$work/long-llama-pp.json" "$work/long-llama-tg.json" "$round" "$p" >> "$results" <<'EOF'
import json, sys
pp, tg = json.load(open(sys.argv[1]))[0], json.load(open(sys.argv[2]))[0]
print(json.dumps({"engine": "llama", "round": int(sys.argv[3]), "p": int(sys.argv[4]), "prompt": pp["avg_ts"], "decode": tg["avg_ts"]}))
EOF
            fi
        done
        python3 - "$results" "$round" "$p" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
r, p = int(sys.argv[2]), int(sys.argv[3])
o = next(x for x in rows if x["engine"] == "ours" and x["round"] == r and x["p"] == p)
l = next(x for x in rows if x["engine"] == "llama" and x["round"] == r and x["p"] == p)
print(f"round {r} P={p}: prompt {o['prompt']:.1f} / {l['prompt']:.1f} = {o['prompt'] / l['prompt']:.2f}, "
      f"decode at depth {o['decode']:.1f} / {l['decode']:.1f} = {o['decode'] / l['decode']:.2f}")
EOF
    done
done

python3 - "$results" "$work/long-inspect.json" "$kv" "$n" <<'EOF'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
config = json.load(open(sys.argv[2]))["config"]
kv, n = sys.argv[3], int(sys.argv[4])
# llama.cpp's cache: every layer keeps keys and values of every position at these depths (its
# hard-coded window for this architecture is 4096), in -ctk/-ctv's bytes per value.
per_value = {"f32": 4, "f16": 2, "q8_0": 34 / 32}[kv]
llama_per_token = config["num_hidden_layers"] * 2 * config["num_key_value_heads"] * config["head_dim"] * per_value
def mib(b): return f"{b / 2**20:.1f} MiB"
print()
print("| prompt length P | prompt tokens/s, ours / llama.cpp | decode at depth P, ours / llama.cpp | KV read per decoded token, ours / llama.cpp |")
print("|---|---|---|---|")
for p in sorted({x["p"] for x in rows}):
    o = [x for x in rows if x["engine"] == "ours" and x["p"] == p]
    l = [x for x in rows if x["engine"] == "llama" and x["p"] == p]
    pairs = [(a, next(b for b in l if b["round"] == a["round"])) for a in o]
    prompt_ratio = statistics.median(a["prompt"] / b["prompt"] for a, b in pairs)
    decode_ratio = statistics.median(a["decode"] / b["decode"] for a, b in pairs)
    med = lambda xs, k: statistics.median(x[k] for x in xs)
    # Decode reads on average the cache at depth P + n/2 (what strun bench reports); llama.cpp's likewise.
    print(f"| {p} | {med(o, 'prompt'):.1f} / {med(l, 'prompt'):.1f} = {prompt_ratio:.2f} | "
          f"{med(o, 'decode'):.1f} / {med(l, 'decode'):.1f} = {decode_ratio:.2f} | "
          f"{mib(o[0]['kv_read'])} / {mib(llama_per_token * (p + n // 2))} |")
print(f"\n(ratios: medians of the {len({x['round'] for x in rows})} rounds' paired ratios; tokens/s: medians of each engine's runs)")
EOF
