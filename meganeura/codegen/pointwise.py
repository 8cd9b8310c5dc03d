"""The pointwise archetype: element stages on a tensor, computed in fp32.

    out[m, n] = stages(x[m, n], r[m, n], ..., s[0], ...)

Each stage is an element op (codegen/elementwise.py) on the running value, starting from x:
an unfused add, glu, scale, scale_by or soft-cap is one stage, fused chains are several.
Tile operands are loaded beside x (x0 is x, x1, x2 ... the operands in the order the stages
read them), scalars read once; constants travel as kernel arguments; inputs may be strided
column views. One program per (row block, column block).

bytes: elem * (k + 1) * M * N for k tile operands; FLOPs: a few per element and stage
"""

from __future__ import annotations

from ..compiler.kernels import node_kernel
from .common import HEADER, KernelSpec, Target, cdiv, indent, next_pow2
from .stages import Names, element_stages, variant


def emit(stages) -> str:
    """stages: the kernel's element stages with their operands named (stages.Stages)."""
    tiles = ["in0"] + [f"in{i + 1}" for i in range(len(stages.tiles))]
    params = [f"{t}_ptr" for t in tiles] + [f"{x.name}_ptr" for x in stages.scalars]
    params += ["out_ptr", "M", "N"] + [f"stride_{t}" for t in tiles] + ["stride_out"]
    params += [name for name, _ in stages.values]
    params += ["BLOCK_M: tl.constexpr", "BLOCK_N: tl.constexpr"]
    loads = "\n".join(f"x{i} = tl.load({t}_ptr + rm[:, None] * stride_{t} + rn[None, :], "
                      f"mask=mask, other=0.0).to(tl.float32)" for i, t in enumerate(tiles))
    index = {x.name: f"x{i + 1}" for i, x in enumerate(stages.tiles)}

    def value(x):
        if x.kind == "scalar":
            return [], f"tl.load({x.name}_ptr).to(tl.float32)"
        return [], index[x.name]
    if len(stages.stages) == 1:  # one stage: it reads the loaded x0 and writes y
        lines = stages.lines(0, "x0", value)
        lines[-1] = "y = " + lines[-1].split(" = ", 1)[1]
    else:
        lines = ["y = x0"] + [x for k in range(len(stages.stages))
                              for x in stages.lines(k, "y", value)]
    body = f'''
rm = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
mask = (rm[:, None] < M) & (rn[None, :] < N)
{loads}
{chr(10).join(lines)}
tl.store(out_ptr + rm[:, None] * stride_out + rn[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)
'''
    return HEADER + f"def pointwise_kernel({', '.join(params)}):\n" + indent(body, 4) + "\n"


def build(node, graph, target: Target) -> KernelSpec:
    k = node_kernel(node)
    m, n = node.shape
    bm, bn = (16, 32) if target.interpreted else (8, min(next_pow2(n), 512))
    stages = element_stages(k.epilogue, node, graph, Names({"y", "x0"}), node.shape)
    x = node.inputs[k.main[0]]
    ins = [x] + [node.inputs[t.input] for t in stages.tiles]
    args = [("node", i) for i in ins] + [("node", node.inputs[s.input]) for s in stages.scalars]
    args += [("node", node.id), ("value", m), ("value", n)]
    args += [("stride", i) for i in ins] + [("stride", node.id)]
    args += [("value", v) for _, v in stages.values]
    return KernelSpec("pointwise", variant((), k.epilogue), emit(stages), "pointwise_kernel",
                      (cdiv(m, bm), cdiv(n, bn)), args, dict(BLOCK_M=bm, BLOCK_N=bn), num_warps=4,
                      num_stages=1)
