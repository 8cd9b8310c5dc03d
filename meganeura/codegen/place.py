"""A block placed into zeros: out[:, start:start + w] = x, 0 elsewhere (slice_cols's
gradient). A program per (row block, column block).

bytes: elem * (S * w + S * width)
"""

from __future__ import annotations

from .common import HEADER, KernelSpec, Target, cdiv, indent, next_pow2


def emit() -> str:
    return HEADER + "def place_kernel(x_ptr, out_ptr, S, W, WIDTH, START, stride_x, " \
        "stride_out, ROWS: tl.constexpr, BLOCK: tl.constexpr):\n" + indent("""
r = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)[:, None]
c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)[None, :]
inside = (c >= START) & (c < START + W)
x = tl.load(x_ptr + r * stride_x + (c - START), mask=(r < S) & inside, other=0.0)
tl.store(out_ptr + r * stride_out + c, x.to(out_ptr.dtype.element_ty), mask=(r < S) & (c < WIDTH))
""", 4) + "\n"


def build(node, graph, target: Target) -> KernelSpec:
    x = graph[node.inputs[0]]
    s, w = x.shape
    width, start = node.attrs["width"], node.attrs["start"]
    block = min(next_pow2(width), 128 if target.interpreted else 1024)
    rows = min(16, next_pow2(s)) if target.interpreted else 4
    args = [("node", x.id), ("node", node.id), ("value", s), ("value", w), ("value", width),
            ("value", start), ("stride", x.id), ("stride", node.id)]
    return KernelSpec("place", "cols", emit(), "place_kernel", (cdiv(s, rows), cdiv(width, block)),
                      args, dict(ROWS=rows, BLOCK=block), num_warps=4, num_stages=1)
