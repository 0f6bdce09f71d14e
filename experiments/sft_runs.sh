#!/usr/bin/env bash
# Supervised finetuning with Q-Sparse (the paper's Sec. 4.4, at small scale): the runs behind
# experiments/sft/results.md, then its table (experiments/sft_eval.py).
#   smollm2: SmolLM2-135M-Instruct finetuned on the 'mix' set (templated tasks + pydoc Q&A),
#            dense, top-K 40% and 50%, Block Q-Sparse 16:32: the same steps, batches and seed.
#   tiny:    a tiny model pretrained by train_tiny.py on the built-in corpus, then finetuned on
#            the 'tasks' set dense and at 50% top-K (minutes).
# Each run's log LOGDIR/NAME.out holds its evaluations and its "done: ..." line; machine-PART.txt says
# where and on which commit they ran.
# Usage: bash experiments/sft_runs.sh [smollm2|tiny|eval|all] [LOGDIR]   (default all, experiments/logs/sft)
set -euo pipefail
cd "$(dirname "$0")/.."
WHAT=${1:-all}
LOG=${2:-experiments/logs/sft}
mkdir -p "$LOG"
# one BLAS thread: on a 2-core machine shared with other jobs, two BLAS threads that wait on each
# other made SmolLM2's steps several times slower
export OPENBLAS_NUM_THREADS=${OPENBLAS_NUM_THREADS:-1}
{ echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"; echo "date: $(date -u +%Y-%m-%d)"
  python -c "from benchmarks.machine import describe; print('machine:', describe())"; } > "$LOG/machine-$WHAT.txt"
run() { name=$1; shift; echo "== $name: python train_tiny.py $*"
        /usr/bin/env time -f "peak memory %M KB, wall %e s" python train_tiny.py "$@" 2> "$LOG/$name.err" | tee "$LOG/$name.out" | tail -1
        grep -a "peak memory" "$LOG/$name.err" >> "$LOG/$name.out" || true; }

SMOL="--init_from smollm2 --sft mix --batch_size 4 --block_size 96 --max_iters 60 --learning_rate 1e-4 --eval_interval 60 --eval_iters 1"
if [[ $WHAT == smollm2 || $WHAT == all ]]; then
  # the four at once, one BLAS thread each (about 2.5 GB each): on a machine shared with other jobs
  # they finish sooner together; their wall times are therefore no speed measurement
  run smollm2-dense  $SMOL --out_dir out-sft-smollm2-dense --sparsity 0 &
  run smollm2-s0.4   $SMOL --out_dir out-sft-smollm2-s0.4  --sparsity 0.4 &
  run smollm2-s0.5   $SMOL --out_dir out-sft-smollm2-s0.5  --sparsity 0.5 &
  run smollm2-nm16-32 $SMOL --out_dir out-sft-smollm2-nm   --nm 16:32 &
  wait
fi
# one epoch (139 steps) teaches the tiny model the format of an answer, not the tasks: 600 steps
TINY="--sft tasks --learning_rate 1e-3 --max_iters 600 --eval_interval 200"
if [[ $WHAT == tiny || $WHAT == all ]]; then
  # pretraining: the default model and corpus, dense SwiGLU (a stand-in for a pretrained LLM, as in
  # lesson 08), a context of 96 characters (the longest chat
  # example of the tasks is 85 tokens with the markers)
  run tiny-pretrain  --out_dir out-sft-tiny-pre --sparsity 0 --activation swiglu --block_size 96 --max_iters 800
  run tiny-dense     $TINY --init_from out-sft-tiny-pre --out_dir out-sft-tiny-dense --sparsity 0 &
  run tiny-s0.5      $TINY --init_from out-sft-tiny-pre --out_dir out-sft-tiny-s0.5  --sparsity 0.5 &
  run tiny-nm16-32   $TINY --init_from out-sft-tiny-pre --out_dir out-sft-tiny-nm    --nm 16:32 &
  wait
fi
if [[ $WHAT == eval || $WHAT == all ]]; then
  # the parts at once (each one process, one BLAS thread), then the table from all of them
  ev() { python experiments/sft_eval.py --log "$LOG" "$@" > /dev/null; }
  ev --only smollm2-before 2> "$LOG/eval-smollm2-before.err" &
  for s in dense "top-K 40%" "top-K 50%" "Block 16:32"; do
    ev --only smollm2-after --setting "$s" 2> "$LOG/eval-smollm2-after-${s//[ %:]/_}.err" &
  done
  ev --only tiny 2> "$LOG/eval-tiny.err" &
  wait
  python experiments/sft_eval.py --log "$LOG" --only table | tee "$LOG/eval.out"
fi
