"""The RMSNorm's gradients: d x of each row (or head) and d w summed over the rows.

    y = x r w per head of HD columns (a row norm: one head of the whole row),
    r = rsqrt(mean(x^2) + eps), x^ = x r, g = dy w (g = dy without a weight):
    norm_grad, unit_norm_grad:  dx = r (g - x^ mean(g x^))          a program per few rows
    norm_wgrad:                 dw = sum over rows and heads of dy x^   [HD], fp32

A row is seen as [heads, head width], as the rows archetype sees it. The weight's gradient
is summed by programs each over a span of rows, added by fp32 atomics into an output zeroed
before the launch (the order of the additions, so the last bits, may differ run to run).

bytes: elem * 3 * S * D (dx), elem * 2 * S * D (dw); FLOPs ~8 per element
"""

from __future__ import annotations

from .common import HEADER, KernelSpec, Target, cdiv, indent, next_pow2


def emit(op: str) -> str:
    weight = op == "norm_grad"
    params = ["dy_ptr", "x_ptr"] + (["w_ptr"] if weight else []) + ["out_ptr", "S", "stride_dy",
              "stride_x", "stride_out", "D", "HD", "eps", "SPAN", "HEADS: tl.constexpr",
              "ROWS: tl.constexpr", "BLOCK_H: tl.constexpr", "BLOCK_C: tl.constexpr"]
    head = ["h = tl.arange(0, BLOCK_H)[None, :, None]",
            "d = tl.arange(0, BLOCK_C)[None, None, :]",
            "col = h * HD + d"]
    load = ["mask = (r < S) & (h < HEADS) & (d < HD)",
            "x = tl.load(x_ptr + r * stride_x + col, mask=mask, other=0.0).to(tl.float32)",
            "g = tl.load(dy_ptr + r * stride_dy + col, mask=mask, other=0.0).to(tl.float32)",
            "rstd = (1.0 / tl.sqrt(tl.sum(x * x, axis=2) / HD + eps))[:, :, None]",
            "xhat = x * rstd"]
    if op == "norm_wgrad":  # a span of SPAN rows a program, added into the zeroed output
        body = head + ["acc = tl.zeros((BLOCK_C,), dtype=tl.float32)",
                       "first = tl.program_id(0) * SPAN",
                       "for r0 in range(0, SPAN, ROWS):",
                       "    r = (first + r0 + tl.arange(0, ROWS)).to(tl.int64)[:, None, None]"]
        body += ["    " + line.replace("(r < S)", "(r < S) & (r < first + SPAN)")
                 for line in load]
        body += ["    acc += tl.sum(tl.sum(g * xhat, axis=1), axis=0)",
                 "c = tl.arange(0, BLOCK_C)",
                 "tl.atomic_add(out_ptr + c, acc, mask=c < HD)"]
    else:
        body = ["r = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)[:, None, None]"]
        body += head + load
        if weight:
            body.append("g = g * tl.load(w_ptr + d, mask=d < HD, other=0.0).to(tl.float32)")
        body += ["dot = (tl.sum(g * xhat, axis=2) / HD)[:, :, None]",
                 "dx = rstd * (g - xhat * dot)",
                 "tl.store(out_ptr + r * stride_out + col, dx.to(out_ptr.dtype.element_ty), "
                 "mask=mask)"]
    return HEADER + f"def norm_grad_kernel({', '.join(params)}):\n" + \
        indent("\n".join(body), 4) + "\n"


def build(node, graph, target: Target) -> KernelSpec:
    ins = [graph[i] for i in node.inputs]
    dy, x = ins[0], ins[1]
    s, width = x.shape
    hd = node.attrs["head_dim"]
    heads = width // hd
    cols, bh = next_pow2(hd), next_pow2(heads)
    args = [("node", dy.id), ("node", x.id)] + [("node", w.id) for w in ins[2:]]
    args += [("node", node.id), ("value", s), ("stride", dy.id), ("stride", x.id)]
    # the weight's gradient is a vector: its "stride" is unused
    args += [("value", 0) if node.op == "norm_wgrad" else ("stride", node.id)]
    args += [("value", width), ("value", hd), ("value", node.attrs["eps"])]
    block = bh * cols
    if node.op == "norm_wgrad":
        rows = max(1, min(16 if target.interpreted else 8, 8192 // block))
        # spans of rows (a multiple of ROWS), about four programs an SM on a GPU
        programs = 2 if target.interpreted else 4 * target.sm_count
        span = max(rows, cdiv(cdiv(s, programs), rows) * rows)
        grid = (cdiv(s, span),)
    else:
        rows = min(16, next_pow2(s)) if target.interpreted else 1
        span, grid = 0, (cdiv(s, rows),)
    args += [("value", span)]
    warps = 1 if target.interpreted else max(1, min(16, rows * block // 256))
    return KernelSpec("norm_grad", node.op, emit(node.op), "norm_grad_kernel", grid, args,
                      dict(HEADS=heads, ROWS=rows, BLOCK_H=bh, BLOCK_C=cols),
                      num_warps=warps, num_stages=1,
                      zeroed=node.id if node.op == "norm_wgrad" else None)
