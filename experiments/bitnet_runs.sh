#!/usr/bin/env bash
# 1.58-bit Q-Sparse at tiny scale (docs/qsparse.md, Sec. 5): ternary weights, INT8 inputs, against
# the full-precision runs of readme_runs.sh, all at the default run's steps, data and seed.
#   bash experiments/bitnet_runs.sh lr [LOGDIR]     # 1. the learning rate, tuned on 1000-step runs at S = 0.5
#   bash experiments/bitnet_runs.sh main LR [LOGDIR] # 2. dense, top-K 0.5 and 0.7, N:M 16:32 at 3000 steps
# Each run's log LOGDIR/NAME.out ends with its "done:" line; LOGDIR/machine.txt says where it ran.
set -euo pipefail
cd "$(dirname "$0")/.."
stage=${1:?usage: bitnet_runs.sh lr|main [LR] [LOGDIR]}
if [ "$stage" = main ]; then LR=${2:?the learning rate chosen by stage lr}; LOG=${3:-experiments/logs/bitnet}; else LOG=${2:-experiments/logs/bitnet}; fi
mkdir -p "$LOG"
{ echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"; echo "date: $(date -u +%Y-%m-%d)"
  python -c "from benchmarks.machine import describe; print('machine:', describe())"; } > "$LOG/machine-$stage.txt"
run() { name=$1; shift; echo "== $name: python train_tiny.py $*"; python train_tiny.py "$@" 2> "$LOG/$name.err" | tee "$LOG/$name.out" | tail -1; }
B158="--w_bits 1.58 --a_bits 8"

if [ "$stage" = lr ]; then
  for lr in 1e-3 2e-3 4e-3 8e-3; do      # min_lr stays a tenth of the peak, as in the default run
    run "lr-$lr" --out_dir "out-b158-lr$lr" $B158 --sparsity 0.5 --max_iters 1000 --learning_rate $lr \
        --min_lr "$(python -c "print($lr / 10)")"
  done
  # the full-precision model at the same 1000 steps, for scale
  run "lr-fp-2e-3" --out_dir out-fp-lr --sparsity 0.5 --max_iters 1000
else
  MIN=$(python -c "print($LR / 10)")
  run b158-s0     --out_dir out-b158-s0   $B158 --sparsity 0   --learning_rate "$LR" --min_lr "$MIN"
  run b158-s0.5   --out_dir out-b158-s0.5 $B158 --sparsity 0.5 --learning_rate "$LR" --min_lr "$MIN"
  run b158-s0.7   --out_dir out-b158-s0.7 $B158 --sparsity 0.7 --learning_rate "$LR" --min_lr "$MIN"
  run b158-nm     --out_dir out-b158-nm   $B158 --nm 16:32     --learning_rate "$LR" --min_lr "$MIN"
fi
