"""Sweep of a prefill chunk's attention over the KV cache on the GPU: tile rows (BLOCK_M, the
rows times the GQA group's heads), key block, warps and stages.

    python benchmarks/chunk_attention_sweep.py
    python benchmarks/chunk_attention_sweep.py --shapes e4b-full --rows 1024 --start 3072

Each configuration runs the generated kernel (codegen/decode_attention.py, a chunk's tiles)
on random q, K and V: `--rows` rows of one sequence at positions start .. start + rows - 1,
the cache holding every key they attend to, replayed 10 times in one CUDA graph
(prefill.graph_time). The table gives microseconds, TFLOP/s of the scores and the weighted
sum over the keys each row attends to, and the largest difference from the first
configuration's output (a wrong tile shows there). `decode_attention.build`'s chunk tiles
should be the best per shape.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from matvec_sweep import sweep_device  # noqa: E402
from prefill import graph_time  # noqa: E402

from meganeura.codegen.common import next_pow2  # noqa: E402
from meganeura.codegen.decode_attention import emit  # noqa: E402
from meganeura.compiler.cost import head_dim_chunks  # noqa: E402

# name: (window or None, query heads, kv heads, head width): e4b's attention layers
SHAPES = {"e4b-full": (None, 8, 2, 512), "e4b-ring": (512, 8, 2, 256)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--rows", type=int, default=2048, help="the chunk's rows (default 2048)")
    ap.add_argument("--start", type=int, default=6144, help="its first position (default 6144)")
    args = ap.parse_args(argv)
    if (setup := sweep_device()) is None:
        return 2
    dev, cache = setup
    t, start = args.rows, args.start
    for name in args.shapes:
        window, heads, kv, hd = SHAPES[name]
        # a full layer's slots hold every position; a ring the window and a chunk's rows
        # (the model's rings hold window + the largest chunk - 1: the same keys read)
        slots = start + t if window is None else window + t - 1
        reach = slots if window is None else window
        group = heads // kv
        widths = head_dim_chunks(hd)
        kern = cache.load(emit("ieee", hd, False), "decode_attention_kernel", False)
        q = torch.randn(t, heads * hd, device=dev, dtype=torch.bfloat16)
        k = torch.randn(slots, kv * hd, device=dev, dtype=torch.bfloat16)
        v = torch.randn(slots, kv * hd, device=dev, dtype=torch.bfloat16)
        pos = torch.arange(start, start + t, device=dev, dtype=torch.int64)
        o = torch.empty(t, heads * hd, device=dev, dtype=torch.bfloat16)
        scale = math.log2(math.e) * hd ** -0.5
        flops = 4 * heads * hd * sum(min(reach, p + 1) for p in range(start, start + t))
        results, ref = [], None
        for block_m in (32, 64, 128):
            for block_n in (32, 64):
                for warps in (4, 8):
                    for stages in (2, 3):
                        rows = block_m // next_pow2(group)
                        cx = dict(GROUP=group, GROUP_PAD=next_pow2(group), KV_HEADS=kv,
                                  HEAD_DIM=hd, **{f"D{i}": w for i, w in enumerate(widths)},
                                  ROWS=rows, BATCHED=False, BLOCK_M=block_m, BLOCK_N=block_n)

                        o.fill_(float("nan"))  # (a tile that skips rows shows in the diff)

                        def run(cx=cx, rows=rows, warps=warps, stages=stages):
                            kern[(-(-t // rows), kv, 1)](
                                q, k, v, pos, o, q.stride(0), o.stride(0), k.stride(0),
                                v.stride(0), t, slots, reach, scale, **cx, num_warps=warps,
                                num_stages=stages)
                        label = (f"BLOCK_M={block_m:<4} rows={rows:<3} BLOCK_N={block_n:<3} "
                                 f"warps={warps} stages={stages}")
                        try:
                            us = graph_time(run, 10) * 1e3
                        except Exception as e:  # noqa: BLE001 - a configuration that fails is reported
                            print(f"{name} {label}: {type(e).__name__}: {str(e)[:160]}")
                            continue
                        ref = o.clone() if ref is None else ref
                        results.append((us, label, (o.float() - ref.float()).abs().max().item()))
        print(f"\n== {name}: {t} rows at {start}.., {slots} slots, reach {reach}, {heads} heads "
              f"over {kv} kv heads of {hd}, {flops / 1e9:.1f} GFLOP")
        for us, label, diff in sorted(results)[:12]:
            print(f"  {us:9.1f} us {flops / us / 1e6:7.1f} TFLOP/s  {label}  max diff {diff:.2e}",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
