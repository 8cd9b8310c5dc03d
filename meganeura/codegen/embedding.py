"""Embedding gather: out[i, :] = table[ids[i], :] (* factor). One program per (token, column block).

Token ids are checked against the vocabulary before any launch; the kernel also clamps
them into the table, so a plan replayed without its input copy (a forward's ids share
memory with buffers written later) never reads outside it. embedding_scale multiplies the
rows by a constant on the way (the published Gemma-4 scales its embeddings by
sqrt(hidden)), so the table is not copied.

bytes: 8 * S (ids) + 2 * elem * S * D (rows read and written); no FLOPs
"""

from __future__ import annotations

from .common import HEADER, KernelSpec, Target, cdiv, indent, next_pow2

OPS = ("embedding", "embedding_scale")


def emit(scaled: bool) -> str:
    params = ["ids_ptr", "table_ptr", "out_ptr", "V", "D", "stride_t", "stride_out"]
    params += ["factor"] if scaled else []
    value = "x.to(tl.float32) * factor" if scaled else "x"
    return HEADER + f"def embedding_kernel({', '.join(params)}, BLOCK_D: tl.constexpr):\n" + indent(f'''
row = tl.program_id(0)
cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
mask = cols < D
tok = tl.minimum(tl.maximum(tl.load(ids_ptr + row).to(tl.int64), 0), V - 1)
x = tl.load(table_ptr + tok * stride_t + cols, mask=mask, other=0.0)
tl.store(out_ptr + row.to(tl.int64) * stride_out + cols, ({value}).to(out_ptr.dtype.element_ty),
         mask=mask)
''', 4) + "\n"


def build(node, graph, target: Target) -> KernelSpec:
    ids, table = (graph[i] for i in node.inputs)
    s, d = node.shape
    scaled = node.op == "embedding_scale"
    bd = min(next_pow2(d), 128 if target.interpreted else 1024)
    args = [("node", ids.id), ("node", table.id), ("node", node.id), ("value", table.shape[0]),
            ("value", d), ("stride", table.id), ("stride", node.id)]
    args += [("value", node.attrs["factor"])] if scaled else []
    return KernelSpec("embedding", "scaled-gather" if scaled else "gather", emit(scaled),
                      "embedding_kernel", (s, cdiv(d, bd)), args, dict(BLOCK_D=bd), num_warps=4,
                      num_stages=1)
