#!/usr/bin/env bash
# Times stconvert (and, once it exists, stquant) on a full-size synthetic checkpoint and reports
# wall time, throughput and peak RSS. Run by hand, never by the tests:
#
#   bash Benchmarks/convert_and_quantize.sh [WORK_DIR] [--shape 4b|21b] [--layers N]
#
# WORK_DIR (default Benchmarks/work) receives the checkpoint (~7.5 GiB for 4b) and the packages.
set -euo pipefail
cd "$(dirname "$0")/.."
work="${1:-Benchmarks/work}"; shift || true
mkdir -p "$work"
swift build -c release >/dev/null
if [ ! -f "$work/checkpoint/config.json" ]; then
    python3 Benchmarks/make_checkpoint.py "$work/checkpoint" "$@"
fi
size=$(du -sbL "$work/checkpoint" | cut -f1)

measure() {  # label, command...
    local label=$1; shift
    /usr/bin/time -f "%e %M" -o "$work/time.txt" "$@" >/dev/null
    read -r seconds rss_kb < "$work/time.txt"
    awk -v l="$label" -v s="$seconds" -v r="$rss_kb" -v b="$size" \
        'BEGIN { printf "%-22s %8.1f s  %8.0f MB/s  peak RSS %7.1f MiB\n", l, s, b / 1e6 / s, r / 1024 }'
}

echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB; checkpoint $(awk -v b="$size" 'BEGIN { printf "%.2f", b / 2^30 }') GiB"
measure "stconvert (bf16)" .build/release/stconvert "$work/checkpoint" -o "$work/model.stpk" --force --quiet
measure "strun verify" .build/release/strun verify "$work/model.stpk" --quiet
if .build/release/stquant --help 2>/dev/null | grep -q -- "--type"; then
    measure "stquant q4_0" .build/release/stquant "$work/model.stpk" -o "$work/model-q4_0.stpk" --type q4_0 --force --quiet
    measure "stquant q8_0" .build/release/stquant "$work/model.stpk" -o "$work/model-q8_0.stpk" --type q8_0 --force --quiet
fi
