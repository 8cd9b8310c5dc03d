export MEGANEURA_CACHE=/tmp/mcache
timeout 560 python3 benchmarks/prefill.py --model gemma4-27b --seq-len 2048 --check --regimes --csv $OUT/prefill.csv --plot $OUT/prefill-27b.png > $OUT/prefill-27b.log 2>&1; head -12 $OUT/prefill-27b.log; grep -A3 "== targets" $OUT/prefill-27b.log
