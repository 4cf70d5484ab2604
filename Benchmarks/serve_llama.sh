#!/usr/bin/env bash
# Serving, ours against llama-server on the same model, threads and load:
#   ours:      strun serve PKG --parallel N --context 2048 -t THREADS
#   llama.cpp: llama-server -m OUR_EXPORT.gguf -np N -c 2048*N -t THREADS -tb THREADS
# under the same load generator (serve_load.py): N clients, each sending REQUESTS streamed chat
# requests in turn (its own ~100-token prompt, greedy, ignore_eos, MAX_TOKENS tokens each), at
# N = 1, 4 and 8 clients. Per engine and N: aggregate generated tokens/s, median and p95 time to
# first token, median inter-token latency, each request's decode rate, and the server's peak
# RSS. The engines alternate which goes first from round to round; medians over rounds are
# printed at the end, with `strun bench`'s decode rate measured in the same run (the 1-client
# goal: within 10% of it) and ours under --memory-budget (BUDGET, default 1GiB) at 1 and 4
# clients, and the time to first token of each turn of a five-turn chat with and without the
# prompt cache (--no-prompt-cache). Servers listen on 127.0.0.1 only. Run by hand, never by the
# tests:
#
#   PKG=model-q4_0.stpk [ROUNDS=3] [CLIENTS="1 4 8"] [REQUESTS=3] [MAX_TOKENS=64] [TIER=avx2] \
#       bash Benchmarks/serve_llama.sh [WORK_DIR] [THREADS]
#
# llama-server is built from the pinned llama-cpp-python sdist (llama_cpp.sh) in LLAMA_DIR
# (default WORK_DIR/llama.cpp); the model is our GGUF export of PKG (`stconvert PKG -o X.gguf`).
set -euo pipefail
cd "$(dirname "$0")/.."
work="${1:-Benchmarks/work}"; threads="${2:-2}"
mkdir -p "$work"; work=$(cd "$work" && pwd)
rounds="${ROUNDS:-3}"; clients_list="${CLIENTS:-1 4 8}"; requests="${REQUESTS:-3}"; max_tokens="${MAX_TOKENS:-64}"
budget="${BUDGET:-1GiB}"; context=2048
pkg="${PKG:?set PKG to a Q4_0 package}"
source Benchmarks/llama_cpp.sh

tier="${TIER:-}"
if [ -n "$tier" ]; then export STRUN_KERNELS="$tier"; else unset STRUN_KERNELS; fi
llama_build="${LLAMA_BUILD:-$([ "$tier" = avx2 ] && echo avx2 || echo native)}"
swift build -c release >/dev/null
strun=.build/release/strun
gguf="$work/$(basename "$pkg" .stpk).gguf"
[ -f "$gguf" ] && [ "$gguf" -nt "$pkg" ] || .build/release/stconvert "$pkg" -o "$gguf" --dtype q4_0 --force --force-layout >/dev/null
llama="${LLAMA_DIR:-$work/llama.cpp}"
llama_cpp_fetch "$llama"
build=$(llama_cpp_build "$llama" "$llama_build" llama-server)

echo "cpu: $(lscpu | sed -n 's/^Model name: *//p' | head -1); $(grep -m1 -o -w -E 'avx2|avx512f|avx512_vnni|avx_vnni' /proc/cpuinfo | sort -u | tr '\n' ' ')"
echo "ours: $($strun --version | sed -n 's/^kernels: //p')"
echo "llama.cpp: llama-cpp-python $(cat "$llama/LLAMA_CPP_PYTHON_VERSION" 2>/dev/null || echo '?') sources, build '$llama_build': $(llama_cpp_flags "$llama_build")"
echo "model: $pkg ($(du -h "$pkg" | cut -f1)), export $gguf; $threads threads; clients $clients_list; $requests requests each of $max_tokens tokens; context $context per sequence"

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'; }
server_pid=""
stop_server() {
    if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then
        kill -TERM "$server_pid"; wait "$server_pid" 2>/dev/null || true
    fi
    server_pid=""
}
trap stop_server EXIT

# start ENGINE N [extra options] -> sets server_pid and url, waits for /health
start() {
    local engine=$1 n=$2; shift 2
    local port; port=$(free_port)
    if [ "$engine" = ours ]; then
        $strun serve "$pkg" --host 127.0.0.1 --port "$port" --parallel "$n" --queue 64 --context "$context" -t "$threads" "$@" \
            >"$work/serve-ours.log" 2>&1 &
    else
        "$build/bin/llama-server" -m "$gguf" --host 127.0.0.1 --port "$port" -np "$n" -c $((context * n)) -t "$threads" -tb "$threads" \
            --no-webui >"$work/serve-llama.log" 2>&1 &
    fi
    server_pid=$!
    url="http://127.0.0.1:$port"
    for _ in $(seq 1 600); do
        [ "$(curl -s -o /dev/null -w '%{http_code}' "$url/health" || true)" = 200 ] && return 0
        kill -0 "$server_pid" 2>/dev/null || { echo "$engine server exited; see $work/serve-$engine.log" >&2; exit 1; }
        sleep 0.2
    done
    echo "$engine server not ready in 120 s" >&2; exit 1
}

# measure ENGINE N ROUND [label] [extra server options]: one load run, one JSON line
measure() {
    local engine=$1 n=$2 round=$3 label=${4:-$1}; shift 4 || shift $#
    start "$engine" "$n" "$@"
    local out
    out=$(python3 Benchmarks/serve_load.py "$url" --clients "$n" --requests "$requests" --max-tokens "$max_tokens")
    local rss; rss=$(awk '/^VmHWM:/ { print $2 }' "/proc/$server_pid/status")
    stop_server
    python3 -c 'import json, sys; d = json.loads(sys.argv[1]); d.update(engine=sys.argv[2], round=int(sys.argv[3]), peak_rss_mib=int(sys.argv[4]) // 1024); print(json.dumps(d))' \
        "$out" "$label" "$round" "$rss" | tee -a "$work/serve.jsonl"
}

: > "$work/serve.jsonl"
# `strun bench`'s decode rate, measured in every round beside the 1-client runs (the machine is noisy).
bench_decode() {
    $strun bench "$pkg" -p 128 -n "$max_tokens" -t "$threads" --json \
        | python3 -c 'import json, sys; print(json.dumps({"engine": "bench", "clients": 1, "round": int(sys.argv[1]), "decode": json.load(sys.stdin)["decode_tokens_per_second"]}))' "$1" \
        | tee -a "$work/serve.jsonl"
}
for round in $(seq 1 "$rounds"); do
    bench_decode "$round"
    order=(ours llama); [ $((round % 2)) -eq 0 ] && order=(llama ours)
    for n in $clients_list; do
        for engine in "${order[@]}"; do measure "$engine" "$n" "$round" "$engine"; done
    done
done
for n in 1 4; do measure ours "$n" 1 "ours-budget" --memory-budget "$budget"; done
# The prompt cache: time to first token of each turn of a five-turn chat, with and without it.
for cache in on off; do
    start ours 1 $([ $cache = off ] && echo --no-prompt-cache)
    python3 Benchmarks/serve_load.py "$url" --chat-turns 5 --max-tokens "$max_tokens" | tee "$work/turns-$cache.json"
    stop_server
done

python3 - "$work/serve.jsonl" "$budget" <<'EOF'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
bench = statistics.median(r["decode"] for r in rows if r["engine"] == "bench")
def med(engine, n, key):
    values = [r[key] for r in rows if r["engine"] == engine and r["clients"] == n and r.get(key) is not None]
    return statistics.median(values) if values else float("nan")
print("\nmedians over rounds, strun serve against llama-server:")
print("| clients | ours tok/s | llama tok/s | ratio | TTFT median ours / llama (ms) | TTFT p95 ours / llama | ITL median ours / llama (ms) | peak RSS ours / llama (MiB) |")
print("|---|---|---|---|---|---|---|---|")
for n in sorted({r["clients"] for r in rows if r["engine"] == "ours"}):
    o, l = med("ours", n, "aggregate_tokens_per_second"), med("llama", n, "aggregate_tokens_per_second")
    print(f"| {n} | {o:.1f} | {l:.1f} | **{o / l:.2f}** | {med('ours', n, 'ttft_median_ms'):.0f} / {med('llama', n, 'ttft_median_ms'):.0f} "
          f"| {med('ours', n, 'ttft_p95_ms'):.0f} / {med('llama', n, 'ttft_p95_ms'):.0f} "
          f"| {med('ours', n, 'itl_median_ms'):.1f} / {med('llama', n, 'itl_median_ms'):.1f} "
          f"| {med('ours', n, 'peak_rss_mib'):.0f} / {med('llama', n, 'peak_rss_mib'):.0f} |")
print("\nper round, ours / llama-server aggregate tokens/s (paired: the same round, one after the other):")
for n in sorted({r["clients"] for r in rows if r["engine"] == "ours"}):
    ratios = []
    for rnd in sorted({r["round"] for r in rows}):
        o = [r["aggregate_tokens_per_second"] for r in rows if r["engine"] == "ours" and r["clients"] == n and r["round"] == rnd]
        l = [r["aggregate_tokens_per_second"] for r in rows if r["engine"] == "llama" and r["clients"] == n and r["round"] == rnd]
        if o and l:
            ratios.append(o[0] / l[0])
    print(f"  {n} clients: {' '.join(f'{x:.2f}' for x in ratios)}; median {statistics.median(ratios):.2f}")
served = {r["round"]: r["decode_tokens_per_second_median"] for r in rows if r["engine"] == "ours" and r["clients"] == 1}
benched = {r["round"]: r["decode"] for r in rows if r["engine"] == "bench"}
pairs = [served[k] / benched[k] for k in sorted(served) if k in benched]
print(f"  1 client, served decode / strun bench decode: {' '.join(f'{x:.2f}' for x in pairs)}; median {statistics.median(pairs):.2f}")
one = med("ours", 1, "decode_tokens_per_second_median")
print(f"\n1 client: each request decodes at {one:.1f} tokens/s served (median), strun bench -p 128 {bench:.1f} (median of rounds): {one / bench:.2f}")
for r in rows:
    if r["engine"] == "ours-budget":
        print(f"--memory-budget {sys.argv[2]}, {r['clients']} clients: {r['aggregate_tokens_per_second']:.1f} tokens/s, "
              f"TTFT median {r['ttft_median_ms']:.0f} ms, ITL median {r['itl_median_ms']:.1f} ms, peak RSS {r['peak_rss_mib']} MiB")
import os
folder = os.path.dirname(sys.argv[1])
turns = {c: json.load(open(os.path.join(folder, f"turns-{c}.json")))["turns"] for c in ("on", "off")}
print("\nfive-turn chat, time to first token per turn (ms), prompt cache on / off:")
for on, off in zip(turns["on"], turns["off"]):
    print(f"  turn {on['turn']}: {on['prompt_tokens']} prompt tokens, {on['cached_tokens']} cached: {on['ttft_ms']:.0f} / {off['ttft_ms']:.0f}")
EOF
