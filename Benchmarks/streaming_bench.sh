#!/usr/bin/env bash
# Expert streaming under a memory budget, on a Q4_0 package (best made from a checkpoint with
# skewed routing: python3 Benchmarks/make_checkpoint.py DIR --skewed). Run by hand:
#
#   bash Benchmarks/streaming_bench.sh MODEL-q4_0.stpk [THREADS] [-p 16] [-n 64]
#
# Runs strun bench unbudgeted, at 1.5 GiB and 1 GiB, and at 1 GiB without prefetch, dropping the
# page cache before each run where allowed, and prints decode speed as ratios of the unbudgeted run
# and of the no-prefetch run, peak RSS against the budget, hit rate, bytes read and I/O stall per token.
set -euo pipefail
cd "$(dirname "$0")/.."
model="$1"; threads="${2:-2}"; shift $(( $# > 2 ? 2 : $# )) || true
swift build -c release >/dev/null
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
run() {  # name, extra args...
    local name=$1; shift
    sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true
    .build/release/strun bench "$model" -p 16 -n 64 -r 1 -t "$threads" --json "$@" > "$out/$name.json"
}
run free
run b15 --memory-budget 1.5GiB
run b10 --memory-budget 1GiB
run b10np --memory-budget 1GiB --no-prefetch
python3 - "$out" "$threads" <<'PY'
import json, os, sys
out, threads = sys.argv[1], sys.argv[2]
r = {n: json.load(open(os.path.join(out, n + ".json"))) for n in ["free", "b15", "b10", "b10np"]}
base = r["free"]["decode_tokens_per_second"]
print(f"{threads} threads; decode tokens/s; unbudgeted {base:.2f}, peak RSS {r['free']['peak_rss_bytes'] / 2**30:.2f} GiB")
for n, label in [("b15", "1.5 GiB"), ("b10", "1 GiB"), ("b10np", "1 GiB, no prefetch")]:
    x = r[n]
    print(f"{label:20} {x['decode_tokens_per_second']:7.2f} tok/s = {x['decode_tokens_per_second'] / base:.2f} x unbudgeted; "
          f"peak RSS {x['peak_rss_bytes'] / 2**30:.3f} GiB of {x['memory_budget_bytes'] / 2**30:.2f}; cache {x['expert_cache_bytes'] / 2**20:.0f} MiB; "
          f"hit rate {x['expert_hit_rate']:.1%}; {x['expert_bytes_read_per_token'] / 2**20:.1f} MiB read/token; "
          f"stall {x['io_stall_seconds_per_token'] * 1000:.1f} ms/token; direct I/O {x['direct_io']}")
print(f"prefetch gain at 1 GiB: {r['b10']['decode_tokens_per_second'] / r['b10np']['decode_tokens_per_second']:.2f} x")
PY
