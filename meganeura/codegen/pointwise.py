"""Pointwise kernels generated from an expression over the inputs, computed in fp32.

    out[m, n] = f(in_0[m, n], ..., in_k[m, n])

The expression comes from the op: add (a + b), glu (act(gate) * up), scale (x * factor),
scale_by (x * s[0], s read from the weights), softcap (cap * tanh(x / cap)). Constants
travel as kernel arguments; inputs may be strided column views. One program per
(row block, column block).

bytes: elem * (k + 1) * M * N ; FLOPs: a few per element
"""

from __future__ import annotations

from .common import HEADER, KernelSpec, Target, activation, cdiv, indent, next_pow2, softcap_lines

OPS = ("add", "glu", "scale", "scale_by", "softcap")


def _expression(op: str, act: str | None) -> list[str]:
    """Lines computing y from x0, x1 (fp32 tiles) and the scalars `c` or `s_ptr`."""
    if op == "add":
        return ["y = x0 + x1"]
    if op == "glu":
        return [f"y = ({activation(act, 'x0')}) * x1"]
    if op == "scale":
        return ["y = x0 * c"]
    if op == "scale_by":
        return ["y = x0 * tl.load(s_ptr).to(tl.float32)"]
    return ["y = x0"] + softcap_lines("y", "c")


def emit(op: str, act: str | None = None) -> str:
    tiles = 2 if op in ("add", "glu") else 1
    params = [f"in{i}_ptr" for i in range(tiles)] + (["s_ptr"] if op == "scale_by" else [])
    params += ["out_ptr", "M", "N"] + [f"stride_in{i}" for i in range(tiles)] + ["stride_out"]
    params += ["c"] if op in ("scale", "softcap") else []
    params += ["BLOCK_M: tl.constexpr", "BLOCK_N: tl.constexpr"]
    loads = "\n".join(f"x{i} = tl.load(in{i}_ptr + rm[:, None] * stride_in{i} + rn[None, :], "
                      f"mask=mask, other=0.0).to(tl.float32)" for i in range(tiles))
    body = f'''
rm = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
mask = (rm[:, None] < M) & (rn[None, :] < N)
{loads}
{chr(10).join(_expression(op, act))}
tl.store(out_ptr + rm[:, None] * stride_out + rn[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)
'''
    return HEADER + f"def pointwise_kernel({', '.join(params)}):\n" + indent(body, 4) + "\n"


def build(node, graph, target: Target) -> KernelSpec:
    m, n = node.shape
    bm, bn = (16, 32) if target.interpreted else (8, min(next_pow2(n), 512))
    op = node.op
    tiles = list(node.inputs) if op in ("add", "glu") else [node.inputs[0]]
    args = [("node", i) for i in tiles]
    args += [("node", node.inputs[1])] if op == "scale_by" else []
    args += [("node", node.id), ("value", m), ("value", n)]
    args += [("stride", i) for i in tiles] + [("stride", node.id)]
    args += [("value", node.attrs["factor"] if op == "scale" else node.attrs["cap"])] \
        if op in ("scale", "softcap") else []
    act = node.attrs.get("act")
    variant = f"{act}-glu" if op == "glu" else op
    return KernelSpec("pointwise", variant, emit(op, act), "pointwise_kernel",
                      (cdiv(m, bm), cdiv(n, bn)), args, dict(BLOCK_M=bm, BLOCK_N=bn), num_warps=4,
                      num_stages=1)
