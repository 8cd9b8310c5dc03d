set -x
nvidia-smi --query-gpu=name,clocks.sm,power.draw,temperature.gpu --format=csv
nproc
python3 -c "import triton, torch, transformers; print(triton.__version__, torch.__version__, transformers.__version__)"
export MEGANEURA_CACHE=/tmp/mcache
timeout 200 python3 -m pytest -q -m cuda tests/test_gpu.py -n 8 -p no:cacheprovider > $OUT/gpu-tests.log 2>&1; tail -5 $OUT/gpu-tests.log
timeout 150 python3 benchmarks/generate_check.py --model gemma4-e4b --prompt-len 1000 --steps 64 > $OUT/generate.log 2>&1; tail -8 $OUT/generate.log
timeout 240 python3 benchmarks/decode.py --models gemma4-e4b gemma4-4b --contexts 4096 --no-hf-eager --no-hf-compiled --profile 4096 --cache-dir /tmp/kc1 --csv $OUT/decode.csv --plot $OUT/decode.png > $OUT/decode.log 2>&1; tail -80 $OUT/decode.log
