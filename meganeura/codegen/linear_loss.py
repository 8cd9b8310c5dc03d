"""The lm_head, its soft-cap and the cross-entropy as ops of the plan, its logits never
stored: the kernels of codegen/cross_entropy.py, bound to plan nodes.

    linear_cross_entropy_stats(h, w, labels)      the forward kernel: [rows, 2], each row's
                                                  loss and its logsumexp
    linear_cross_entropy(h, w, labels)            the forward kernel: each row's loss (its
                                                  logsumexp into a scratch buffer)
    linear_cross_entropy_grad_h(h, w, labels, d, lse)   the d h kernel (rows owned by
                                                        programs), the forward's logsumexp read
    linear_cross_entropy_grad_w(h, w, labels, d, lse)   the d w kernel (vocabulary tiles
                                                        owned by programs)

The gradients add tile after tile into their fp32 output, zeroed before the launch.
"""

from __future__ import annotations

import torch

from ..compiler import cost
from .common import HEADER, KernelSpec, Target, cdiv, indent, next_pow2, softcap_lines
from .cross_entropy import (ENTRY_DH, ENTRY_DW, ENTRY_FORWARD, IGNORE, dh_source, dw_source,
                            forward_source)

BLOCKS_CPU, BLOCKS_GPU = (16, 32, 16), (64, 64, 64)  # (BLOCK_M, BLOCK_V, BLOCK_K)


def build(node, graph, target: Target) -> KernelSpec:
    if node.op == "linear_cross_entropy_dh":
        return build_dh(node, graph, target)
    h, w, labels = (graph[i] for i in node.inputs[:3])
    t, width = h.shape
    v = w.shape[0]
    bm, bv, bk = BLOCKS_CPU if target.interpreted else BLOCKS_GPU
    cap = node.attrs["cap"]
    const = dict(HAS_CAP=cap > 0, BLOCK_M=bm, BLOCK_V=bv, BLOCK_K=bk)
    prec = target.dot_precision
    tail = [("value", t), ("value", v), ("value", width), ("stride", h.id), ("stride", w.id)]
    head = [("node", h.id), ("node", w.id), ("node", labels.id)]
    if node.op in ("linear_cross_entropy", "linear_cross_entropy_stats"):
        if node.op == "linear_cross_entropy":  # the loss alone: the logsumexp is scratch
            lse, at = ("scratch", ("ce_lse", (t,), "fp32")), 0
            strides = [("value", 1), ("stride", node.id)]
        else:  # column 0 the loss, column 1 the logsumexp
            lse, at = ("node", node.id), 1
            strides = [("stride", node.id), ("stride", node.id)]
        return KernelSpec("linear_loss", "forward", forward_source(prec), ENTRY_FORWARD,
                          (cdiv(t, bm),), head + [lse, ("node", node.id)] + tail + strides
                          + [("value", cap or 1.0)], {**const, "LSE_AT": at}, num_warps=4,
                          num_stages=1)
    d, lse = node.inputs[3], node.inputs[4]
    args = head + [("node", lse), ("node", node.id), ("node", d)] + tail + \
        [("stride", lse), ("stride", node.id), ("value", cap or 1.0)]
    if node.op == "linear_cross_entropy_grad_h":
        return KernelSpec("linear_loss", "dh", dh_source(prec), ENTRY_DH, (cdiv(t, bm),), args,
                          const, num_warps=4, num_stages=1, zeroed=node.id)
    return KernelSpec("linear_loss", "dw", dw_source(prec), ENTRY_DW, (cdiv(v, bv),), args,
                      const, num_warps=4, num_stages=1, zeroed=node.id)


# ---- the loss and d h together, the logits a chunk of rows at a time ----------------------
#
# linear_cross_entropy_dh(h, w, labels, d) -> [rows, width + 2] fp32 (d h | loss | lse):
# for each chunk of CHUNK rows, three kernels and a sum
#   logits: z = h[chunk] @ w^T into a scratch [CHUNK, vocab] in the plan's type (a tiled
#           product, each weight tile read from L2 by the chunk's row tiles in turn)
#   rows:   each row's logsumexp and loss (the soft-cap applied as read), then its gradient
#           d (softmax - onehot) (times the cap's derivative) written over its logits
#   dh:     d h[chunk] = dz @ w, the vocabulary split among programs (SPLIT shares, fp32)
#   sum:    the shares added in order into d h's columns (the same bits every run)
# The logits are computed once, the scratch is reused chunk after chunk, and nothing of
# [rows, vocab] outlives a chunk: the same products as the plain plan (logits, d h), the
# rows read twice and written once, and no [rows, vocab] tensor in the arena.

# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) of the two products; the rows' vocabulary block
DH_TILES_GPU, DH_TILES_CPU = (128, 128, 64, 8, 3), (16, 16, 16, 4, 1)
ROW_BLOCK_GPU, ROW_BLOCK_CPU = 2048, 32

_LOGITS = """pid = tl.program_id(0)
tiles_m = tl.cdiv(N_ROWS, BLOCK_M)
pm = pid % tiles_m  # the chunk's row tiles side by side: each weight tile read once from memory
pn = pid // tiles_m
rm = pm * BLOCK_M + tl.arange(0, BLOCK_M)
rn = (pn * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
rk = tl.arange(0, BLOCK_K)
a_at = h_ptr + (R0 + rm[:, None]).to(tl.int64) * stride_h + rk[None, :]
b_at = w_ptr + rn[:, None] * stride_w + rk[None, :]
acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
for k0 in range(0, H, BLOCK_K):
    k_ok = (k0 + rk) < H
    a = tl.load(a_at, mask=(rm[:, None] < N_ROWS) & k_ok[None, :], other=0.0)
    b = tl.load(b_at, mask=(rn[:, None] < V) & k_ok[None, :], other=0.0)
    acc = tl.dot(a.to(b.dtype), tl.trans(b), acc, input_precision=PREC)
    a_at += BLOCK_K
    b_at += BLOCK_K
tl.store(z_ptr + rm[:, None].to(tl.int64) * stride_z + rn[None, :], acc.to(z_ptr.dtype.element_ty),
         mask=(rm[:, None] < N_ROWS) & (rn[None, :] < V))
"""

_DH = """pid = tl.program_id(0)
tiles_m = tl.cdiv(N_ROWS, BLOCK_M)
pm = pid % tiles_m
pn = pid // tiles_m
s = tl.program_id(1)  # the share of the vocabulary [s * SHARE, (s + 1) * SHARE)
rm = pm * BLOCK_M + tl.arange(0, BLOCK_M)
rn = pn * BLOCK_N + tl.arange(0, BLOCK_N)
rk = tl.arange(0, BLOCK_K)
v0 = s * SHARE
a_at = z_ptr + rm[:, None].to(tl.int64) * stride_z + (v0 + rk[None, :])
b_at = w_ptr + (v0 + rk[:, None]).to(tl.int64) * stride_w + rn[None, :]
acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
end = tl.minimum(v0 + SHARE, V)
for k0 in range(v0, end, BLOCK_K):
    k_ok = (k0 + rk) < end
    a = tl.load(a_at, mask=(rm[:, None] < N_ROWS) & k_ok[None, :], other=0.0)
    b = tl.load(b_at, mask=k_ok[:, None] & (rn[None, :] < H), other=0.0)
    acc = tl.dot(a.to(b.dtype), b, acc, input_precision=PREC)
    a_at += BLOCK_K
    b_at += BLOCK_K * stride_w
tl.store(part_ptr + (s * CHUNK + rm[:, None]).to(tl.int64) * H + rn[None, :], acc,
         mask=(rm[:, None] < N_ROWS) & (rn[None, :] < H))
"""

_SUM = """r = tl.program_id(0)
c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
acc = tl.zeros((BLOCK,), dtype=tl.float32)
for s in range(SPLIT):
    acc += tl.load(part_ptr + (s * CHUNK + r).to(tl.int64) * H + c, mask=c < H, other=0.0)
tl.store(out_ptr + (R0 + r).to(tl.int64) * stride_out + c, acc, mask=c < H)
"""


def _rows_source() -> str:
    cap = "\n".join("    " + x for x in softcap_lines("z", "cap"))
    return f"""r = tl.program_id(0)
row = (R0 + r).to(tl.int64)
at = z_ptr + r.to(tl.int64) * stride_z
label = tl.load(lab_ptr + row).to(tl.int64)
m = tl.full((BLOCK_V,), float("-inf"), dtype=tl.float32)
s = tl.zeros((BLOCK_V,), dtype=tl.float32)
picked = tl.zeros((BLOCK_V,), dtype=tl.float32)
for v0 in range(0, V, BLOCK_V):
    v = v0 + tl.arange(0, BLOCK_V)
    z = tl.load(at + v, mask=v < V, other=0.0).to(tl.float32)
    if HAS_CAP:
{indent(cap, 4)}
    picked += tl.where(v == label, z, 0.0)
    z = tl.where(v < V, z, float("-inf"))
    new = tl.maximum(m, z)
    s = s * tl.exp(tl.where(new == float("-inf"), 0.0, m - new)) + \\
        tl.where(v < V, tl.exp(z - tl.where(new == float("-inf"), 0.0, new)), 0.0)
    m = new
top = tl.max(m, axis=0)
lse = top + tl.log(tl.sum(s * tl.exp(m - top), axis=0))
counted = label != {IGNORE}
tl.store(out_ptr + row * stride_out + H, tl.where(counted, lse - tl.sum(picked, axis=0), 0.0))
tl.store(out_ptr + row * stride_out + H + 1, lse)
scale = tl.where(counted, tl.load(d_ptr + row * stride_d).to(tl.float32), 0.0)
for v0 in range(0, V, BLOCK_V):
    v = v0 + tl.arange(0, BLOCK_V)
    z = tl.load(at + v, mask=v < V, other=0.0).to(tl.float32)
    if HAS_CAP:
{indent(cap, 4)}
    g = (tl.exp(z - lse) - tl.where(v == label, 1.0, 0.0)) * scale
    if HAS_CAP:
        t = z / cap
        g = g * (1.0 - t * t)
    tl.store(at + v, g.to(z_ptr.dtype.element_ty), mask=v < V)
"""


def _source(entry: str, params: list[str], body: str, precision: str = "ieee") -> str:
    return HEADER + f"def {entry}({', '.join(params)}):\n" + \
        indent(body.replace("PREC", f'"{precision}"'), 4) + "\n"


def chunk_rows(t: int, v: int, elem: int, block_m: int) -> int:
    """Rows of a chunk: as many whole row tiles as cost.LOGITS_BYTES of logits hold (one at
    least), no more than the rows."""
    rows = max(block_m, cost.LOGITS_BYTES // (elem * v) // block_m * block_m)
    return min(rows, cdiv(t, block_m) * block_m)


def dh_shares(tiles: int, v: int, block_k: int, target: Target) -> int:
    """Shares of the vocabulary d h's products split into: enough programs for two per SM,
    each share a few K steps at least (two on the interpreter when it splits as a GPU would)."""
    if target.interpreted:
        return 2 if target.interpreter_splits and v >= 2 * block_k else 1
    return max(1, min(cdiv(2 * target.sm_count, tiles), v // (16 * block_k)))


def build_dh(node, graph, target: Target) -> KernelSpec:
    """The kernels of linear_cross_entropy_dh: per chunk, logits, rows, d h's shares, sum."""
    h, w, labels, d = (graph[i] for i in node.inputs)
    t, width = h.shape
    v = w.shape[0]
    bm, bn, bk, warps, stages = DH_TILES_CPU if target.interpreted else DH_TILES_GPU
    block_v = ROW_BLOCK_CPU if target.interpreted else ROW_BLOCK_GPU
    elem = 4 if target.dtype == torch.float32 else 2
    chunk = chunk_rows(t, v, elem, bm)
    tiles = cdiv(chunk, bm) * cdiv(width, bn)
    split = dh_shares(tiles, v, bk, target)
    share = cdiv(cdiv(v, split), bk) * bk
    split = cdiv(v, share)
    prec = target.dot_precision
    cap = node.attrs["cap"]
    z = ("scratch", ("lm_logits", (chunk, v), "plan"))
    part = ("scratch", ("lm_dh_shares", (split, chunk, width), "fp32"))
    tile = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
    logits_src = _source("lm_logits_kernel", [
        "h_ptr", "w_ptr", "z_ptr", "R0", "N_ROWS", "V", "H", "stride_h", "stride_w", "stride_z",
        "BLOCK_M: tl.constexpr", "BLOCK_N: tl.constexpr", "BLOCK_K: tl.constexpr"], _LOGITS, prec)
    rows_src = _source("lm_rows_kernel", [
        "z_ptr", "lab_ptr", "d_ptr", "out_ptr", "R0", "V", "H", "stride_z", "stride_d",
        "stride_out", "cap", "HAS_CAP: tl.constexpr", "BLOCK_V: tl.constexpr"], _rows_source())
    dh_src = _source("lm_dh_kernel", [
        "z_ptr", "w_ptr", "part_ptr", "N_ROWS", "V", "H", "stride_z", "stride_w",
        "SHARE", "CHUNK: tl.constexpr", "BLOCK_M: tl.constexpr", "BLOCK_N: tl.constexpr",
        "BLOCK_K: tl.constexpr"], _DH, prec)
    sum_src = _source("lm_dh_sum_kernel", [
        "part_ptr", "out_ptr", "R0", "H", "stride_out", "CHUNK: tl.constexpr",
        "SPLIT: tl.constexpr", "BLOCK: tl.constexpr"], _SUM)
    sum_block = min(1024, next_pow2(width))
    first = last = None
    for r0 in range(0, t, chunk):
        n = min(chunk, t - r0)
        specs = [
            KernelSpec("linear_loss", "dh-logits", logits_src, "lm_logits_kernel",
                       (cdiv(n, bm) * cdiv(v, bn),),
                       [("node", h.id), ("node", w.id), z, ("value", r0), ("value", n),
                        ("value", v), ("value", width), ("stride", h.id), ("stride", w.id),
                        ("value", v)], tile, num_warps=warps, num_stages=stages),
            KernelSpec("linear_loss", "dh-rows", rows_src, "lm_rows_kernel", (n,),
                       [z, ("node", labels.id), ("node", d.id), ("node", node.id),
                        ("value", r0), ("value", v), ("value", width), ("value", v),
                        ("stride", d.id), ("stride", node.id), ("value", cap or 1.0)],
                       dict(HAS_CAP=cap > 0, BLOCK_V=block_v), num_warps=8 if block_v > 256
                       else 4, num_stages=1),
            KernelSpec("linear_loss", "dh-product", dh_src, "lm_dh_kernel",
                       (cdiv(n, bm) * cdiv(width, bn), split),
                       [z, ("node", w.id), part, ("value", n), ("value", v), ("value", width),
                        ("value", v), ("stride", w.id), ("value", share)],
                       dict(tile, CHUNK=chunk), num_warps=warps, num_stages=stages),
            KernelSpec("linear_loss", "dh-sum", sum_src, "lm_dh_sum_kernel",
                       (n, cdiv(width, sum_block)),
                       [part, ("node", node.id), ("value", r0), ("value", width),
                        ("stride", node.id)], dict(CHUNK=chunk, SPLIT=split, BLOCK=sum_block),
                       num_warps=4, num_stages=1)]
        for s in specs:
            if last is None:
                first = s
            else:
                last.then = s
            last = s
    return first
