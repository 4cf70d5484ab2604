#!/usr/bin/env bash
# The memory budget held in fact: converts the trained fixture to Q4_0, asks `strun bench` for the
# smallest --memory-budget it accepts, runs there and compares the peak RSS the kernel measured
# (VmHWM) with the budget, over three rounds, as a user would from a shell (the suite's
# RunCommandTests.theSmallestBudgetIsReportedAndHolds does it once, from inside the test runner).
#   bash Tests/budget_check.sh [BUILD_DIR]      (default .build/debug)
set -euo pipefail
cd "$(dirname "$0")/.."
B="${1:-.build/debug}"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$B/stconvert" Tests/Fixtures/trained/trained-21b-like -o "$work/m.stpk" --type q4_0 -q
field() { python3 -c "import json,sys; print(json.load(sys.stdin)['$1'])"; }
minimum=$("$B/strun" bench "$work/m.stpk" -p 16 -n 32 -r 1 --json | field minimum_memory_budget_bytes)
status=0
for round in 1 2 3; do
    report=$("$B/strun" bench "$work/m.stpk" -p 16 -n 32 -r 1 --json --memory-budget "$minimum")
    peak=$(echo "$report" | field peak_rss_bytes)
    rate=$(echo "$report" | field expert_hit_rate)
    verdict=ok; [ "$peak" -le "$minimum" ] || { verdict="OVER THE BUDGET"; status=1; }
    echo "round $round: budget $minimum bytes (the smallest accepted), peak RSS $peak bytes, hit rate $rate: $verdict"
done
if "$B/strun" bench "$work/m.stpk" -p 16 -n 32 -r 1 --memory-budget $((minimum - 1)) >/dev/null 2>&1; then
    echo "a budget one byte under the smallest was accepted"; status=1
fi
exit $status
