"""Embedding gather: out[i, :] = table[ids[i], :]. One program per (token, column block).

Token ids are checked against the vocabulary before any launch, so the gather never
reads outside the table.

bytes: 8 * S (ids) + 2 * elem * S * D (rows read and written); no FLOPs
"""

from __future__ import annotations

from .common import HEADER, KernelSpec, Target, cdiv, indent, next_pow2

OPS = ("embedding",)

SOURCE = HEADER + "def embedding_kernel(ids_ptr, table_ptr, out_ptr, D, stride_t, stride_out, " \
    "BLOCK_D: tl.constexpr):\n" + indent('''
row = tl.program_id(0)
cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
mask = cols < D
tok = tl.load(ids_ptr + row).to(tl.int64)
x = tl.load(table_ptr + tok * stride_t + cols, mask=mask, other=0.0)
tl.store(out_ptr + row * stride_out + cols, x.to(out_ptr.dtype.element_ty), mask=mask)
''', 4) + "\n"


def build(node, graph, target: Target) -> KernelSpec:
    ids, table = (graph[i] for i in node.inputs)
    s, d = node.shape
    bd = min(next_pow2(d), 128 if target.interpreted else 1024)
    args = [("node", ids.id), ("node", table.id), ("node", node.id), ("value", d),
            ("stride", table.id), ("stride", node.id)]
    return KernelSpec("embedding", "gather", SOURCE, "embedding_kernel", (s, cdiv(d, bd)), args,
                      dict(BLOCK_D=bd), num_warps=4, num_stages=1)
