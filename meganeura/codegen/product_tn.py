"""The reduction product: C = A^T B, a sum over the rows both operands share (a weight's
gradient, dW = dY^T X, read where the activations lie: no transposed copy).

    C[m, n] = sum_t A[t, m] B[t, n]        A [T, M], B [T, N], C [M, N] (fp32)

One program per [BLOCK_M, BLOCK_N] tile of C, looping over T in BLOCK_K rows: the A tile
is loaded [BLOCK_K, BLOCK_M] and fed transposed to the matrix units. Both operands are cast
to the plan's dtype for the dot (one may be fp32: the residual stream's gradient); the
accumulator is fp32 and C is kept in fp32 (gradients are summed and fed to the optimizer
in fp32).

bytes: elem * T * (M * ceil(N / BLOCK_N) + N * ceil(M / BLOCK_M)) + 4 * M * N
FLOPs: 2 * M * N * T on the matrix units
"""

from __future__ import annotations

import torch

from .common import HEADER, KernelSpec, Target, cdiv, indent

BLOCKS_CPU, BLOCKS_GPU = (16, 32, 16), (128, 128, 64)  # (BLOCK_M, BLOCK_N, BLOCK_K)


def emit(dot_dtype: str, precision: str) -> str:
    return HEADER + "def product_tn_kernel(a_ptr, b_ptr, c_ptr, T, M, N, " \
        "stride_a, stride_b, stride_c, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, " \
        "BLOCK_K: tl.constexpr):\n" + indent(f"""
rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
for t0 in range(0, T, BLOCK_K):
    rt = t0 + tl.arange(0, BLOCK_K)
    rows = rt[:, None] < T
    a = tl.load(a_ptr + rt[:, None].to(tl.int64) * stride_a + rm[None, :],
                mask=rows & (rm[None, :] < M), other=0.0)
    b = tl.load(b_ptr + rt[:, None].to(tl.int64) * stride_b + rn[None, :],
                mask=rows & (rn[None, :] < N), other=0.0)
    acc += tl.dot(tl.trans(a.to({dot_dtype})), b.to({dot_dtype}), input_precision="{precision}")
tl.store(c_ptr + rm[:, None].to(tl.int64) * stride_c + rn[None, :], acc,
         mask=(rm[:, None] < M) & (rn[None, :] < N))
""", 4) + "\n"


def build(node, graph, target: Target) -> KernelSpec:
    a, b = (graph[i] for i in node.inputs)
    t, m = a.shape
    n = b.shape[1]
    bm, bn, bk = BLOCKS_CPU if target.interpreted else BLOCKS_GPU
    dot = "tl.float32" if target.dtype == torch.float32 else "tl.bfloat16"
    args = [("node", a.id), ("node", b.id), ("node", node.id), ("value", t), ("value", m),
            ("value", n), ("stride", a.id), ("stride", b.id), ("stride", node.id)]
    return KernelSpec("product_tn", "plain", emit(dot, target.dot_precision),
                      "product_tn_kernel", (cdiv(m, bm), cdiv(n, bn)), args,
                      dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk),
                      num_warps=4 if target.interpreted else 8, num_stages=1 if
                      target.interpreted else 3)
