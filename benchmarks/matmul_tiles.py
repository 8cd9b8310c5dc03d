"""Tile sweep of the generated matmul variants on the shapes of a model's plan.

    python benchmarks/matmul_tiles.py --model gemma4-4b --seq-len 2048

For each distinct (variant, M, N, K) of the plan, times the kernel under each
candidate block configuration (triton.testing.do_bench, median) and prints TFLOP/s;
the best configuration per shape feeds the tile table of codegen/matmul.py.
"""

from __future__ import annotations

import argparse

import torch
import triton.testing

from meganeura.codegen.cache import KernelCache
from meganeura.codegen.matmul import PAIRED, PROLOGUES, RESIDUAL, emit
from meganeura.compiler.cost import H200, CostModel
from meganeura.models import MODEL_NAMES, PRESETS, build
from meganeura.optimize import optimize

CONFIGS = [  # BLOCK_M, BLOCK_N, BLOCK_K, warps, stages
    (128, 128, 64, 8, 3), (128, 128, 64, 4, 4), (128, 256, 64, 8, 3), (128, 256, 64, 8, 4),
    (256, 128, 64, 8, 3), (128, 128, 128, 8, 3), (64, 256, 64, 4, 4), (128, 64, 64, 4, 4),
    (64, 128, 64, 4, 4),
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="gemma4-4b")
    ap.add_argument("--seq-len", type=int, nargs="+", default=[2048])
    a = ap.parse_args()
    cache = KernelCache("/tmp/meganeura-tiles")
    for seq in a.seq_len:
        plan, _ = optimize(build(PRESETS[MODEL_NAMES[a.model]], seq), CostModel(H200, "bf16"))
        g = plan.graph
        shapes = {}
        for i in plan.launches:
            n = g[i]
            if "matmul" in n.op:
                shapes[(n.op, g[n.inputs[0]].shape[0], n.shape[1], g[n.inputs[0]].shape[1],
                        g[n.inputs[0]].op in ("embedding", "matmul_add"))] = 1
        for op, m, n, k, wide in shapes:
            norm, paired, residual = op in PROLOGUES, op in PAIRED, op in RESIDUAL
            fn = cache.load(emit(norm, paired, residual, "tf32"), "matmul_kernel", False)
            a_ = torch.randn(m, k, device="cuda", dtype=torch.float32 if wide else torch.bfloat16)
            b_ = torch.randn(k, 2 * n if paired else n, device="cuda", dtype=torch.bfloat16)
            c_ = torch.empty(m, n, device="cuda", dtype=torch.float32 if residual else torch.bfloat16)
            r_ = torch.randn(m, n, device="cuda", dtype=torch.float32)
            flops = 2 * m * k * (2 * n if paired else n)
            results = []
            for bm, bn, bk, warps, stages in CONFIGS:
                args = [a_, b_, c_] + ([r_] if residual else []) + [m, n, k, a_.stride(0),
                                                                   b_.stride(0), c_.stride(0)]
                args += [r_.stride(0)] if residual else []
                args += [1e-6] if norm else []
                grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
                try:
                    ms = triton.testing.do_bench(lambda: fn[grid](
                        *args, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=warps,
                        num_stages=stages), warmup=10, rep=40, return_mode="median")
                except Exception as e:  # noqa: BLE001 (out of shared memory, ...)
                    results.append((float("inf"), (bm, bn, bk, warps, stages), type(e).__name__))
                    continue
                results.append((ms, (bm, bn, bk, warps, stages), ""))
            results.sort()
            best = results[0]
            line = ", ".join(f"{c}:{flops / ms / 1e9:.0f}" for ms, c, _ in results[:4])
            print(f"{op:20} M{m} N{n} K{k} {'fp32-A' if wide else ''}: best {best[1]} "
                  f"{best[0] * 1e3:.1f} us = {flops / best[0] / 1e9:.0f} TFLOP/s | {line}")


if __name__ == "__main__":
    main()
