#!/usr/bin/env bash
# Expert streaming under a memory budget, on a Q4_0 package (best made from a checkpoint with
# skewed routing: python3 Benchmarks/make_checkpoint.py DIR --skewed, or the trained fixture with
# TEXT set). Run by hand:
#
#   [ROUNDS=3] [BUDGETS="1.5GiB 1GiB"] [TEXT=FILE] [N=128] bash Benchmarks/streaming_bench.sh MODEL-q4_0.stpk [THREADS]
#
# Each round runs every configuration once, in turn (the machines are shared and noisy, so the
# figures are medians over rounds of ratios taken within a round): unbudgeted, then at each
# budget the default (prefetch on, cross-layer prefetch auto), cross-layer on, cross-layer off,
# and at the last budget also no prefetch at all. Each run is `strun bench -p 16 -n N -r 3`:
# the median of three passes over the same cache, so the steady state once the cache is warm.
# TEXT: decode follows that text (strun bench --text-file) instead of greedy picks from random ids,
# so routing is the model's routing on real text.
#
# Before the runs it times direct random reads of the package's expert bundles (one at a time,
# and four at once, the cache's I/O threads), so the stall per token can be set against the raw
# time of the reads behind it.
set -euo pipefail
cd "$(dirname "$0")/.."
model="$1"; threads="${2:-2}"
rounds="${ROUNDS:-3}"; budgets="${BUDGETS:-1.5GiB 1GiB}"; tokens="${N:-128}"
swift build -c release >/dev/null
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
lscpu | grep -E '^Model name' | sed 's/  */ /g'
echo "kernels: $(.build/release/strun --version | grep kernels)"

.build/release/strun inspect "$model" --json > "$out/inspect.json"
python3 - "$model" "$out/inspect.json" > "$out/reads.json" <<'PY'
# Direct reads of random expert bundles: ms per bundle, one at a time and four at once.
import concurrent.futures, json, mmap, os, random, sys, time
path, manifest = sys.argv[1], json.load(open(sys.argv[2]))
bundles = manifest["expert_bundles"]
rng = random.Random(1)
sample = rng.sample(bundles, min(64, len(bundles)))
flags = os.O_RDONLY | getattr(os, "O_DIRECT", 0)
fd = os.open(path, flags)
size = max(b["length"] for b in bundles)
size = (size + 4095) // 4096 * 4096
def read(b, buf):
    os.preadv(fd, [buf], b["offset"])
bufs = [mmap.mmap(-1, size) for _ in range(4)]
t = time.perf_counter()
for b in sample:
    read(b, bufs[0])
one = (time.perf_counter() - t) / len(sample)
t = time.perf_counter()
with concurrent.futures.ThreadPoolExecutor(4) as pool:
    list(pool.map(lambda ib: read(ib[1], bufs[ib[0] % 4]), enumerate(sample)))
four = (time.perf_counter() - t) / len(sample)
print(json.dumps({"bundle_bytes": size, "ms_per_bundle": one * 1000, "ms_per_bundle_4_at_once": four * 1000,
                  "direct": bool(flags & getattr(os, "O_DIRECT", 0))}))
PY

text=(); [ -n "${TEXT:-}" ] && text=(--text-file "$TEXT")
run() {  # name, extra args...
    local name=$1; shift
    sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true
    .build/release/strun bench "$model" -p 16 -n "$tokens" -r 3 -t "$threads" --json "${text[@]}" "$@" > "$out/$name.json"
}
configs=(free)
last=""
for b in $budgets; do configs+=("$b|auto" "$b|on" "$b|off"); last=$b; done
configs+=("$last|none")
for r in $(seq 1 "$rounds"); do
    for c in "${configs[@]}"; do
        if [ "$c" = free ]; then run "free-$r"; continue; fi
        b=${c%|*}; mode=${c#*|}
        if [ "$mode" = none ]; then run "$b-$mode-$r" --memory-budget "$b" --no-prefetch
        else run "$b-$mode-$r" --memory-budget "$b" --cross-layer-prefetch "$mode"; fi
    done
done
python3 - "$out" "$threads" "$rounds" "${configs[@]}" <<'PY'
import json, os, statistics, sys
out, threads, rounds, configs = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]
reads = json.load(open(os.path.join(out, "reads.json")))
def load(name): return json.load(open(os.path.join(out, name + ".json")))
med = statistics.median
free = [load(f"free-{r}") for r in range(1, rounds + 1)]
print(f"{threads} threads, {rounds} rounds; direct reads of a {reads['bundle_bytes'] / 2**20:.2f} MiB bundle: "
      f"{reads['ms_per_bundle']:.2f} ms one at a time, {reads['ms_per_bundle_4_at_once']:.2f} ms each four at once")
print(f"unbudgeted: decode {med(x['decode_tokens_per_second'] for x in free):.2f} tokens/s (median), peak RSS {free[0]['peak_rss_bytes'] / 2**30:.2f} GiB")
labels = {"auto": "prefetch, cross-layer auto (default)", "on": "prefetch, cross-layer on", "off": "prefetch, cross-layer off", "none": "no prefetch"}
print(f"{'budget':8} {'configuration':38} {'tok/s':>7} {'x free':>7} {'hit':>6} {'MiB/tok':>8} {'stall ms':>8} {'raw ms':>7} {'stall/raw':>9}  speculative used/wasted  peak RSS")
for c in configs[1:]:
    b, mode = c.split("|")
    runs = [load(f"{b}-{mode}-{r}") for r in range(1, rounds + 1)]
    ratio = med(x["decode_tokens_per_second"] / f["decode_tokens_per_second"] for x, f in zip(runs, free))
    x = runs[len(runs) // 2]
    stall = med(r["io_stall_seconds_per_token"] for r in runs) * 1000
    per_token = med(r["expert_bytes_read_per_token"] for r in runs)
    raw = per_token / reads["bundle_bytes"] * reads["ms_per_bundle"]
    print(f"{b:8} {labels[mode]:38} {med(r['decode_tokens_per_second'] for r in runs):7.2f} {ratio:7.2f} "
          f"{med(r['expert_hit_rate'] for r in runs):6.1%} {per_token / 2**20:8.2f} {stall:8.2f} {raw:7.2f} "
          f"{(stall / raw if raw > 0 else float('nan')):9.2f}  {x['speculative_used']:>6}/{x['speculative_wasted']:<6}          "
          f"{max(r['peak_rss_bytes'] for r in runs) / 2**30:.3f} of {x['memory_budget_bytes'] / 2**30:.2f} GiB")
PY
