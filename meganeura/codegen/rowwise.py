"""Row kernels: RMSNorm (over the row or per head, with or without a weight), RoPE, their
fusions, and the post-norm + residual (+ layer scalar) pass. One program per row (token),
or per few rows (a prompt's RoPE rows on a GPU, any rows on the interpreter).

    rms_norm:       y = x * rsqrt(mean(x^2) + eps) * w                    (fp32 inside)
    head_rms_norm:  the same over each head, w[hd] shared by the heads (unit_: no weight)
    rope:           per head, pair d with d + hd/2:  angle = pos[row] * inv_freq[d]
                    y[d] = x[d] cos - x[d+hd/2] sin,  y[d+hd/2] = x[d+hd/2] cos + x[d] sin
                    at the row's position (0 .. S-1 in a forward, the current one in a
                    decode step): the angle in float64 from a float64 table of inv_freq
                    (formulas.rope_frequencies, hd/2 + 2 values: then pi and 1 / pi), less
                    k pi in float64, and the cos and sin of the rest (|x| <= pi/2) from
                    their Taylor series in fp32, times (-1)^k (an fp32 angle in the
                    thousands of radians keeps no digits: positions reach 131072);
                    frequencies past `rotary` are 0 there (not rotated)
    norm_rope:      rope(rms_norm(x, w)) (the seed: q_norm spans every head)
    head_norm_rope: rope(head_rms_norm(x, w)) (the published model)
    norm_add:       r + rms_norm(y, w);  norm_add_scale: (r + rms_norm(y, w)) * s[0]
    *_write:        norm_rope, head_norm_rope or unit_rms_norm with the row stored straight
                    into its KV-cache slot pos % slots (the rows a ring keeps, as
                    cache_write): a decode step's k and v in one launch each

The row is seen as [heads, head width] (rope: as [heads, hd/2] pairs); a norm sums over the
last axis (per head) or over both (the row).

bytes: elem * (2 * S * D + D) (+ S * D for the residual) (+ the 1-2 KB frequency table);
FLOPs: ~4 (norm) + ~6 (rope) per element. The row is read once and written once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..compiler.ops import rope_scaling
from .common import HEADER, KernelSpec, Target, cdiv, indent, next_pow2

OPS = ("rms_norm", "head_rms_norm", "unit_rms_norm", "rope", "norm_rope", "head_norm_rope",
       "norm_add", "norm_add_scale", "norm_rope_write", "head_norm_rope_write", "unit_norm_write")


@dataclass(frozen=True)
class RowVariant:
    norm: str | None  # "row" | "head" | None
    weight: bool
    rope: bool
    residual: bool
    scalar: bool
    cache: bool = False  # rows stored into a cache's slots (operand 0) rather than a buffer

    @classmethod
    def of(cls, op: str) -> "RowVariant":
        cache = op.endswith("_write")
        op = {"unit_norm_write": "unit_rms_norm"}.get(op, op.removesuffix("_write"))
        norm = {"rms_norm": "row", "norm_rope": "row", "norm_add": "row", "norm_add_scale": "row",
                "head_rms_norm": "head", "unit_rms_norm": "head", "head_norm_rope": "head"}.get(op)
        return cls(norm, norm is not None and op != "unit_rms_norm", "rope" in op,
                   op.startswith("norm_add"), op == "norm_add_scale", cache)

    @property
    def name(self) -> str:
        prefix = "" if self.norm == "row" else "head-"
        parts = [f"{prefix}rmsnorm" + ("" if self.weight else "-unweighted")] if self.norm else []
        parts += ["rope"] * self.rope + ["residual"] * self.residual + ["scalar"] * self.scalar
        return "+".join(parts + ["cache-write"] * self.cache)


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


def emit(v: RowVariant, iota: bool = False) -> str:
    """iota: the rows' positions are their indices 0 .. S-1 (a forward's), not read."""
    params = ["x_ptr"] + (["w_ptr"] if v.weight else []) + (["r_ptr"] if v.residual else [])
    params += ["s_ptr"] if v.scalar else []
    params += ["out_ptr", "S", "stride_x", "stride_out"] + (["stride_r"] if v.residual else [])
    params += ["D", "HD"] + (["eps"] if v.norm else [])
    params += ["pos_ptr"] if (v.rope or v.cache) and not iota else []
    params += ["freq_ptr"] if v.rope else []
    params += ["SLOTS"] if v.cache else []
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
    if v.norm:
        sq = " + ".join(f"{t} * {t}" for t, _ in halves)
        if v.norm == "row":
            lines += [f"ss = tl.sum(tl.sum({sq}, axis=2), axis=1)",
                      "rstd = (1.0 / tl.sqrt(ss / D + eps))[:, None, None]"]
        else:
            lines += [f"ss = tl.sum({sq}, axis=2)", "rstd = (1.0 / tl.sqrt(ss / HD + eps))[:, :, None]"]
        for t, off in halves:
            w_at = ("col" if v.norm == "row" else "d") + off
            scale = f" * tl.load(w_ptr + {w_at}, mask=mask, other=0.0).to(tl.float32)" if v.weight else ""
            lines.append(f"{t} = {t} * rstd{scale}")
    if (v.rope or v.cache) and iota:
        lines.append("p = r  # the row's position: its index")
    elif v.rope or v.cache:
        lines.append("p = tl.load(pos_ptr + r, mask=r < S, other=0).to(tl.int64)  # the row's position")
    if v.cache:  # its slot, and whether the ring still holds it (as cache_write)
        lines += ["last = r * 0 + (S - 1)" if iota else "last = tl.load(pos_ptr + S - 1).to(tl.int64)",
                  "mask = mask & (p > last - SLOTS)",
                  "slot = p % SLOTS"]
    if v.rope:  # the angle in float64, less k pi there; cos and sin of the rest in fp32
        lines += ["pi = tl.load(freq_ptr + HALF)",
                  "inv_pi = tl.load(freq_ptr + HALF + 1)",
                  "ang = p.to(tl.float64) * tl.load(freq_ptr + d, mask=d < HALF, other=0.0)",
                  "k = tl.floor(ang * inv_pi + 0.5)",
                  "x = (ang - k * pi).to(tl.float32)  # in [-pi/2, pi/2]",
                  "odd = (k - 2.0 * tl.floor(k * 0.5)).to(tl.float32)  # cos, sin change sign",
                  "x2 = x * x",
                  f"s = x * ({_series(SIN_TERMS, 'x2')}) * (1.0 - 2.0 * odd)",
                  f"c = ({_series(COS_TERMS, 'x2')}) * (1.0 - 2.0 * odd)",
                  "lo, hi = lo * c - hi * s, hi * c + lo * s"]
    for t, off in halves:
        if v.residual:
            lines.append(f"{t} = {t} + tl.load(r_ptr + r * stride_r + col{off}, mask=mask, "
                         "other=0.0).to(tl.float32)")
        if v.scalar:
            lines.append(f"{t} = {t} * tl.load(s_ptr).to(tl.float32)")
        lines.append(f"tl.store(out_ptr + {'slot' if v.cache else 'r'} * stride_out + col{off}, "
                     f"{t}.to(out_ptr.dtype.element_ty), mask=mask)")
    return HEADER + f"def row_kernel({', '.join(params)}):\n" + indent("\n".join(lines), 4) + "\n"


def build(node, graph, target: Target) -> KernelSpec:
    v = RowVariant.of(node.op)
    # a cache write's operands follow the cache, and its rows go into the cache's buffer
    ins = node.inputs[1:] if v.cache else node.inputs
    out = node.inputs[0] if v.cache else node.id
    x = graph[ins[0]]
    s, width = x.shape
    # the row as [heads, head width]: a row norm without rope is one head of the whole width
    hd = node.attrs["head_dim"] if "head_dim" in node.attrs else width
    heads = width // hd
    args = [("node", x.id)]
    args += [("node", ins[1])] if v.weight else []
    args += [("node", ins[2])] if v.residual else []
    args += [("node", ins[3])] if v.scalar else []
    args += [("node", out), ("value", s), ("stride", x.id), ("stride", out)]
    args += [("stride", ins[2])] if v.residual else []
    args += [("value", width), ("value", hd)]
    args += [("value", node.attrs["eps"])] if v.norm else []
    # a forward's positions (a load-time arange) are the row indices: nothing to read
    iota = (v.rope or v.cache) and graph[ins[-1]].op == "arange"
    args += [("node", ins[-1])] if (v.rope or v.cache) and not iota else []
    if v.rope:
        a = node.attrs
        args += [("rope_freq", (hd, a["theta"], a["rotary"], rope_scaling(a)))]
    args += [("value", graph[out].shape[0])] if v.cache else []
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
    return KernelSpec("rowwise", v.name, emit(v, iota), "row_kernel", (cdiv(s, rows),), args, cx,
                      num_warps=warps, num_stages=1)
