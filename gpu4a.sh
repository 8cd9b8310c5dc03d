export MEGANEURA_CACHE=/tmp/mcache
timeout 120 python3 -m pytest -q -m cuda tests/test_gpu.py -n 8 -p no:cacheprovider -k "matmul_bf16 or split or parallel or one_row or decode_replays" > $OUT/gpu-tests.log 2>&1; tail -3 $OUT/gpu-tests.log
timeout 200 python3 benchmarks/decode.py --models gemma4-4b gemma4-e4b --contexts 4096 --no-hf-eager --no-hf-compiled --no-ttft --profile 4096 --cache-dir /tmp/kc4 --csv $OUT/decode.csv --plot $OUT/decode.png > $OUT/decode.log 2>&1; grep -v "^\s*0.0[0-4]" $OUT/decode.log | head -50
timeout 240 python3 benchmarks/prefill.py --model gemma4-12b --seq-len 2048 --check --regimes --csv $OUT/prefill.csv --plot $OUT/prefill-12b.png > $OUT/prefill-12b.log 2>&1; head -12 $OUT/prefill-12b.log; grep -A3 "== targets" $OUT/prefill-12b.log
