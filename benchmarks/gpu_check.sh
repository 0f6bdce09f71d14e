#!/usr/bin/env bash
# The GPU checks and benchmarks, as one script for a machine with CUDA, CuPy and PyTorch:
#   bash benchmarks/gpu_check.sh [LOGDIR]
# 1. the tests that run CuPy (model forward/backward on CuPy against NumPy in float64, the
#    fast/rowsparse.cu kernels against the NumPy reference, a GPU decode against the masked product);
# 2. benchmarks/decode_speed.py --device gpu and gpu_select_breakdown.py (where the decode's time goes);
# 3. benchmarks/train_speed.py --device gpu.
# The rest of the suite is CPU code that CI runs.
set -uo pipefail
cd "$(dirname "$0")/.."
LOG=${1:-benchmarks/logs}
mkdir -p "$LOG"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$LOG/gpu.txt"
python3 -c "import numpy, cupy, torch; print('numpy', numpy.__version__, 'cupy', cupy.__version__, 'torch', torch.__version__)" | tee -a "$LOG/gpu.txt"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_rowsparse.py tests/test_backend.py tests/test_decode.py \
    -rfs > "$LOG/gpu_tests.txt" 2>&1; tail -15 "$LOG/gpu_tests.txt"
if [ -f out-tiny/ckpt.npz ]; then                 # the user's program, where a trained run is at hand
    for k in auto masked; do timeout 60 python3 generate.py --out_dir out-tiny --device gpu --max_new_tokens 200 --kernel $k 2>&1 | tail -3; done
fi
timeout 150 python3 benchmarks/decode_speed.py --device gpu --repeats 10 2>&1 | tee "$LOG/gpu_decode.txt"
timeout 60 python3 benchmarks/gpu_select_breakdown.py 2>&1 | tee "$LOG/gpu_select.txt"
timeout 90 python3 benchmarks/train_speed.py --device gpu --steps 40 --mem_steps 0 2>&1 | tee "$LOG/gpu_train.txt"
