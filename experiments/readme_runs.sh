#!/usr/bin/env bash
# The runs behind the README's tables: the default run, dense vs Q-Sparse at equal steps,
# and continue-training a dense SwiGLU model into Q-Sparse (paper Sec. 4.3, tiny scale).
# Each run's log LOGDIR/NAME.out holds its evaluations and its last line ("done: ...") with the
# validation loss and wall time; LOGDIR/machine.txt says where and on which commit they ran.
# Usage: bash experiments/readme_runs.sh [LOGDIR]      (the README's logs: experiments/logs/readme)
set -euo pipefail
cd "$(dirname "$0")/.."
LOG=${1:-experiments/logs/readme}
mkdir -p "$LOG"
{ echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"; echo "date: $(date -u +%Y-%m-%d)"
  python -c "from benchmarks.machine import describe; print('machine:', describe())"; } > "$LOG/machine.txt"
run() { name=$1; shift; echo "== $name: python train_tiny.py $*"; python train_tiny.py "$@" 2> "$LOG/$name.err" | tee "$LOG/$name.out" | tail -1; }

run default        --out_dir out-tiny                       # sparsity 0.5, the README's main job
run s0             --out_dir out-s0   --sparsity 0
run s0.3           --out_dir out-s0.3 --sparsity 0.3
run s0.7           --out_dir out-s0.7 --sparsity 0.7
run nm16-32        --out_dir out-nm   --nm 16:32
# continue-training: a dense SwiGLU model, then 500 more steps at 50% top-K from its weights,
# against 500 more dense steps from the same weights (the fair baseline)
run swiglu-dense   --out_dir out-swiglu-dense --sparsity 0 --activation swiglu
run swiglu-ct-s0.5 --out_dir out-swiglu-ct    --init_from out-swiglu-dense --sparsity 0.5 --max_iters 500 --warmup_iters 20 --learning_rate 5e-4 --min_lr 5e-5
run swiglu-ct-s0   --out_dir out-swiglu-ct0   --init_from out-swiglu-dense --sparsity 0   --max_iters 500 --warmup_iters 20 --learning_rate 5e-4 --min_lr 5e-5
