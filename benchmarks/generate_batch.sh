#!/usr/bin/env bash
# generate.py's own tokens/s at --num_samples B, two revisions taking turns: dense (--sparsity 0)
# and the run's trained sparsity (--kernel auto), greedy, N tokens per sample.
#   bash benchmarks/generate_batch.sh REV_A REV_B OUT_DIR [ROUNDS] [N] [BATCHES]
#   e.g. bash benchmarks/generate_batch.sh 50231f1 HEAD out-wide 2 16 "1 4 8 16"
# OUT_DIR: a train_tiny.py run (e.g. --n_embd 2048 --n_layer 3, weights past the last-level cache).
# Runs in throwaway worktrees under a temporary folder, with the python on PATH; OPENBLAS_CORETYPE
# is unset for the runs. Prints the machine line, every measurement and the medians.
set -euo pipefail
A=${1:?REV_A}; B=${2:?REV_B}; RUN=$(realpath "${3:?OUT_DIR}"); ROUNDS=${4:-2}; N=${5:-16}; BATCHES=${6:-"1 4 8 16"}
cd "$(dirname "$0")/.."
TMP=$(mktemp -d)
trap 'git worktree remove --force "$TMP/a" >/dev/null 2>&1; git worktree remove --force "$TMP/b" >/dev/null 2>&1; rm -rf "$TMP"' EXIT
git worktree add -q --detach "$TMP/a" "$A"
git worktree add -q --detach "$TMP/b" "$B"
echo "A = $A ($(git rev-parse --short "$A")), B = $B ($(git rev-parse --short "$B")); $ROUNDS rounds, $N tokens a sample"
python -c "from benchmarks.machine import describe; print('machine:', describe())"
for r in $(seq "$ROUNDS"); do
  for nb in $BATCHES; do
    for side in a b; do
      for sp in dense sparse; do
        flag=(); [ "$sp" = dense ] && flag=(--sparsity 0)
        g=$(cd "$TMP/$side" && env -u OPENBLAS_CORETYPE python generate.py --out_dir "$RUN" --max_new_tokens "$N" \
              --temperature 0 --num_samples "$nb" "${flag[@]}" 2>&1 >/dev/null | sed -n 's/.*: \([0-9,]*\) tokens\/s.*/\1/p' | tr -d ,)
        echo "round $r B $nb $side $sp: $g tokens/s"
      done
    done
  done
done | tee "$TMP/log"
python - "$TMP/log" <<'PY'
import re, statistics, sys
rows = [re.match(r"round \d+ B (\d+) (\w) (\w+): (\d+) tokens/s", l) for l in open(sys.argv[1])]
rows = [m.groups() for m in rows if m]
for nb in sorted({int(r[0]) for r in rows}):
    med = {(s, v): statistics.median(int(r[3]) for r in rows if int(r[0]) == nb and r[1] == s and r[2] == v)
           for s in "ab" for v in ("dense", "sparse")}
    print(f"B {nb:3d}: " + ", ".join(f"{s.upper()} {v} {med[s, v]}" for s in "ab" for v in ("dense", "sparse"))
          + f"; sparse / dense: A {med['a', 'sparse'] / med['a', 'dense']:.2f}x, B {med['b', 'sparse'] / med['b', 'dense']:.2f}x")
PY
