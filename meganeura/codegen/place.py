"""A block placed into zeros: out[:, start:start + w] = x, 0 elsewhere (slice_cols's
gradient); or added into a sum (place_add_cols: out = acc, x added at those columns, the
addition in fp32). A program per (row block, column block).

bytes: elem * (S * w + S * width) (+ elem * S * width of acc)
"""

from __future__ import annotations

from .common import HEADER, KernelSpec, Target, cdiv, indent, next_pow2


def emit(add: bool = False) -> str:
    acc = ["acc_ptr"] if add else []
    strides = ["stride_acc"] if add else []
    total = ("x = x.to(tl.float32) + tl.load(acc_ptr + r * stride_acc + c, mask=(r < S) & "
             "(c < WIDTH), other=0.0).to(tl.float32)\n") if add else ""
    return HEADER + f"def place_kernel({', '.join(acc)}{', ' if add else ''}x_ptr, out_ptr, S, " \
        f"W, WIDTH, START, stride_x, stride_out{', ' if add else ''}{', '.join(strides)}, " \
        "ROWS: tl.constexpr, BLOCK: tl.constexpr):\n" + indent("""
r = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)[:, None]
c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)[None, :]
inside = (c >= START) & (c < START + W)
x = tl.load(x_ptr + r * stride_x + (c - START), mask=(r < S) & inside, other=0.0)
""" + total + """tl.store(out_ptr + r * stride_out + c, x.to(out_ptr.dtype.element_ty), mask=(r < S) & (c < WIDTH))
""", 4) + "\n"


def build(node, graph, target: Target) -> KernelSpec:
    add = node.op == "place_add_cols"
    x = graph[node.inputs[-1]]
    s, w = x.shape
    width, start = node.shape[1], node.attrs["start"]
    block = min(next_pow2(width), 128 if target.interpreted else 1024)
    rows = min(16, next_pow2(s)) if target.interpreted else 4
    acc = [node.inputs[0]] if add else []
    args = [("node", a) for a in acc] + [("node", x.id), ("node", node.id), ("value", s),
                                         ("value", w), ("value", width), ("value", start),
                                         ("stride", x.id), ("stride", node.id)]
    args += [("stride", a) for a in acc]
    return KernelSpec("place", "add-cols" if add else "cols", emit(add), "place_kernel",
                      (cdiv(s, rows), cdiv(width, block)),
                      args, dict(ROWS=rows, BLOCK=block), num_warps=4, num_stages=1)
