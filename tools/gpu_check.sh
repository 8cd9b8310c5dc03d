#!/usr/bin/env bash
# On the GPU machine: GPU tests, then the prefill benchmark with correctness checks.
#   tools/gpu_check.sh OUTDIR [benchmark args...]
set -u
out=${1:?output directory}; shift
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/gpu.txt"
timeout 240 python3 -m pytest -q -x -m cuda tests/test_gpu.py -p no:cacheprovider 2>&1 | tail -25 | tee "$out/gpu_tests.log"
python3 benchmarks/prefill.py --csv "$out/prefill.csv" "$@" 2>&1 | tee "$out/prefill.log"
