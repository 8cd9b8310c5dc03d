"""Row kernels: RMSNorm, RoPE, and QK-norm + RoPE in one pass. One program per row (token).

    rms_norm:  y = x * rsqrt(mean(x^2) + eps) * w                       (fp32 inside)
    rope:      per head, pair d with d + hd/2:  angle = pos * theta^(-2d/hd)
               y[d] = x[d] cos - x[d+hd/2] sin,  y[d+hd/2] = x[d+hd/2] cos + x[d] sin
               cos and sin come from a [S, hd/2] fp32 table computed once in float64 at load
               (fp32 sin/cos of angles in the thousands of radians lose digits)
    norm_rope: rope(rms_norm(x, w)) over the whole row (q_norm spans every head)

bytes: elem * (2 * S * D + D) + 8 * S * hd/2 (tables) ; FLOPs: ~4 (norm) + ~6 (rope) per
element. The row is read once and written once.
"""

from __future__ import annotations

from .common import HEADER, KernelSpec, Target, indent, next_pow2

OPS = ("rms_norm", "rope", "norm_rope")


def emit(norm: bool, rope: bool) -> str:
    params = ["x_ptr"] + (["w_ptr"] if norm else []) + ["out_ptr", "stride_x", "stride_out", "D"]
    params += ["eps"] if norm else []
    params += ["cos_ptr", "sin_ptr"] if rope else []
    if rope:  # the row as [heads, hd/2] pairs
        params += ["HEADS: tl.constexpr", "HALF: tl.constexpr", "BLOCK_H: tl.constexpr",
                   "BLOCK_HALF: tl.constexpr"]
        load = '''
h = tl.arange(0, BLOCK_H)[:, None]
d = tl.arange(0, BLOCK_HALF)[None, :]
mask = (h < HEADS) & (d < HALF)
lo = h * (2 * HALF) + d
x1 = tl.load(x_ptr + row * stride_x + lo, mask=mask, other=0.0).to(tl.float32)
x2 = tl.load(x_ptr + row * stride_x + lo + HALF, mask=mask, other=0.0).to(tl.float32)
'''
        normalize = '''
ss = tl.sum(tl.sum(x1 * x1 + x2 * x2, axis=1), axis=0)
rstd = 1.0 / tl.sqrt(ss / D + eps)
x1 = x1 * rstd * tl.load(w_ptr + lo, mask=mask, other=0.0).to(tl.float32)
x2 = x2 * rstd * tl.load(w_ptr + lo + HALF, mask=mask, other=0.0).to(tl.float32)
'''
        finish = '''
c = tl.load(cos_ptr + row * HALF + d, mask=d < HALF, other=0.0)
s = tl.load(sin_ptr + row * HALF + d, mask=d < HALF, other=0.0)
y1 = x1 * c - x2 * s
y2 = x2 * c + x1 * s
tl.store(out_ptr + row * stride_out + lo, y1.to(out_ptr.dtype.element_ty), mask=mask)
tl.store(out_ptr + row * stride_out + lo + HALF, y2.to(out_ptr.dtype.element_ty), mask=mask)
'''
    else:  # the row as one vector
        params += ["BLOCK_D: tl.constexpr"]
        load = '''
d = tl.arange(0, BLOCK_D)
mask = d < D
x = tl.load(x_ptr + row * stride_x + d, mask=mask, other=0.0).to(tl.float32)
'''
        normalize = '''
rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / D + eps)
x = x * rstd * tl.load(w_ptr + d, mask=mask, other=0.0).to(tl.float32)
'''
        finish = '''
tl.store(out_ptr + row * stride_out + d, x.to(out_ptr.dtype.element_ty), mask=mask)
'''
    body = "row = tl.program_id(0)\n" + load.strip() + "\n"
    body += (normalize.strip() + "\n") if norm else ""
    body += finish.strip() + "\n"
    return HEADER + f"def row_kernel({', '.join(params)}):\n" + indent(body, 4) + "\n"


def build(node, graph, target: Target) -> KernelSpec:
    x = graph[node.inputs[0]]
    s, width = x.shape
    norm, rope = node.op in ("rms_norm", "norm_rope"), node.op in ("rope", "norm_rope")
    args = [("node", x.id)] + ([("node", node.inputs[1])] if norm else [])
    args += [("node", node.id), ("stride", x.id), ("stride", node.id), ("value", width)]
    args += [("value", node.attrs["eps"])] if norm else []
    if rope:
        hd = node.attrs["head_dim"]
        table = (s, hd, node.attrs["theta"])
        args += [("rope_cos", table), ("rope_sin", table)]
        cx = dict(HEADS=width // hd, HALF=hd // 2, BLOCK_H=next_pow2(width // hd),
                  BLOCK_HALF=next_pow2(hd // 2))
    else:
        cx = dict(BLOCK_D=next_pow2(width))
    block = next_pow2(width)
    warps = 1 if target.interpreted else max(1, min(16, block // 256))
    variant = "+".join(v for v, on in (("rmsnorm", norm), ("rope", rope)) if on)
    return KernelSpec("rowwise", variant, emit(norm, rope), "row_kernel", (s,), args, cx,
                      num_warps=warps, num_stages=1)
