#!/usr/bin/env bash
# On the GPU machine: GPU tests, then the prefill benchmark with correctness checks.
#   tools/gpu_check.sh OUTDIR [benchmark args...]
#   GPU_TESTS='expr' selects tests (pytest -k); they run in 8 processes (pytest-xdist).
set -u
out=${1:?output directory}; shift
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee -a "$out/gpu.txt"
timeout 240 python3 -m pytest -q -m cuda tests/test_gpu.py tests/test_training.py -p no:cacheprovider -n 8 ${GPU_TESTS:+-k "$GPU_TESTS"} > "$out/gpu_tests.log" 2>&1
tail -25 "$out/gpu_tests.log"
python3 benchmarks/prefill.py --csv "$out/prefill.csv" --plot "$out/prefill.png" "$@" 2>&1 | tee "$out/prefill.log"
