"""The reduction product: C = A^T B, a sum over the rows both operands share (a weight's
gradient, dW = dY^T X, read where the activations lie: no transposed copy).

    C[m, n] = sum_t A[t, m] B[t, n]        A [T, M], B [T, N], C [M, N] (fp32)

One program per [BLOCK_M, BLOCK_N] tile of C and share of T, looping over its rows in
BLOCK_K: the A tile is loaded [BLOCK_K, BLOCK_M] and fed transposed to the matrix units.
Both operands are cast to the plan's dtype for the dot (one may be fp32: the residual
stream's gradient); the accumulator is fp32 and C is kept in fp32 (gradients are summed and
fed to the optimizer in fp32). A thin C (a LoRA adapter's gradient: 16 columns, or 16 rows)
takes tiles of that width, and where C's tiles are too few to fill the SMs (e4b's adapters:
20 to 80) the rows are split among programs (cost.tn_tiles): each share's sum goes to an
fp32 scratch and a last kernel adds the shares in order (the same bits every run).

bytes: elem * T * (M * ceil(N / BLOCK_N) + N * ceil(M / BLOCK_M)) + 4 * M * N (+ 8 * M * N
a share)
FLOPs: 2 * M * N * T on the matrix units
"""

from __future__ import annotations

import torch

from ..compiler.cost import tn_tiles
from .common import HEADER, KernelSpec, Target, cdiv, indent

BLOCKS_CPU, BLOCK_K_GPU = (16, 32, 16), 64  # (BLOCK_M, BLOCK_N, BLOCK_K) on the interpreter


def emit(dot_dtype: str, precision: str) -> str:
    return HEADER + "def product_tn_kernel(a_ptr, b_ptr, c_ptr, T, M, N, " \
        "stride_a, stride_b, stride_c, SHARE, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, " \
        "BLOCK_K: tl.constexpr, SPLIT: tl.constexpr):\n" + indent(f"""
rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
s = tl.program_id(2)  # rows [s * SHARE, (s + 1) * SHARE) of T
end = tl.minimum(s * SHARE + SHARE, T)
acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
for t0 in range(s * SHARE, end, BLOCK_K):
    rt = t0 + tl.arange(0, BLOCK_K)
    rows = rt[:, None] < end
    a = tl.load(a_ptr + rt[:, None].to(tl.int64) * stride_a + rm[None, :],
                mask=rows & (rm[None, :] < M), other=0.0)
    b = tl.load(b_ptr + rt[:, None].to(tl.int64) * stride_b + rn[None, :],
                mask=rows & (rn[None, :] < N), other=0.0)
    acc += tl.dot(tl.trans(a.to({dot_dtype})), b.to({dot_dtype}), input_precision="{precision}")
if SPLIT > 1:  # the share's sum into the scratch [SPLIT, M, N]
    at = c_ptr + (s * M + rm[:, None]).to(tl.int64) * N + rn[None, :]
else:
    at = c_ptr + rm[:, None].to(tl.int64) * stride_c + rn[None, :]
tl.store(at, acc, mask=(rm[:, None] < M) & (rn[None, :] < N))
""", 4) + "\n"


def emit_sum() -> str:
    return HEADER + "def product_tn_sum_kernel(p_ptr, c_ptr, M, N, stride_c, " \
        "SPLIT: tl.constexpr, BLOCK: tl.constexpr):\n" + indent("""
i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
ok = i < M * N
acc = tl.zeros((BLOCK,), dtype=tl.float32)
share = p_ptr
for s in range(SPLIT):  # in order: the same bits every run
    acc += tl.load(share + i, mask=ok, other=0.0)
    share += M * N
tl.store(c_ptr + (i // N).to(tl.int64) * stride_c + i % N, acc, mask=ok)
""", 4) + "\n"


def build(node, graph, target: Target) -> KernelSpec:
    a, b = (graph[i] for i in node.inputs)
    t, m = a.shape
    n = b.shape[1]
    if target.interpreted:
        bm, bn, bk = BLOCKS_CPU
        split = 2 if target.interpreter_splits and t >= 2 * bk else 1
    else:
        bm, bn, split = tn_tiles(t, m, n, target.sm_count)
        bk = BLOCK_K_GPU
    share = cdiv(cdiv(t, split), bk) * bk
    split = cdiv(t, share)
    dot = "tl.float32" if target.dtype == torch.float32 else "tl.bfloat16"
    out = ("scratch", ("product_tn_shares", (split, m, n), "fp32")) if split > 1 else \
        ("node", node.id)
    args = [("node", a.id), ("node", b.id), out, ("value", t), ("value", m),
            ("value", n), ("stride", a.id), ("stride", b.id), ("stride", node.id),
            ("value", share)]
    spec = KernelSpec("product_tn", "plain" if split == 1 else "split", emit(dot,
                      target.dot_precision), "product_tn_kernel",
                      (cdiv(m, bm), cdiv(n, bn), split), args,
                      dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT=split),
                      num_warps=4 if target.interpreted or bm * bn <= 128 * 32 else 8,
                      num_stages=1 if target.interpreted else 3)
    if split > 1:
        block = 1024
        spec.then = KernelSpec("product_tn", "share-sum", emit_sum(), "product_tn_sum_kernel",
                               (cdiv(m * n, block),),
                               [out, ("node", node.id), ("value", m), ("value", n),
                                ("stride", node.id)], dict(SPLIT=split, BLOCK=block),
                               num_warps=4, num_stages=1)
    return spec
