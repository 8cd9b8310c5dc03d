"""Pointwise kernels generated from an expression over the inputs, computed in fp32.

    out[m, n] = f(in_0[m, n], ..., in_k[m, n])

The expression comes from the op (add: a + b; swiglu: silu(a) * b); inputs may be
strided column views. One program per (row block, column block).

bytes: elem * (k + 1) * M * N ; FLOPs: a few per element
"""

from __future__ import annotations

from .common import HEADER, KernelSpec, Target, cdiv, indent, next_pow2

# op -> expression over x0, x1, ... (fp32 values); extend here for new pointwise ops
EXPRESSIONS = {
    "add": "x0 + x1",
    "swiglu": "x0 / (1.0 + tl.exp(-x0)) * x1",
}
OPS = tuple(EXPRESSIONS)


def emit(op: str, arity: int) -> str:
    params = [f"in{i}_ptr" for i in range(arity)] + ["out_ptr", "M", "N"]
    params += [f"stride_in{i}" for i in range(arity)] + ["stride_out"]
    params += ["BLOCK_M: tl.constexpr", "BLOCK_N: tl.constexpr"]
    loads = "\n".join(f"x{i} = tl.load(in{i}_ptr + rm[:, None] * stride_in{i} + rn[None, :], "
                      f"mask=mask, other=0.0).to(tl.float32)" for i in range(arity))
    body = f'''
rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
mask = (rm[:, None] < M) & (rn[None, :] < N)
{loads}
y = {EXPRESSIONS[op]}
tl.store(out_ptr + rm[:, None] * stride_out + rn[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)
'''
    return HEADER + f"def pointwise_kernel({', '.join(params)}):\n" + indent(body, 4) + "\n"


def build(node, graph, target: Target) -> KernelSpec:
    m, n = node.shape
    bm, bn = (16, 32) if target.interpreted else (8, min(next_pow2(n), 512))
    arity = len(node.inputs)
    args = [("node", i) for i in node.inputs] + [("node", node.id), ("value", m), ("value", n)]
    args += [("stride", i) for i in node.inputs] + [("stride", node.id)]
    return KernelSpec("pointwise", node.op, emit(node.op, arity), "pointwise_kernel",
                      (cdiv(m, bm), cdiv(n, bn)), args, dict(BLOCK_M=bm, BLOCK_N=bn), num_warps=4,
                      num_stages=1)
