#!/usr/bin/env bash
# Whole-program speed of two revisions, taking turns on one machine: train_tiny.py for STEPS steps of
# the default model (the median of its steps' tokens/s in metrics.jsonl) and generate.py's tokens/s
# (1000 tokens) on the model the first revision trained, ROUNDS rounds of A then B, so that the
# machine's slow spells fall on both alike.
#   bash benchmarks/revisions.sh REV_A REV_B [ROUNDS] [STEPS]     e.g. bash benchmarks/revisions.sh 2ff1265 HEAD
# Runs in throwaway worktrees under a temporary folder, with the python on PATH; prints the
# machine line, every measurement, and the medians. OPENBLAS_CORETYPE is unset for the runs.
set -euo pipefail
A=${1:?REV_A}; B=${2:?REV_B}; ROUNDS=${3:-3}; STEPS=${4:-300}
cd "$(dirname "$0")/.."
TMP=$(mktemp -d)
trap 'git worktree remove --force "$TMP/a" >/dev/null 2>&1; git worktree remove --force "$TMP/b" >/dev/null 2>&1; rm -rf "$TMP"' EXIT
git worktree add -q --detach "$TMP/a" "$A"
git worktree add -q --detach "$TMP/b" "$B"
echo "A = $A ($(git rev-parse --short "$A")), B = $B ($(git rev-parse --short "$B")); $ROUNDS rounds, $STEPS training steps"
python -c "from benchmarks.machine import describe; print('machine:', describe())"
run() { (cd "$TMP/$1" && env -u OPENBLAS_CORETYPE "${@:2}"); }
for r in $(seq "$ROUNDS"); do
  for side in a b; do
    run $side python train_tiny.py --max_iters "$STEPS" --eval_interval "$STEPS" --out_dir "$TMP/run-$side" >/dev/null 2>&1
    t=$(python -c "import json, statistics, sys; print(round(statistics.median(m['tokens_per_s'] for m in map(json.loads, open(sys.argv[1])) if 'tokens_per_s' in m)))" "$TMP/run-$side/metrics.jsonl")
    g=$(run $side python generate.py --out_dir "$TMP/run-a" --max_new_tokens 1000 --seed 1 2>&1 >/dev/null \
        | sed -n 's/.*: \([0-9,]*\) tokens\/s.*/\1/p' | tr -d ,)
    echo "round $r $side: train ${t} tokens/s, generate ${g} tokens/s"
  done
done | tee "$TMP/log"
python - "$TMP/log" <<'PY'
import re, statistics, sys
rows = [re.match(r"round \d+ (\w): train (\d+) tokens/s, generate (\d+) tokens/s", l) for l in open(sys.argv[1])]
for side in "ab":
    t = [int(m.group(2)) for m in rows if m and m.group(1) == side]
    g = [int(m.group(3)) for m in rows if m and m.group(1) == side]
    print(f"median {side.upper()}: train {statistics.median(t)} tokens/s, generate {statistics.median(g)} tokens/s")
PY
