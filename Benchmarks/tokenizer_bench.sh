#!/usr/bin/env bash
# Tokenisation speed and memory: strun tokenize against the Hugging Face `tokenizers` package
# (pip install tokenizers) on the same text and tokenizer, same machine, one thread each.
#
#   bash Benchmarks/tokenizer_bench.sh [MEGABYTES]     (default 8)
#
# Checks that both produce the same ids, then reports throughput (MB/s of UTF-8 input, encode only:
# the tokenizer's load time is measured on an empty file and subtracted) and peak RSS.
set -euo pipefail
cd "$(dirname "$0")/.."
mb="${1:-8}"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
tokenizer=Tests/Fixtures/qwen-tokenizer/tokenizer.json
swift build -c release >/dev/null

python3 - "$work/corpus.txt" "$mb" <<'PY'
import json, random, sys
cases = [c["text"] for c in json.load(open("Tests/Fixtures/tokenizer/golden.json"))["cases"]]
prose = open("specs/FORMAT.md", encoding="utf-8").read() + open("README.md", encoding="utf-8").read()
rng = random.Random(1)
parts, size = [], 0
while size < int(sys.argv[2]) * 1_000_000:
    t = prose if rng.random() < 0.5 else rng.choice(cases)
    parts.append(t); size += len(t.encode())
open(sys.argv[1], "w", encoding="utf-8").write("\n".join(parts))
PY
: > "$work/empty.txt"
bytes=$(stat -c %s "$work/corpus.txt")

timed() {  # output-file, command... -> "seconds rss_kb"
    local out=$1; shift
    /usr/bin/time -f "%e %M" -o "$work/time.txt" "$@" > "$out"
    cat "$work/time.txt"
}

read -r swift_load _ < <(timed /dev/null .build/release/strun tokenize --tokenizer "$tokenizer" --file "$work/empty.txt")
read -r swift_total swift_rss < <(timed "$work/swift.json" .build/release/strun tokenize --tokenizer "$tokenizer" --file "$work/corpus.txt")

cat > "$work/hf.py" <<'PY'
import json, sys, time
from tokenizers import Tokenizer
t0 = time.perf_counter(); tok = Tokenizer.from_file(sys.argv[1]); t1 = time.perf_counter()
text = open(sys.argv[2], encoding="utf-8", newline="").read()  # no newline translation
t2 = time.perf_counter(); ids = tok.encode(text, add_special_tokens=False).ids; t3 = time.perf_counter()
print(json.dumps(ids, separators=(",", ":")))
print(f"{t3 - t2:.3f}", file=sys.stderr)
PY
RAYON_NUM_THREADS=1 /usr/bin/time -f "%e %M" -o "$work/time.txt" python3 "$work/hf.py" "$tokenizer" "$work/corpus.txt" > "$work/hf.json" 2> "$work/hf.err"
read -r _ hf_rss < "$work/time.txt"
hf_encode=$(tail -n 1 "$work/hf.err")

if cmp -s "$work/swift.json" "$work/hf.json"; then same="identical ids"; else same="IDS DIFFER"; fi
awk -v b="$bytes" -v sl="$swift_load" -v st="$swift_total" -v sr="$swift_rss" -v he="$hf_encode" -v hr="$hf_rss" -v same="$same" 'BEGIN {
    se = st - sl; if (se <= 0) se = 0.001
    printf "corpus: %.1f MB; %s\n", b / 1e6, same
    printf "strun tokenize:  encode %.2f s = %6.1f MB/s (load %.2f s), peak RSS %.0f MiB\n", se, b / 1e6 / se, sl, sr / 1024
    printf "tokenizers %s: encode %.2f s = %6.1f MB/s, peak RSS %.0f MiB\n", "(py)", he, b / 1e6 / he, hr / 1024
    printf "throughput ratio (ours / tokenizers): %.2f\n", (b / se) / (b / he)
}'
