#!/usr/bin/env bash
# SmolLM2-135M in generate.py, batch 1, greedy: dense (--sparsity 0) against 50% top-K (--sparsity 0.5),
# this checkout ("new") and, for comparison, an older revision ("old", default 9872ca1: before the
# compiled decode step), the four variants taking turns in every round, each under /usr/bin/time -v.
#   bash benchmarks/generate_smollm2.sh [ROUNDS] [N] [OLD_REV]
# The old revision is unpacked with git archive into a temporary folder (no worktree is added).
# OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE are unset for the runs. Prints the machine line, the load
# average before and after, every run (tokens/s as generate.py prints it, its seconds, peak RSS, and where
# generate.py prints it the decode's seconds apart from the prompt's prefill), the medians and the ratios;
# the greedy text of each variant once.
set -euo pipefail
ROUNDS=${1:-3}; N=${2:-64}; OLD=${3:-9872ca1}
cd "$(dirname "$0")/.."
NEW=$PWD
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
mkdir "$TMP/old"
git archive "$OLD" | tar -x -C "$TMP/old"
PROMPT="Explain Python's with statement."
echo "new = this checkout ($(git rev-parse --short HEAD)$(git diff --quiet HEAD -- minisparse generate.py || echo ', with changes')), old = $OLD ($(git rev-parse --short "$OLD")); $ROUNDS rounds, $N tokens"
echo "command: generate.py --init_from smollm2 --prompt \"$PROMPT\" --max_new_tokens $N --temperature 0 --sparsity S"
python -c "from benchmarks.machine import describe; print('machine:', describe())"
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
run() {   # side sparsity round
  local dir=$NEW; [ "$1" = old ] && dir=$TMP/old
  (cd "$dir" && env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE PYTHONPATH="$dir" /usr/bin/time -v python generate.py \
     --init_from smollm2 --prompt "$PROMPT" --max_new_tokens "$N" --temperature 0 --sparsity "$2" \
     >"$TMP/text-$1-$2" 2>"$TMP/err")
  local speed secs rss
  speed=$(sed -n 's/.*s: \([0-9,]*\) tokens\/s.*/\1/p' "$TMP/err" | tr -d ,)
  secs=$(sed -n 's/^[0-9]* tokens in \([0-9.]*\) s.*/\1/p' "$TMP/err")
  rss=$(sed -n 's/.*Maximum resident set size (kbytes): \([0-9]*\)/\1/p' "$TMP/err")
  dsecs=$(sed -n 's/.*the decode: [0-9]* tokens in \([0-9.]*\) s.*/\1/p' "$TMP/err")   # revisions that print it
  echo "round $3 $1 sparsity $2: $speed tokens/s, $secs s, peak RSS $((rss / 1024)) MB${dsecs:+, the decode alone $dsecs s}"
}
for r in $(seq "$ROUNDS"); do
  for side in new old; do
    for sp in 0 0.5; do
      run "$side" "$sp" "$r"
    done
  done
done | tee "$TMP/log"
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
for side in new old; do
  for sp in 0 0.5; do
    echo "greedy text, $side, sparsity $sp: $(tr '\n' ' ' <"$TMP/text-$side-$sp" | cut -c1-300)"
  done
done
python - "$TMP/log" <<'PY'
import re, statistics, sys
rows = [re.match(r"round \d+ (\w+) sparsity ([\d.]+): (\d+) tokens/s, ([\d.]+) s, peak RSS (\d+) MB"
                 r"(?:, the decode alone ([\d.]+) s)?", l)
        for l in open(sys.argv[1])]
rows = [m.groups() for m in rows if m]
med, sec, rss = {}, {}, {}
for side in ("new", "old"):
    for sp in ("0", "0.5"):
        sel = [r for r in rows if r[0] == side and r[1] == sp]
        med[side, sp] = statistics.median(int(r[2]) for r in sel)
        sec[side, sp] = statistics.median(float(r[3]) for r in sel)
        rss[side, sp] = (min(int(r[4]) for r in sel), max(int(r[4]) for r in sel))
        print(f"{side} sparsity {sp}: median {med[side, sp]} tokens/s, {sec[side, sp]:.2f} s; "
              f"peak RSS {rss[side, sp][0]}-{rss[side, sp][1]} MB")
def ratio(a, b, what):
    print(f"{what}: {med[a] / med[b]:.2f}x from the printed tokens/s medians, {sec[b] / sec[a]:.2f}x from the seconds")
ratio(("new", "0.5"), ("new", "0"), "new sparse / new dense")
ratio(("new", "0.5"), ("old", "0"), "new sparse / old dense")
ratio(("old", "0.5"), ("old", "0"), "old sparse / old dense")
ratio(("new", "0"), ("old", "0"), "new dense / old dense")
ratio(("new", "0.5"), ("old", "0.5"), "new sparse / old sparse")
dec = {sp: [float(r[5]) for r in rows if r[0] == "new" and r[1] == sp and r[5]] for sp in ("0", "0.5")}
if dec["0"] and dec["0.5"]:                 # the prompt's prefill left out: tokens/s of the decode alone
    d0, d5 = statistics.median(dec["0"]), statistics.median(dec["0.5"])
    print(f"new sparse / new dense, the decode alone (after the prompt): {d0 / d5:.2f}x from the seconds "
          f"({d5:.2f} s against {d0:.2f} s)")
print(f"peak RSS, new sparse / new dense: {rss['new', '0.5'][1] / rss['new', '0'][1]:.3f} (largest of each)")
PY
