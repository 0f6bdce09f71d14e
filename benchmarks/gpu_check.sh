#!/usr/bin/env bash
# The GPU checks and benchmarks, as one script for a machine with CUDA, CuPy and PyTorch:
#   bash benchmarks/gpu_check.sh [LOGDIR]
# 1. the test suite, where the CuPy tests (model forward/backward on CuPy against NumPy in
#    float64, the row-sparse RawKernel against the NumPy reference) run instead of skipping;
# 2. benchmarks/decode_speed.py --device gpu; 3. benchmarks/train_speed.py --device gpu.
set -uo pipefail
cd "$(dirname "$0")/.."
LOG=${1:-benchmarks/logs}
mkdir -p "$LOG"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$LOG/gpu.txt"
python3 -c "import numpy, cupy, torch; print('numpy', numpy.__version__, 'cupy', cupy.__version__, 'torch', torch.__version__)" | tee -a "$LOG/gpu.txt"
timeout 240 python3 -m pytest -q -p no:cacheprovider tests -rfs > "$LOG/gpu_tests.txt" 2>&1; tail -8 "$LOG/gpu_tests.txt"
timeout 150 python3 benchmarks/decode_speed.py --device gpu --repeats 50 2>&1 | tee "$LOG/gpu_decode.txt"
timeout 120 python3 benchmarks/train_speed.py --device gpu --steps 40 --mem_steps 0 2>&1 | tee "$LOG/gpu_train.txt"
