timeout 400 python3 benchmarks/matvec_sweep.py --shapes seed-down seed-o seed-qkv seed-gate-up seed-lm-head --warps 4 8 > $OUT/sweep.log 2>&1; grep -v "TypeError\|^ \* " $OUT/sweep.log | head -120
