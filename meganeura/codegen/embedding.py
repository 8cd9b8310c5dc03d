"""The gather archetype: out[i, :] = stages(table[ids[i], :]). One program per (token, column
block).

Token ids are checked against the vocabulary before any launch; the kernel also clamps
them into the table, so a plan replayed without its input copy (a forward's ids share
memory with buffers written later) never reads outside it. Element stages apply to the
gathered rows on the way (the published Gemma-4 scales its embeddings by sqrt(hidden), and
its per-layer inputs add a projection and scale again), so the table is not copied and the
rows are written once.

bytes: 8 * S (ids) + 2 * elem * S * D (rows read and written) (+ elem * S * D per tile
operand); no FLOPs but the stages'
"""

from __future__ import annotations

import re

from ..compiler.kernels import node_kernel
from .common import HEADER, KernelSpec, Target, cdiv, indent, next_pow2
from .stages import Names, element_stages, variant


def emit(stages) -> str:
    params = ["ids_ptr", "table_ptr", "out_ptr"]
    params += [f"{t.name}_ptr" for t in stages.tiles] + [f"{x.name}_ptr" for x in stages.scalars]
    params += ["V", "D", "stride_t", "stride_out"] + [f"stride_{t.name}" for t in stages.tiles]
    params += [name for name, _ in stages.values]

    def value(x):
        if x.kind == "scalar":
            return [], f"tl.load({x.name}_ptr).to(tl.float32)"
        return [], (f"tl.load({x.name}_ptr + row.to(tl.int64) * stride_{x.name} + cols, "
                    "mask=mask, other=0.0).to(tl.float32)")
    steps = [stages.lines(k, "v", value) for k in range(len(stages.stages))]
    if not steps:
        lines, result = [], "x"
    elif len(steps) == 1 and len(steps[0]) == 1:  # one expression, inline in the store
        lines, result = [], re.sub(r"\bv\b", "x.to(tl.float32)", steps[0][0].split(" = ", 1)[1])
    else:
        lines, result = ["v = x.to(tl.float32)"] + [x for step in steps for x in step], "v"
    return HEADER + f"def embedding_kernel({', '.join(params)}, BLOCK_D: tl.constexpr):\n" + indent(f'''
row = tl.program_id(0)
cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
mask = cols < D
tok = tl.minimum(tl.maximum(tl.load(ids_ptr + row).to(tl.int64), 0), V - 1)
x = tl.load(table_ptr + tok * stride_t + cols, mask=mask, other=0.0)
{"".join(line + chr(10) for line in lines)}tl.store(out_ptr + row.to(tl.int64) * stride_out + cols, ({result}).to(out_ptr.dtype.element_ty),
         mask=mask)
''', 4) + "\n"


def build(node, graph, target: Target) -> KernelSpec:
    k = node_kernel(node)
    ids, table = (graph[node.inputs[i]] for i in k.main)
    s, d = node.shape
    stages = element_stages(k.epilogue, node, graph, Names({"v", "x"}), node.shape)
    bd = min(next_pow2(d), 128 if target.interpreted else 1024)
    args = [("node", ids.id), ("node", table.id), ("node", node.id)]
    args += [("node", node.inputs[t.input]) for t in stages.tiles + stages.scalars]
    args += [("value", table.shape[0]), ("value", d), ("stride", table.id), ("stride", node.id)]
    args += [("stride", node.inputs[t.input]) for t in stages.tiles]
    args += [("value", v) for _, v in stages.values]
    return KernelSpec("embedding", variant((), k.epilogue) or "gather", emit(stages),
                      "embedding_kernel", (s, cdiv(d, bd)), args, dict(BLOCK_D=bd), num_warps=4,
                      num_stages=1)
