"""Block-size sweep of the generated matmul and attention kernels on a model's real shapes.

    python benchmarks/kernel_sweep.py --model gemma4-4b gemma4-12b --seq-len 2048

Matmuls: each distinct (variant, M, N, K) of the model's plan, timed under each
candidate configuration, with pointer loads and with tensor-descriptor (TMA) loads; a
product whose weight is a concatenation of several (q | k | v) also with the weights read
in place (one K loop per part), at 2 to 4 stages.
Halves (`--only halves`): the plain, residual and gate | up products whose last wave the
plan runs in half-height tiles (B one [K, N] tensor, A bf16), timed with whole tiles, with
the last wave halved, and with every tile halved (a half tile's time).
Rows (`--only rows`): each distinct row kernel of the plan under rows a program x warps
(4, 8, 16), on contiguous random operands.
Attention: the model's causal and sliding-window shapes (q, k, v as column slices of
one merged projection, as in the plan), timed under each candidate (BLOCK_M, BLOCK_N,
warps, stages), next to PyTorch's flash SDPA on the same problem, with the largest
difference from SDPA's output. triton.testing.do_bench (L2 flushed, median); the best
configurations feed the tables of codegen/matmul.py and codegen/attention.py.
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F
import triton.testing

from meganeura.codegen.attention import emit as emit_attention
from meganeura.codegen.cache import KernelCache
from meganeura.codegen.matmul import emit as emit_matmul
from meganeura.codegen.matmul import weight_parts
from meganeura.codegen.stages import Operand, Stages
from meganeura.compiler.cost import H200, CostModel, attention_pairs, head_dim_chunks
from meganeura.compiler.kernels import Stage, node_kernel, summary
from meganeura.models import MODEL_NAMES, PRESETS, build
from meganeura.pipeline import optimize_graph as optimize

MATMUL = [  # BLOCK_M, BLOCK_N, BLOCK_K, warps, stages
    (128, 256, 64, 8, 3), (128, 256, 64, 8, 4), (128, 128, 64, 8, 4), (128, 128, 64, 4, 4),
    (64, 256, 64, 4, 4), (64, 128, 64, 4, 4),
    # two programs an SM (96 or 64 KiB of stage buffers each): one's epilogue runs beside
    # the other's K loop
    (128, 128, 64, 4, 3), (128, 128, 64, 4, 2), (128, 128, 64, 8, 3),
]
ATTENTION = {  # padded head width -> BLOCK_M, BLOCK_N, warps, stages
    "narrow": [(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3),
               (128, 32, 8, 3), (128, 128, 8, 2)],
    "wide": [(64, 64, 4, 2), (128, 64, 8, 2), (64, 32, 4, 2), (128, 32, 8, 2), (64, 64, 8, 2),
             (64, 128, 8, 2)],
}


def product_kind(n) -> tuple[str, bool, bool, bool] | None:
    """(kernel name, norm prologue, paired gate | up, residual epilogue) of a plan's product
    whose stages the sweeps time (those three), else None."""
    k = node_kernel(n)
    if k is None or k.archetype != "product":
        return None
    ops = [st.op + (".pair" if st.pair else "") for st in k.epilogue]
    if not set(ops) <= {"glu.pair", "add"}:
        return None
    return summary(n.op, n.attrs), bool(k.prologue), k.paired, "add" in ops


def emit_product(norm: bool, paired: bool, residual: bool, tma: bool, halves: bool = False) -> str:
    """The product kernel's source with those stages (SwiGLU of paired halves, a residual
    tile operand r), as codegen/matmul.py emits it for a plan."""
    stages, attrs, operands = [], [], {}
    if paired:
        stages.append(Stage("glu", (), (("act", "silu"),), 0, True))
        attrs.append({"act": "silu"})
    if residual:
        stages.append(Stage("add", (2,)))
        attrs.append({})
        operands[2] = Operand(2, "tile", "r")
    return emit_matmul(Stages(stages, operands, [], attrs), norm, "tf32", tma, halves=halves)


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")


def sweep_matmuls(model: str, seq: int, cache: KernelCache, max_n: int) -> None:
    from triton.tools.tensor_descriptor import TensorDescriptor

    plan, _ = optimize(build(PRESETS[MODEL_NAMES[model]], seq), CostModel(H200, "bf16"))
    g = plan.graph
    shapes, split = {}, {}
    for i in plan.launches:
        n = g[i]
        kind = product_kind(n)
        if kind is not None and n.shape[1] <= max_n:
            key = (kind, g[n.inputs[0]].shape[0], n.shape[1], g[n.inputs[0]].shape[1])
            shapes[key] = 1
            parts = weight_parts(g, n.inputs[1])
            if n.op == "matmul" and len(parts) > 1:
                split[key] = [g[p].shape[1] for p in parts]
    for key, widths in split.items():
        sweep_parts(model, *key[1:], widths, cache)
    for (op, norm, paired, residual), m, n, k in shapes:
        a_ = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        nw_ = torch.rand(k, device="cuda", dtype=torch.bfloat16) + 0.5
        b_ = torch.randn(k, 2 * n if paired else n, device="cuda", dtype=torch.bfloat16)
        c_ = torch.empty(m, n, device="cuda", dtype=torch.float32 if residual else torch.bfloat16)
        r_ = torch.randn(m, n, device="cuda", dtype=torch.float32)
        flops = 2 * m * k * (2 * n if paired else n)
        results = []
        for tma in (False, True):
            fn = cache.load(emit_product(norm, paired, residual, tma), "matmul_kernel", False)
            for bm, bn, bk, warps, stages in MATMUL:
                if tma:
                    head = [TensorDescriptor.from_tensor(a_, [bm, bk]),
                            TensorDescriptor.from_tensor(b_, [bk, bn])]
                else:
                    head = [a_, b_]
                args = head + [c_] + ([r_] if residual else []) + ([nw_] if norm else []) + [m, n, k]
                args += [] if tma else [a_.stride(0), b_.stride(0), 1]
                args += [c_.stride(0)] + ([r_.stride(0)] if residual else [])
                args += [1e-6] if norm else []
                grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
                cfg = ("tma" if tma else "ptr", bm, bn, bk, warps, stages)
                try:
                    ms = bench(lambda: fn[grid](*args, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                                                GROUP_M=8, num_warps=warps, num_stages=stages))
                except Exception as e:  # noqa: BLE001 (out of shared memory, ...)
                    print(f"  {cfg}: {type(e).__name__}")
                    continue
                results.append((ms, cfg))
        results.sort()
        line = ", ".join(f"{c}:{flops / ms / 1e9:.0f}" for ms, c in results[:5])
        best = results[0]
        print(f"{model} {op:20} M{m} N{n} K{k}: best {best[1]} {best[0] * 1e3:.1f} us = "
              f"{flops / best[0] / 1e9:.0f} TFLOP/s | {line}", flush=True)


def sweep_parts(model: str, m: int, n: int, k: int, widths: list[int], cache) -> None:
    """q | k | v: the weights read in place (one K loop per part) against their
    concatenation, 128x128 and 128x256 tiles, 2 to 4 stages; out-of-resources reported."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    a_ = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    ws = [torch.randn(k, w, device="cuda", dtype=torch.bfloat16) for w in widths]
    whole = torch.cat(ws, dim=1)
    c_ = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
    ends = [sum(widths[:i + 1]) for i in range(len(widths) - 1)]
    flops = 2 * m * n * k
    ref = None
    line = []
    for parts in (1, len(widths)):
        fn = cache.load(emit_matmul(Stages([]), False, "tf32", True, parts),
                        "matmul_kernel", False)
        for bm, bn, warps in ((128, 128, 4), (128, 256, 8)):
            if parts > 1 and any(w % bn for w in widths[:-1]):
                continue
            for stages in (2, 3, 4):
                bs = [whole] if parts == 1 else ws
                args = [TensorDescriptor.from_tensor(a_, [bm, 64])]
                args += [TensorDescriptor.from_tensor(b, [64, bn]) for b in bs]
                args += [c_, m, n, k, c_.stride(0)] + (ends if parts > 1 else [])
                grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
                tag = f"{'in place' if parts > 1 else 'concat'} {bm}x{bn} s{stages}"
                try:
                    ms = bench(lambda: fn[grid](*args, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=64,
                                                GROUP_M=8, num_warps=warps, num_stages=stages))
                except Exception as e:  # noqa: BLE001
                    line.append(f"{tag}: {type(e).__name__}")
                    continue
                ref = c_.float().clone() if ref is None else ref
                err = (c_.float() - ref).abs().max().item()
                line.append(f"{tag}: {flops / ms / 1e9:.0f} (diff {err:.1e})")
    print(f"{model} q|k|v M{m} N{n} K{k} parts {widths}: " + ", ".join(line), flush=True)


def sweep_attention(model: str, seq: int, cache: KernelCache) -> None:
    cfg = PRESETS[MODEL_NAMES[model]]
    h, kv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    widths = head_dim_chunks(hd)
    gen = torch.Generator(device="cuda").manual_seed(0)
    qkv = torch.randn(seq, (h + 2 * kv) * hd, device="cuda", dtype=torch.bfloat16, generator=gen)
    q, k, v = qkv[:, :h * hd], qkv[:, h * hd:(h + kv) * hd], qkv[:, (h + kv) * hd:]
    out = torch.empty(seq, h * hd, device="cuda", dtype=torch.bfloat16)
    windows = [None] + ([cfg.sliding_window_size] if cfg.sliding_window_size < seq else [])
    for window in windows:
        sliding = window is not None
        flops = 4 * h * hd * attention_pairs(seq, window)
        qh, kh, vh = (t.reshape(seq, -1, hd).transpose(0, 1)[None] for t in (q, k, v))
        kh, vh = (t.repeat_interleave(h // kv, dim=1) for t in (kh, vh))
        mask = None
        if sliding:
            i = torch.arange(seq, device="cuda")
            mask = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - window)
        sdpa = (lambda: F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask)) if sliding \
            else (lambda: F.scaled_dot_product_attention(qh, kh, vh, is_causal=True))
        ref = sdpa()[0].transpose(0, 1).reshape(seq, h * hd).float()
        ref_ms = bench(sdpa)
        fn = cache.load(emit_attention(sliding, "tf32", hd), "attention_kernel", False)
        results = []
        for bm, bn, warps, stages in ATTENTION["narrow" if sum(widths) <= 144 else "wide"]:
            args = [q, k, v, out, q.stride(0), k.stride(0), v.stride(0), out.stride(0), seq,
                    math.log2(math.e) / math.sqrt(hd)] + ([window] if sliding else [])
            kw = dict(GROUP=h // kv, HEAD_DIM=hd, **{f"D{i}": w for i, w in enumerate(widths)},
                      BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages)
            grid = (h, triton.cdiv(seq, bm))
            try:
                ms = bench(lambda: fn[grid](*args, **kw))
            except Exception as e:  # noqa: BLE001
                print(f"  {(bm, bn, warps, stages)}: {type(e).__name__}")
                continue
            err = (out.float() - ref).abs().max().item()
            results.append((ms, (bm, bn, warps, stages), err))
        results.sort()
        line = ", ".join(f"{c}:{flops / ms / 1e9:.0f}(err {e:.1e})" for ms, c, e in results)
        print(f"{model} S{seq} {'sliding ' + str(window) if sliding else 'causal'} H{h} KV{kv} "
              f"hd{hd}: SDPA {ref_ms * 1e3:.0f} us = {flops / ref_ms / 1e9:.0f} TFLOP/s; best "
              f"{results[0][1]} {results[0][0] * 1e3:.0f} us | {line}", flush=True)


def sweep_halves(model: str, seq: int, cache: KernelCache) -> None:
    """Every plain, residual or gate | up product of the plan whose last wave the cost model
    halves, timed three ways in one process: whole tiles, the last wave's tiles as
    half-height pairs (the plan's schedule, with B one [K, N] tensor and A bf16), and every
    tile halved; the last gives a half tile's time against a whole one's
    (cost.HALF_TILE_TIME)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    from meganeura.codegen import Target
    from meganeura.codegen.common import fit_stages
    from meganeura.codegen.matmul import tiles
    from meganeura.compiler.cost import halve_last_wave

    plan, _ = optimize(build(PRESETS[MODEL_NAMES[model]], seq), CostModel(H200, "bf16"))
    g = plan.graph
    target = Target(torch.device("cuda"), torch.bfloat16)
    sms = target.sm_count
    shapes = {}
    for i in plan.launches:
        n = g[i]
        kind = product_kind(n)
        if kind is not None and not kind[1] and g[n.inputs[0]].shape[0] > 64:
            shapes[(kind, g[n.inputs[0]].shape[0], n.shape[1], g[n.inputs[0]].shape[1])] = 1
    for (op, _, paired, residual), m, n, k in shapes:
        cfg = tiles(m, n, k, paired, residual, target)
        bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
        if not halve_last_wave(m, n, bm, bn, sms):
            continue
        a_ = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        b_ = torch.randn(k, 2 * n if paired else n, device="cuda", dtype=torch.bfloat16) / k ** 0.5
        c_ = torch.empty(m, n, device="cuda", dtype=torch.float32 if residual else torch.bfloat16)
        r_ = torch.randn(m, n, device="cuda", dtype=torch.float32)
        t = triton.cdiv(m, bm) * triton.cdiv(n, bn)
        full = t - t % sms
        times, outs = {}, {}
        for label, halves, first in (("whole", False, t), ("last wave halved", True, full),
                                     ("all halved", True, 0)):
            fn = cache.load(emit_product(False, paired, residual, True, halves), "matmul_kernel",
                            False)
            args = [TensorDescriptor.from_tensor(a_, [bm, bk])]
            args += [TensorDescriptor.from_tensor(a_, [bm // 2, bk])] if halves else []
            args += [TensorDescriptor.from_tensor(b_, [bk, bn]), c_] + ([r_] if residual else [])
            args += [m, n, k, c_.stride(0)] + ([r_.stride(0)] if residual else [])
            args += [first] if halves else []
            grid = (first + 2 * (t - first),)
            warps = 8 if paired or bn == 256 else 4

            stages = fit_stages(bk * 2 * (bm + bn * (2 if paired else 1)), 0, 4)

            def run():
                fn[grid](*args, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8,
                         num_warps=warps, num_stages=stages)
            times[label] = bench(run)
            outs[label] = c_.clone()
        agree = max((outs[x].float() - outs["whole"].float()).abs().max().item() for x in outs)
        waves, half_waves = -(-t // sms), -(-2 * t // sms)
        half = times["all halved"] / half_waves / (times["whole"] / waves)
        print(f"{model} {op:10} M{m} N{n} K{k} tiles {bm}x{bn}: {t} tiles on {sms} SMs | "
              + " | ".join(f"{x} {ms * 1e3:.1f} us" for x, ms in times.items())
              + f" | a half tile {half:.2f} of a whole one's time | max diff {agree:.2e}",
              flush=True)


def sweep_rows(model: str, seq: int, cache: KernelCache) -> None:
    """Every distinct row kernel of the plan (norms, norm + RoPE) under rows a program x warps,
    on contiguous random operands of the plan's shapes (a column slice of q | k | v becomes
    a tensor of its own); microseconds, the plan's choice marked where it was timed."""
    from meganeura.codegen import Target, kernel_for
    from meganeura.compiler.formulas import rope_frequencies
    from meganeura.compiler.plan import holds_fp32

    plan, _ = optimize(build(PRESETS[MODEL_NAMES[model]], seq), CostModel(H200, "bf16"))
    g = plan.graph
    target = Target(torch.device("cuda"), torch.bfloat16)
    seen = set()
    for i in plan.launches:
        spec = kernel_for(g[i], g, target)
        if spec.archetype != "rowwise":
            continue
        key = (spec.variant, tuple(g[i].shape), tuple(sorted(spec.constexprs.items())))
        if key in seen:
            continue
        seen.add(key)
        tensors, args = {}, []
        for kind, x in spec.args:
            if kind in ("node", "stride") and x not in tensors:
                dt = torch.float32 if holds_fp32(g, x) else torch.bfloat16
                tensors[x] = torch.randn(g[x].shape, device="cuda", dtype=dt)
            if kind == "node":
                args.append(tensors[x])
            elif kind == "stride":
                args.append(tensors[x].stride(0))
            elif kind == "rope_freq":
                args.append(rope_frequencies(x[1], x[0], x[2], x[3]).cuda())
            else:
                args.append(x)
        fn = cache.load(spec.source, spec.entry, False)
        s_rows = g[i].shape[0]
        results = []
        for rows in (1, 2, 4, 8):
            for warps in (4, 8, 16):
                cx = {**spec.constexprs, "ROWS": rows}
                grid = (triton.cdiv(s_rows, rows),)
                try:
                    us = bench(lambda: fn[grid](*args, **cx, num_warps=warps, num_stages=1)) * 1e3
                except Exception as e:  # noqa: BLE001 (out of registers, ...)
                    print(f"  rows {rows} warps {warps}: {type(e).__name__}")
                    continue
                mine = rows == spec.constexprs["ROWS"] and warps == spec.num_warps
                results.append((us, f"{rows}x{warps}" + ("*" if mine else "")))
        results.sort()
        print(f"{model} {g[i].op:16} {spec.variant:24} {list(g[i].shape)} "
              f"{spec.constexprs}: " + ", ".join(f"{c} {us:.1f}" for us, c in results), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", nargs="+", default=["gemma4-4b"])
    ap.add_argument("--seq-len", type=int, nargs="+", default=[2048])
    ap.add_argument("--only", choices=["matmul", "attention", "halves", "rows"], default=None)
    ap.add_argument("--max-n", type=int, default=65536, help="skip wider products (lm_head)")
    a = ap.parse_args()
    cache = KernelCache("/tmp/meganeura-sweep")
    for model in a.model:
        for seq in a.seq_len:
            if a.only in ("halves", "rows"):
                (sweep_halves if a.only == "halves" else sweep_rows)(model, seq, cache)
                continue
            if a.only != "matmul":
                sweep_attention(model, seq, cache)
            if a.only != "attention":
                sweep_matmuls(model, seq, cache, a.max_n)


if __name__ == "__main__":
    main()
