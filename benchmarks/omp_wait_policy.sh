#!/usr/bin/env bash
# generate.py at numba's 2 threads: libgomp's default wait policy against OMP_WAIT_POLICY=active,
# taking turns in every round; SmolLM2-135M, 64 greedy tokens, decode tokens/s as generate.py prints it
cd "$(dirname "$0")/.."
echo "machine: $(python -c 'from benchmarks.machine import describe; print(describe())')"
echo "command: bash benchmarks/omp_wait_policy.sh $*; OPENBLAS_CORETYPE unset; NUMBA_NUM_THREADS=2"
ROUNDS=${1:-5}
for r in $(seq "$ROUNDS"); do
  for sp in 0 0.5; do
    for pol in default active; do
      if [ $pol = default ]; then E=(); else E=(OMP_WAIT_POLICY=$pol); fi
      out=$(env -u OPENBLAS_CORETYPE "${E[@]}" NUMBA_NUM_THREADS=2 python generate.py --init_from smollm2 \
            --prompt "Explain Python's with statement." --max_new_tokens 64 --temperature 0 --sparsity $sp 2>&1 >/dev/null | grep "the decode")
      echo "round $r sparsity $sp $pol: ${out##*the decode: }"
    done
  done
done
