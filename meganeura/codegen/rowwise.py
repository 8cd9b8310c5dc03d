"""The rows archetype: a row at a time, the stages of its epilogue in order. One program per
row (token), or per few rows (a prompt's RoPE rows on a GPU, any rows on the interpreter).

    rms_norm:       y = x * rsqrt(mean(x^2) + eps) * w                    (fp32 inside)
    head_rms_norm:  the same over each head, w[hd] shared by the heads (unit_rms_norm: no weight)
    rope:           per head, pair d with d + hd/2:  angle = pos[row] * inv_freq[d]
                    (rope_grad: the same rotation turned back, sin negated)
                    y[d] = x[d] cos - x[d+hd/2] sin,  y[d+hd/2] = x[d+hd/2] cos + x[d] sin
                    at the row's position (0 .. S-1 in a forward, the current one in a
                    decode step): the angle in float64 from a float64 table of inv_freq
                    (formulas.rope_frequencies, hd/2 + 2 values: then pi and 1 / pi), less
                    k pi in float64, and the cos and sin of the rest (|x| <= pi/2) from
                    their Taylor series in fp32, times (-1)^k (an fp32 angle in the
                    thousands of radians keeps no digits: positions reach 131072);
                    frequencies past `rotary` are 0 there (not rotated)
    element ops:    each element of the row (codegen/elementwise.py): a residual add, a
                    layer scalar, ...
    cache_write:    last: the row stored straight into its KV-cache slot pos % slots (the
                    rows a ring keeps, as cache_write does; a batched step's row i into
                    sequence i's block of slots)

so rows[rms_norm, rope] is the seed's q/k norm + RoPE, rows[head_rms_norm, rope,
cache_write] a decode step's k, rows[rms_norm, add, scale_by] a post-norm with its residual
and layer scalar. The row is seen as [heads, head width] (rope: as [heads, hd/2] pairs); a
norm sums over the last axis (per head) or over both (the row).

bytes: elem * (2 * S * D + D) (+ S * D a tile operand) (+ the 1-2 KB frequency table);
FLOPs: ~4 (norm) + ~6 (rope) per element. The row is read once and written once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..compiler.kernels import index_inputs, node_kernel, unrunnable
from ..compiler.ops import OPS, rope_scaling
from ..errors import MeganeuraError
from .common import HEADER, KernelSpec, Target, cdiv, indent, next_pow2
from .stages import Names, Stages, element_stages, variant

# the row ops this archetype knows: how each normalizes (over the row or per head) and
# whether it scales by a weight; RoPE rotates, a cache write stores the rows in their slots
NORMS = {"rms_norm": ("row", True), "head_rms_norm": ("head", True),
         "unit_rms_norm": ("head", False)}


@dataclass
class RowKernel:
    """A row kernel's stages and the arguments they read, named."""

    stages: tuple
    weights: dict  # stage index -> weight parameter stem (w, w1 ...)
    eps: dict  # stage index -> eps argument name
    freqs: dict  # rope stage index -> frequency table parameter stem (freq, freq1 ...)
    element: Stages  # the element stages, their operands and arguments named
    positions: int | None  # node-input position of the rows' positions (RoPE, cache write)
    iota: bool  # a forward's positions: the row index, nothing read
    write: bool  # the last stage stores the rows into a cache's slots
    sequences: int = 1  # the cache's sequence blocks (several: row i into block i)

    @property
    def rope(self) -> bool:
        return bool(self.freqs)


# Taylor coefficients of sin(x) / x and cos(x) in x^2 on |x| <= pi/2: the first term left
# out is below 1e-9 (sin: x^15 / 15!, cos: x^16 / 16!), far under an fp32 rounding; no libm
# call (whose slow path for large arguments keeps an array in local memory)
SIN_TERMS = [(-1) ** i / math.factorial(2 * i + 1) for i in range(7)]
COS_TERMS = [(-1) ** i / math.factorial(2 * i) for i in range(8)]


def _series(coefs: list[float], x2: str) -> str:
    """Horner form of sum_i coefs[i] * x2^i."""
    out = repr(coefs[-1])
    for c in reversed(coefs[:-1]):
        out = f"{c!r} + {x2} * ({out})"
    return out


def emit(v: RowKernel) -> str:
    el = v.element
    params = ["x_ptr"] + [f"{w}_ptr" for w in v.weights.values()]
    params += [f"{t.name}_ptr" for t in el.tiles] + [f"{x.name}_ptr" for x in el.scalars]
    params += ["out_ptr", "S", "stride_x", "stride_out"] + [f"stride_{t.name}" for t in el.tiles]
    params += ["D", "HD"] + list(v.eps.values()) + [name for name, _ in el.values]
    params += ["pos_ptr"] if v.positions is not None and not v.iota else []
    params += [f"{f}_ptr" for f in v.freqs.values()]
    params += ["SLOTS"] if v.write else []
    params += ["HEADS: tl.constexpr", "ROWS: tl.constexpr", "BLOCK_H: tl.constexpr",
               "BLOCK_C: tl.constexpr"]
    # tiles: [rows, heads, columns of a head] (one tile), or its two halves for rope
    halves = [("lo", ""), ("hi", " + HALF")] if v.rope else [("x", "")]
    lines = ["r = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)[:, None, None]",
             "h = tl.arange(0, BLOCK_H)[None, :, None]",
             "d = tl.arange(0, BLOCK_C)[None, None, :]"]
    if v.rope:
        lines += ["HALF = HD // 2", "mask = (r < S) & (h < HEADS) & (d < HALF)"]
    else:
        lines += ["mask = (r < S) & (h < HEADS) & (d < HD)"]
    lines.append("col = h * HD + d")
    for t, off in halves:
        lines.append(f"{t} = tl.load(x_ptr + r * stride_x + col{off}, mask=mask, other=0.0)"
                     ".to(tl.float32)")

    def value(off):  # an element stage's operand at the tile's columns, inline
        def load(x):
            if x.kind == "scalar":
                return [], f"tl.load({x.name}_ptr).to(tl.float32)"
            return [], (f"tl.load({x.name}_ptr + r * stride_{x.name} + col{off}, mask=mask, "
                        "other=0.0).to(tl.float32)")
        return load
    # element stages after the last row stage run tile by tile with the store
    last_row = max((i for i, st in enumerate(v.stages) if OPS[st.op].locality == "row"),
                   default=-1)
    placed = False  # the rows' positions (and slots) are read once, before the first use
    for i, st in enumerate(v.stages):
        if st.op in NORMS:
            lines += _norm_lines(st.op, halves, v.eps[i], v.weights.get(i))
        elif OPS[st.op].locality == "row" and not placed:  # rope or the cache write
            lines += _position_lines(v)
            placed = True
        if st.op in ROPES:
            lines += _rope_lines(v.freqs[i], ROPES[st.op])
        if OPS[st.op].locality == "element" and i < last_row:
            k = v.element.stages.index(st)
            for t, off in halves:
                lines += v.element.lines(k, t, value(off))
    tail = [st for st in v.stages[last_row + 1:]]
    for t, off in halves:
        for st in tail:
            lines += v.element.lines(v.element.stages.index(st), t, value(off))
        lines.append(f"tl.store(out_ptr + {'slot' if v.write else 'r'} * stride_out + col{off}, "
                     f"{t}.to(out_ptr.dtype.element_ty), mask=mask)")
    return HEADER + f"def row_kernel({', '.join(params)}):\n" + indent("\n".join(lines), 4) + "\n"


def _norm_lines(op: str, halves, eps: str, weight: str | None) -> list[str]:
    """RMSNorm over the row (both axes of the tile) or per head (the last axis)."""
    over, _ = NORMS[op]
    sq = " + ".join(f"{t} * {t}" for t, _ in halves)
    if over == "row":
        lines = [f"ss = tl.sum(tl.sum({sq}, axis=2), axis=1)",
                 f"rstd = (1.0 / tl.sqrt(ss / D + {eps}))[:, None, None]"]
    else:
        lines = [f"ss = tl.sum({sq}, axis=2)", f"rstd = (1.0 / tl.sqrt(ss / HD + {eps}))[:, :, None]"]
    for t, off in halves:
        w_at = ("col" if over == "row" else "d") + off
        scale = (f" * tl.load({weight}_ptr + {w_at}, mask=mask, other=0.0).to(tl.float32)"
                 if weight else "")
        lines.append(f"{t} = {t} * rstd{scale}")
    return lines


def _position_lines(v: RowKernel) -> list[str]:
    """The rows' positions; for a cache write, each row's slot and whether the ring still
    holds it (as cache_write)."""
    if v.iota:
        lines = ["p = r  # the row's position: its index"]
    else:
        lines = ["p = tl.load(pos_ptr + r, mask=r < S, other=0).to(tl.int64)  # the row's position"]
    if v.write and v.sequences > 1:  # row i is sequence i's: its block of SLOTS rows
        lines += ["slot = r * SLOTS + p % SLOTS"]
    elif v.write:
        lines += ["last = r * 0 + (S - 1)" if v.iota else "last = tl.load(pos_ptr + S - 1).to(tl.int64)",
                  "mask = mask & (p > last - SLOTS)",
                  "slot = p % SLOTS"]
    return lines


# the rotations: rope's, and its gradient's (the same angles, turned back: sin negated)
ROPES = {"rope": 1.0, "rope_grad": -1.0}


def _rope_lines(freq: str, sign: float = 1.0) -> list[str]:
    """The angle in float64, less k pi there; cos and sin of the rest in fp32 (sign -1:
    the inverse rotation, rope's gradient)."""
    return [f"pi = tl.load({freq}_ptr + HALF)",
            f"inv_pi = tl.load({freq}_ptr + HALF + 1)",
            f"ang = p.to(tl.float64) * tl.load({freq}_ptr + d, mask=d < HALF, other=0.0)",
            "k = tl.floor(ang * inv_pi + 0.5)",
            "x = (ang - k * pi).to(tl.float32)  # in [-pi/2, pi/2]",
            "odd = (k - 2.0 * tl.floor(k * 0.5)).to(tl.float32)  # cos, sin change sign",
            "x2 = x * x",
            f"s = x * ({_series(SIN_TERMS, 'x2')}) * ({sign!r} - {2.0 * sign!r} * odd)",
            f"c = ({_series(COS_TERMS, 'x2')}) * (1.0 - 2.0 * odd)",
            "lo, hi = lo * c - hi * s, hi * c + lo * s"]


def row_kernel(node, graph) -> RowKernel:
    """The node's stages with their arguments named (weights, eps, frequency tables,
    element operands), and where its positions come from."""
    k = node_kernel(node)
    x = graph[node.inputs[k.main[0]]]
    names = Names()
    weights, eps, freqs, positions = {}, {}, {}, set()
    for i, st in enumerate(k.epilogue):
        if st.op in NORMS:
            if NORMS[st.op][1]:
                weights[i] = names.take("w")
            eps[i] = names.take("eps")
        elif st.op in ROPES:
            freqs[i] = names.take("freq")
        positions.update(index_inputs("rows", {"prologue": (), "epilogue": (st,)}, 0))
    element = element_stages([st for st in k.epilogue if OPS[st.op].locality == "element"],
                             node, graph, names, x.shape)
    if len(positions) > 1:
        raise ValueError(f"{graph.label(node.id)}: a row kernel reads one set of positions")
    pos = next(iter(positions), None)
    iota = pos is not None and graph[node.inputs[pos]].op == "arange"
    write = k.updates() is not None
    sequences = k.epilogue[-1].attr.get("sequences", 1) if write else 1
    return RowKernel(k.epilogue, weights, eps, freqs, element, pos, iota, write, sequences)


def build(node, graph, target: Target) -> KernelSpec:
    k = node_kernel(node)
    why = unrunnable(k)
    if why:
        raise MeganeuraError(f"{graph.label(node.id)}: {why}")
    v = row_kernel(node, graph)
    x = graph[node.inputs[k.main[0]]]
    # a cache write's rows go into the cache's buffer
    out = node.inputs[k.updates()] if v.write else node.id
    s, width = x.shape
    # the row as [heads, head width]: a row norm without rope is one head of the whole width
    dims = {st.attr["head_dim"] for st in v.stages if "head_dim" in st.attr}
    if len(dims) > 1:
        raise ValueError(f"{graph.label(node.id)}: stages of head widths {sorted(dims)}")
    hd = dims.pop() if dims else width
    heads = width // hd
    el = v.element
    args = [("node", x.id)]
    args += [("node", node.inputs[v.stages[i].operands[0]]) for i in v.weights]
    args += [("node", node.inputs[t.input]) for t in el.tiles + el.scalars]
    args += [("node", out), ("value", s), ("stride", x.id), ("stride", out)]
    args += [("stride", node.inputs[t.input]) for t in el.tiles]
    args += [("value", width), ("value", hd)]
    args += [("value", v.stages[i].attr["eps"]) for i in v.eps]
    args += [("value", value) for _, value in el.values]
    # a forward's positions (a load-time arange) are the row indices: nothing to read
    args += [("node", node.inputs[v.positions])] if v.positions is not None and not v.iota else []
    for i in v.freqs:
        a = v.stages[i].attr
        args += [("rope_freq", (hd, a["theta"], a["rotary"], rope_scaling(a)))]
    args += [("value", graph[out].shape[0] // v.sequences)] if v.write else []
    cols = next_pow2(hd // 2 if v.rope else hd)
    block = next_pow2(heads) * cols * (2 if v.rope else 1)
    # the interpreter pays per program, a GPU per row: several rows a program on the CPU
    rows = min(16, next_pow2(s)) if target.interpreted else 1
    warps = 1 if target.interpreted else max(1, min(16, block // 256))
    if v.rope and s > 1 and not target.interpreted:
        # a prompt's q and k rows: 4 warps, rows together up to about 4096 values a program
        # (rows of 2048 two a program; wider rows one, 8192 for 27b's q), from
        # benchmarks/kernel_sweep.py --only rows on the H200 (4b, 27b, e4b:
        # results/kernel-sweep-2026-12-01-h200-c15c77e-rows.log; 31b's 16384-wide rows
        # compile without spills, not timed); a decode step's one row keeps a warp per 256
        # values
        rows, warps = min(8, max(1, 4096 // block), next_pow2(s)), 4
    cx = dict(HEADS=heads, ROWS=rows, BLOCK_H=next_pow2(heads), BLOCK_C=cols)
    return KernelSpec("rowwise", variant((), v.stages), emit(v), "row_kernel", (cdiv(s, rows),),
                      args, cx, num_warps=warps, num_stages=1)
