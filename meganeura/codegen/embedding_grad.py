"""A gather's gradient: each row's gradient added into its token's row of the table.

    dT[ids[t], :] += dy[t, :]   for every t whose id is not the padding token

A program per (row block, column block) adds its rows by fp32 atomics into the table's
gradient, zeroed before the launch (KernelSpec.zeroed); the sums' order is not fixed, so
the last bits may differ run to run, as torch's own embedding backward on a GPU.

bytes: elem * T * D + 4 * (V * D zeroed + T * D added)
"""

from __future__ import annotations

from .common import HEADER, KernelSpec, Target, cdiv, indent, next_pow2


def emit() -> str:
    return HEADER + "def embedding_grad_kernel(ids_ptr, dy_ptr, out_ptr, T, D, PAD, stride_dy, " \
        "stride_out, ROWS: tl.constexpr, BLOCK: tl.constexpr):\n" + indent("""
r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)[None, :]
tok = tl.load(ids_ptr + r, mask=r < T, other=0).to(tl.int64)
keep = ((r < T) & (tok != PAD))[:, None] & (c < D)
g = tl.load(dy_ptr + r.to(tl.int64)[:, None] * stride_dy + c, mask=keep, other=0.0)
tl.atomic_add(out_ptr + tok[:, None] * stride_out + c, g.to(tl.float32), mask=keep)
""", 4) + "\n"


def build(node, graph, target: Target) -> KernelSpec:
    ids, dy = (graph[i] for i in node.inputs)
    t, d = dy.shape
    block = min(next_pow2(d), 128 if target.interpreted else 1024)
    rows = min(16, next_pow2(t)) if target.interpreted else 4
    args = [("node", ids.id), ("node", dy.id), ("node", node.id), ("value", t), ("value", d),
            ("value", node.attrs["padding"]), ("stride", dy.id), ("stride", node.id)]
    return KernelSpec("embedding_grad", "atomic", emit(), "embedding_grad_kernel",
                      (cdiv(t, rows), cdiv(d, block)), args, dict(ROWS=rows, BLOCK=block),
                      num_warps=4, num_stages=1, zeroed=node.id)
