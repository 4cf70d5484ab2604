#!/usr/bin/env bash
# SmallThinker-21B-shaped (52 layers, hidden 2560, 64 experts top-6, skewed routing) under memory
# caps, ours against llama.cpp, on this machine. Run by hand, never by the tests:
#
#   [LAYERS=52] [ROUNDS=2] [CAPS="8GiB 6GiB 4GiB"] [P=128] [N=32] [KEEP_CHECKPOINT=1] \
#       bash Benchmarks/capped_bench.sh [WORK_DIR] [THREADS]
#
# The pipeline keeps the disk small: make_checkpoint.py (bf16, about 42 GB at 52 layers) ->
# `stconvert --type q4_0` in one step (no float package) -> the checkpoint is deleted -> our GGUF
# export of the Q4_0 package for llama.cpp (same shapes and types, no bf16 GGUF). Before it starts
# it checks the free disk against what the steps still to do need and refuses, saying how much,
# and the largest layer count that would fit, when it is short. With LAYERS below 52 every cap is
# scaled by the expert bytes: the cap's share left for experts in the full model (cap minus the
# full model's non-expert bytes) times LAYERS/52, plus this model's non-expert bytes (printed).
#
# Each round runs, one after another: strun bench unbudgeted and llama-bench in memory (no cap),
# and with --repack 0, then at each cap, under Benchmarks/memcap.c (which locks all memory but the
# cap, so the process and the page cache together get about the cap, alike for both engines):
# strun with --memory-budget CAP with prefetch and with --no-prefetch, and llama-bench with its
# default mmap and --repack 0 (its default copies the Q4_0 weights into anonymous memory, all
# 11.7 GB of them, and is killed under 8 GiB; LLAMA_CAPPED_DEFAULT=1 runs it anyway), one
# repetition after its warmup, each at most LLAMA_TIMEOUT seconds (900).
# The page cache is dropped before each capped run; before an in-memory run it holds that
# engine's whole file. strun bench is `-p P -n N -r 3` (the median of three passes over one
# expert cache: its steady state); llama-bench is `-p P -n 0` (prompt) and
# `-p 0 -n N -d P` (decode at the same depth as ours), `-r 2`. Prints tokens/s, the ratios of
# each round's pairs and their median, hit rate, MiB read and I/O stall per token, peak RSS of
# every run against its cap, and conversion and export time and peak RSS.
set -euo pipefail
cd "$(dirname "$0")/.."
work="${1:-Benchmarks/work-21b}"; threads="${2:-2}"
layers="${LAYERS:-52}"; rounds="${ROUNDS:-2}"; caps="${CAPS:-8GiB 6GiB 4GiB}"
P="${P:-128}"; N="${N:-32}"
mkdir -p "$work"; work=$(cd "$work" && pwd)
source Benchmarks/llama_cpp.sh

ckpt="$work/checkpoint-$layers"; stpk="$work/ours-$layers-q4_0.stpk"; gguf="$work/ours-$layers-q4_0.gguf"
[ -f "$ckpt/model.safetensors.index.json" ] || rm -rf "$ckpt"   # written last: anything else is partial

# Sizes (bytes) from make_checkpoint.py's table: checkpoint (bf16), Q4_0 package and GGUF, and the
# package's non-expert part; and the most layers whose checkpoint and package fit side by side in
# the free space. Then what the remaining steps need.
margin=$((2 << 30))
free=$(($(df -P -B1 "$work" | awk 'NR==2 {print $4}')))
table=$(python3 Benchmarks/make_checkpoint.py --shape 21b --skewed --sizes --layers $((layers > 52 ? layers : 52)))
read -r _ ckpt_bytes pkg_bytes nonexpert_bytes < <(awk -v l="$layers" '$1 == l' <<< "$table")
read -r _ _ _ full_nonexpert_bytes < <(awk '$1 == 52' <<< "$table")
fit=$(awk -v free="$free" -v m="$margin" '$1 <= 52 && $2 + $3 + m <= free {n = $1} END {print n + 0}' <<< "$table")
need=0
if [ ! -f "$gguf" ]; then
    if [ -f "$stpk" ]; then need=$pkg_bytes                          # the GGUF
    elif [ -d "$ckpt" ]; then need=$pkg_bytes                        # the package; the GGUF after the checkpoint goes
    else need=$((ckpt_bytes + pkg_bytes)); fi                        # checkpoint and package side by side
fi
gb() { awk -v b="$1" 'BEGIN { printf "%.1f GB", b / 1e9 }'; }
if [ "$need" -gt 0 ] && [ $((need + margin)) -gt "$free" ]; then
    echo "capped_bench: $work has $(gb "$free") free; $layers layers need $(gb $((need + margin)))" \
        "(checkpoint $(gb "$ckpt_bytes") and Q4_0 package $(gb "$pkg_bytes") side by side, then the GGUF of" \
        "$(gb "$pkg_bytes") once the checkpoint is deleted, and 2 GiB to spare)." >&2
    echo "capped_bench: the largest model that fits has $fit layers: LAYERS=$fit bash $0 $*" \
        "(caps are then scaled by the expert bytes)" >&2
    exit 1
fi

swift build -c release >/dev/null
B=.build/release
timed() {  # label command... -> "label seconds peak_rss_kb" in $work/times-$layers.txt
    local label=$1; shift
    /usr/bin/time -f "%e %M" -o "$work/time.txt" "$@" >"$work/$label.out" 2>"$work/$label.err" \
        || { echo "capped_bench: $label failed:" >&2; tail -5 "$work/$label.err" >&2; exit 1; }
    grep -v "^$label " "$work/times-$layers.txt" 2>/dev/null > "$work/times.tmp" || true
    echo "$label $(cat "$work/time.txt")" >> "$work/times.tmp"; mv "$work/times.tmp" "$work/times-$layers.txt"
}
if [ ! -f "$stpk" ] && [ ! -f "$gguf" ]; then
    if [ ! -d "$ckpt" ]; then
        echo "writing the $layers-layer checkpoint ($(gb "$ckpt_bytes")) ..."
        timed make_checkpoint python3 Benchmarks/make_checkpoint.py "$ckpt" --shape 21b --layers "$layers" --skewed \
            --tokenizer Tests/Fixtures/qwen-tokenizer
    fi
    echo "converting to Q4_0 in one step ..."
    sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true
    timed convert "$B/stconvert" "$ckpt" -o "$stpk" --type q4_0 --quiet
fi
if [ -d "$ckpt" ] && [ -f "$stpk" ] && [ -z "${KEEP_CHECKPOINT:-}" ]; then rm -rf "$ckpt"; fi
if [ ! -f "$gguf" ]; then
    echo "exporting the GGUF for llama.cpp ..."
    timed export "$B/stconvert" "$stpk" -o "$gguf" --quiet
fi

llama="${LLAMA_DIR:-$work/llama.cpp}"
llama_cpp_fetch "$llama"
build=$(llama_cpp_build "$llama" native llama-bench)
cc -O2 Benchmarks/memcap.c -o "$work/memcap"
"$B/strun" inspect "$stpk" --json > "$work/inspect-$layers.json"

# The caps this model gets (scaled by the expert bytes below 52 layers), in bytes.
scaled=()
for c in $caps; do
    bytes=$(python3 - "$c" "$layers" "$nonexpert_bytes" "$full_nonexpert_bytes" <<'PY'
import re, sys
text, L, nonexpert, full_nonexpert = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
m = re.fullmatch(r"([0-9.]+)(GiB|MiB)", text)
if not m: sys.exit(f"caps are like 8GiB or 512MiB (got {text})")
cap = float(m[1]) * (2**30 if m[2] == "GiB" else 2**20)
print(int(cap if L == 52 else nonexpert + (cap - full_nonexpert) * L / 52))
PY
)
    scaled+=("$c=$bytes")
done

{
    echo "cpu: $(lscpu | sed -n 's/^Model name: *//p' | head -1); $(grep -o -w -E 'avx2|avx512f|avx512_vnni' /proc/cpuinfo | sort -u | tr '\n' ' ')"
    echo "memory: $(awk '/MemTotal/ {printf "%.1f GiB", $2 / 1048576}' /proc/meminfo); threads $threads"
    echo "ours: $("$B/strun" --version | sed -n 's/^kernels: //p')"
    echo "llama.cpp: llama-cpp-python $(cat "$llama/LLAMA_CPP_PYTHON_VERSION" 2>/dev/null || echo '?') sources, $(llama_cpp_flags native)"
} > "$work/engines.txt"

# Before a capped run the page cache is dropped (memcap then leaves the cap for the run and the
# cache alike); before an in-memory run it is dropped and then holds that engine's whole file,
# as a machine that has the model in memory would (the other engine's file is not cached beside it).
drop() { sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true; }
prepare() { drop; [ -n "$2" ] || cat "$1" > /dev/null; }  # file, cap
ours() {  # name, [cap bytes], strun bench options...
    local name=$1 cap=$2; shift 2
    local wrap=(); [ -n "$cap" ] && wrap=("$work/memcap" "$cap" --)
    prepare "$stpk" "$cap"
    "${wrap[@]}" "$B/strun" bench "$stpk" -p "$P" -n "$N" -r 3 -t "$threads" --json "$@" \
        > "$work/r/$name.json" 2> "$work/r/$name.err" || { echo "capped_bench: $name failed:" >&2; tail -3 "$work/r/$name.err" >&2; }
}
theirs() {  # name, [cap bytes], llama-bench options...
    local name=$1 cap=$2; shift 2
    local wrap=() reps=2
    # Under a cap: memcap outside, a time limit, and /usr/bin/time inside (so the peak RSS is
    # llama-bench's, not memcap's locked memory); one measured repetition after its warmup.
    [ -n "$cap" ] && { wrap=("$work/memcap" "$cap" -- timeout "${LLAMA_TIMEOUT:-900}"); reps=1; }
    for kind in pp tg; do
        local test=(-p "$P" -n 0); [ $kind = tg ] && test=(-p 0 -n "$N" -d "$P")
        prepare "$gguf" "$cap"
        "${wrap[@]}" /usr/bin/time -f "%M" -o "$work/r/$name-$kind.rss" "$build/bin/llama-bench" -m "$gguf" "${test[@]}" \
            -t "$threads" -r $reps -o json "$@" > "$work/r/$name-$kind.json" 2> "$work/r/$name-$kind.err" \
            || echo "llama-bench $name $kind: exit $? ($(grep -h -o -E 'Killed|terminated by signal [0-9]+' "$work/r/$name-$kind.err" \
                "$work/r/$name-$kind.rss" 2>/dev/null | head -1))" | tee "$work/r/$name-$kind.failed" >&2
    done
}
# REPORT_ONLY=1 prints the report of the runs already in WORK/r.
[ -n "${REPORT_ONLY:-}" ] && rounds_to_run=0 || { rounds_to_run=$rounds; mkdir -p "$work/r"; rm -f "$work"/r/*; }
for r in $(seq "$rounds_to_run"); do
    echo "round $r of $rounds ..."
    ours "free-$r" ""
    theirs "llama-free-$r" ""
    theirs "llama-norepack-free-$r" "" --repack 0
    for s in "${scaled[@]}"; do
        c=${s%%=*}; bytes=${s#*=}
        ours "$c-prefetch-$r" "$bytes" --memory-budget "$bytes"
        ours "$c-noprefetch-$r" "$bytes" --memory-budget "$bytes" --no-prefetch
        # llama.cpp's default repacks its Q4_0 weights into anonymous memory (11.7 GB here), so
        # under a cap it is killed (seen at 8 GiB); --repack 0 keeps them in the mapping.
        # LLAMA_CAPPED_ROUNDS=K runs llama.cpp under caps in the first K rounds only (it is slow there).
        [ "$r" -le "${LLAMA_CAPPED_ROUNDS:-$rounds}" ] || continue
        [ -n "${LLAMA_CAPPED_DEFAULT:-}" ] && theirs "llama-$c-$r" "$bytes"
        theirs "llama-norepack-$c-$r" "$bytes" --repack 0
    done
done

python3 - "$work" "$layers" "$rounds" "${scaled[@]}" <<'PY'
import json, os, statistics, sys
work, layers, rounds, scaled = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]
R = range(1, rounds + 1)
med = statistics.median
def load(name):
    try:
        return json.load(open(os.path.join(work, "r", name + ".json")))
    except (OSError, ValueError):
        return None
def llama(name, kind):
    x = load(f"{name}-{kind}")
    return x[0]["avg_ts"] if x else float("nan")
def llama_rss(name, kind):
    try:
        return int(open(os.path.join(work, "r", f"{name}-{kind}.rss")).read().split()[-1]) * 1024
    except (OSError, ValueError, IndexError):
        return float("nan")
def memcap_left(name):
    for line in open(os.path.join(work, "r", name + ".err"), errors="replace"):
        if line.startswith("memcap:"):
            return line.split("GiB before, ")[1].split(" GiB")[0]
    return "?"
print(open(os.path.join(work, "engines.txt")).read(), end="")
m = json.load(open(os.path.join(work, f"inspect-{layers}.json")))
c = m["config"]
print(f"model: {c['num_hidden_layers']} layers, hidden {c['hidden_size']}, {c['moe_num_primary_experts']} experts top-"
      f"{c['moe_num_active_primary_experts']}, skewed routing, Q4_0; package {os.path.getsize(os.path.join(work, f'ours-{layers}-q4_0.stpk')) / 2**30:.2f} GiB, "
      f"expert bundle {m['expert_bundles'][0]['length'] / 2**20:.2f} MiB")
times = {}
for line in open(os.path.join(work, f"times-{layers}.txt")):
    label, sec, kb = line.split()
    times[label] = (float(sec), int(kb) / 1024)
for label, what in (("make_checkpoint", "make_checkpoint.py (bf16)"), ("convert", "stconvert --type q4_0 (one step)"),
                    ("export", "stconvert → GGUF (llama.cpp's input)")):
    if label in times:
        print(f"{what:38} {times[label][0]:8.1f} s, peak RSS {times[label][1]:7.0f} MiB")

free = [load(f"free-{r}") for r in R]
ok = lambda xs: [x for x in xs if x]
def ratio_line(label, ours, theirs):
    pairs = [a / b for a, b in zip(ours, theirs) if a == a and b == b and b > 0]
    return f"{label}: " + " ".join(f"{x:.2f}" for x in pairs) + (f"; median {med(pairs):.2f}" if pairs else "")
print()
print(f"{'run':34} {'prompt t/s':>10} {'decode t/s':>10} {'x free':>7} {'hit':>6} {'MiB/tok':>8} {'stall ms':>8} {'peak RSS GiB':>13} {'cap GiB':>8}")
free_dec = [x["decode_tokens_per_second"] if x else float("nan") for x in free]
def ours_row(label, runs, cap):
    runs_ok = ok(runs)
    if not runs_ok:
        print(f"{label:34} failed (see {work}/r)"); return
    dec = [x["decode_tokens_per_second"] if x else float("nan") for x in runs]
    vs_free = [a / b for a, b in zip(dec, free_dec) if a == a and b == b]
    print(f"{label:34} {med(x['prompt_tokens_per_second'] for x in runs_ok):10.2f} {med(x['decode_tokens_per_second'] for x in runs_ok):10.2f} "
          f"{(med(vs_free) if vs_free else float('nan')):7.2f} "
          + (f"{med(x['expert_hit_rate'] for x in runs_ok):6.1%} {med(x['expert_bytes_read_per_token'] for x in runs_ok) / 2**20:8.2f} "
             f"{med(x['io_stall_seconds_per_token'] for x in runs_ok) * 1000:8.2f} " if runs_ok[0].get("expert_hit_rate") is not None
             else f"{'-':>6} {'-':>8} {'-':>8} ")
          + f"{max(x['peak_rss_bytes'] for x in runs_ok) / 2**30:13.2f} {cap:>8}")
def llama_row(label, name, cap):
    if not any(os.path.exists(os.path.join(work, "r", f"{name}-{r}-{k}.json")) for r in R for k in ("pp", "tg")):
        return None
    pp = [llama(f"{name}-{r}", "pp") for r in R]; tg = [llama(f"{name}-{r}", "tg") for r in R]
    rss = max(max(llama_rss(f"{name}-{r}", k) for k in ("pp", "tg")) for r in R)
    good = lambda v: [x for x in v if x == x]
    failed = [open(os.path.join(work, "r", f)).read().strip() for f in sorted(os.listdir(os.path.join(work, "r")))
              if f.startswith(name + "-") and f.endswith(".failed")]
    print(f"{label:34} {(med(good(pp)) if good(pp) else float('nan')):10.2f} {(med(good(tg)) if good(tg) else float('nan')):10.2f} "
          f"{'':7} {'':6} {'':8} {'':8} {rss / 2**30:13.2f} {cap:>8}" + ("  " + "; ".join(failed) if failed else ""))
    return pp, tg
ours_row("ours, unbudgeted", free, "-")
ll_free_pp, ll_free_tg = llama_row("llama.cpp, in memory", "llama-free", "-")
llama_row("llama.cpp --repack 0, in memory", "llama-norepack-free", "-")
rows = []
for s in scaled:
    cap, bytes_ = s.split("=")
    capg = f"{int(bytes_) / 2**30:.2f}"
    pre = [load(f"{cap}-prefetch-{r}") for r in R]
    nop = [load(f"{cap}-noprefetch-{r}") for r in R]
    ours_row(f"ours, {cap}, prefetch", pre, capg)
    ours_row(f"ours, {cap}, no prefetch", nop, capg)
    llama_row(f"llama.cpp, {cap} (default)", f"llama-{cap}", capg)
    pp, tg = llama_row(f"llama.cpp --repack 0, {cap} (mmap)", f"llama-norepack-{cap}", capg) or ([], [])
    rows.append((cap, pre, nop, pp, tg))
print()
d = lambda runs: [x["decode_tokens_per_second"] if x else float("nan") for x in runs]
p = lambda runs: [x["prompt_tokens_per_second"] if x else float("nan") for x in runs]
print("ratios per round (turn by turn), with the median:")
print("  " + ratio_line("unbudgeted decode, ours / llama.cpp in memory", d(free), ll_free_tg))
print("  " + ratio_line("unbudgeted prompt, ours / llama.cpp in memory", p(free), ll_free_pp))
for cap, pre, nop, pp, tg in rows:
    print("  " + ratio_line(f"{cap}: decode, ours (prefetch) / ours unbudgeted", d(pre), free_dec))
    print("  " + ratio_line(f"{cap}: decode, ours (prefetch) / llama.cpp --repack 0 under the same cap", d(pre), tg))
    print("  " + ratio_line(f"{cap}: prompt, ours (prefetch) / llama.cpp --repack 0 under the same cap", p(pre), pp))
    print("  " + ratio_line(f"{cap}: decode, prefetch / no prefetch", d(pre), d(nop)))
print("what memcap left for each capped run (GiB, MemAvailable after locking): " + ", ".join(
    f"{s.split('=')[0]} {memcap_left(s.split('=')[0] + '-prefetch-1')}" for s in scaled))
PY
