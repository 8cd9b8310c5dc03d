"""Sweep of the decode-step attention over the KV cache on the GPU: key block and slots per
program (the split), the two kernels (partials, then their merge) timed together.

    python benchmarks/decode_attention_sweep.py
    python benchmarks/decode_attention_sweep.py --shapes e4b-ring

Each configuration runs the generated kernels (codegen/decode_attention.py) on random
q, K and V with the cache full, replayed 50 times in one CUDA graph (prefill.graph_time);
the table gives microseconds per step and the bandwidth of the cache bytes read. The best
configuration per shape is what `decode_attention.build` should choose.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from matvec_sweep import print_best, sweep_device, time_config  # noqa: E402

from meganeura.compiler.cost import head_dim_chunks  # noqa: E402
from meganeura.codegen.common import next_pow2  # noqa: E402
from meganeura.codegen.decode_attention import emit, emit_combine  # noqa: E402

# name: (slots, query heads, kv heads, head width); the decode plans' attention layers
SHAPES = {
    "e4b-ring": (512, 8, 2, 256),
    "e4b-full-4096": (4352, 8, 2, 512),
    "e4b-full-32768": (33024, 8, 2, 512),
    "31b-ring": (1024, 32, 16, 256),
    "31b-full-4096": (4352, 32, 4, 512),
    "seed-ring": (1024, 8, 4, 256),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    args = ap.parse_args(argv)
    if (setup := sweep_device()) is None:
        return 2
    dev, cache = setup
    for name in args.shapes:
        slots, heads, kv, hd = SHAPES[name]
        group = heads // kv
        widths = head_dim_chunks(hd)
        single = cache.load(emit("ieee", hd, False), "decode_attention_kernel", False)
        split_fn = cache.load(emit("ieee", hd, True), "decode_attention_kernel", False)
        combine = cache.load(emit_combine(), "decode_combine_kernel", False)
        q = torch.randn(1, heads * hd, device=dev, dtype=torch.bfloat16)
        k = torch.randn(slots, kv * hd, device=dev, dtype=torch.bfloat16)
        v = torch.randn(slots, kv * hd, device=dev, dtype=torch.bfloat16)
        pos = torch.tensor([slots + 5], device=dev, dtype=torch.int64)  # the cache full
        o = torch.empty(1, heads * hd, device=dev, dtype=torch.bfloat16)
        scale = math.log2(math.e) * hd ** -0.5
        cx = dict(GROUP=group, HEAD_DIM=hd, **{f"D{i}": w for i, w in enumerate(widths)},
                  BLOCK_G=max(16, next_pow2(group)))
        nbytes = 2 * k.numel() * 2
        results = []
        for block_n in (16, 32, 64):
            for chunk in (block_n, 2 * block_n, 4 * block_n, 8 * block_n, 16 * block_n, slots):
                splits = -(-slots // chunk)
                if chunk > slots or splits > 1024:
                    continue
                for warps in (4, 8):
                    if splits == 1:
                        def step():
                            single[(kv, 1)](q, k, v, pos, o, k.stride(0), v.stride(0), slots,
                                            scale, **cx, BLOCK_N=block_n, num_warps=warps,
                                            num_stages=2)
                    else:
                        po = torch.empty(kv, splits, group, hd, device=dev)
                        pm = torch.empty(kv, splits, group, device=dev)
                        pl = torch.empty(kv, splits, group, device=dev)
                        bd, bj = min(128, next_pow2(hd)), min(64, next_pow2(splits))

                        def step(po=po, pm=pm, pl=pl, splits=splits, chunk=chunk, bd=bd, bj=bj):
                            split_fn[(kv, splits)](q, k, v, pos, o, po, pm, pl, k.stride(0),
                                                   v.stride(0), slots, scale, **cx,
                                                   BLOCK_N=block_n, CHUNK=chunk, SPLITS=splits,
                                                   num_warps=warps, num_stages=2)
                            combine[(heads, -(-hd // bd))](po, pm, pl, pos, o, slots, GROUP=group,
                                                           HEAD_DIM=hd, CHUNK=chunk, SPLITS=splits,
                                                           BLOCK_D=bd, BLOCK_J=bj, num_warps=4,
                                                           num_stages=1)
                    label = (f"BLOCK_N={block_n:<3} CHUNK={chunk:<6} splits={splits:<4} "
                             f"warps={warps}")
                    time_config(results, step, name, label)
        print_best(f"{name}: {slots} slots, {heads} heads over {kv} kv heads of {hd}, "
                   f"{nbytes / 1e6:.1f} MB of cache", results, nbytes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
