"""Flash attention with online softmax: causal or sliding window, GQA, any even head_dim.

    o[i] = sum_j softmax_j(scale * q[i] . k[j]) v[j]  over  j <= i  (and j > i - window)

(scale: 1/sqrt(hd) in the seed, 1.0 in the published Gemma-4, whose q and k are normalized)

One program per (query head, query block); query head h reads kv head h // group, and
the heads of one group run side by side so their k/v tiles are shared in L2. Query
blocks are handed out last-first: the longest rows start first, the short ones fill in.

Key blocks are visited in three runs. The blocks holding the diagonal come first, with
the causal (and window) mask; after them every row has seen a key, so its running max
is finite. Then the blocks wholly inside the mask, with no mask at all, and, for a
sliding window, the blocks across the window's lower edge, masked again. Blocks wholly
outside the mask are never visited.

A head_dim that is the sum of two powers of two (144 = 128 + 16) is split in two column
chunks instead of being padded to the next power of two (256): each chunk has its own
q tile and output accumulator, and the scores are the sum of the chunks' products.
Other widths (132, 240) are padded to the next power of two, the padding masked in
loads and stores.

bytes: elem * (S*H*hd + 2*S*KV*hd + S*H*hd) (q, k, v read once per head, o written)
FLOPs: 4 * H * (chunk widths) * pairs on the matrix units, pairs = sum_i min(i + 1, window)
"""

from __future__ import annotations

import math

import torch

from ..compiler.cost import head_dim_chunks
from .common import HEADER, KernelSpec, Target, cdiv, fit_stages, indent



def head_chunks(hd: int) -> list[tuple[str, str, bool]]:
    """(suffix, first column, masked) per column chunk of the head; chunk i is D{i} wide."""
    widths = head_dim_chunks(hd)
    return [(chr(ord("a") + i), " + ".join(f"D{j}" for j in range(i)) or "0", sum(widths[:i + 1]) > hd)
            for i in range(len(widths))]


def _block(chunks, masked: bool, sliding: bool, dot: str) -> str:
    """One key block at n0: scores, online softmax update, P @ V (per chunk)."""
    lines = ["rn = n0 + tl.arange(0, BLOCK_N)"]
    row_mask = "(rn[:, None] < S)" if masked else None
    for c, _, dmask in chunks:
        mask = " & ".join(x for x in (row_mask, f"(rd_{c}[None, :] < HEAD_DIM)" if dmask else None) if x)
        load = f"tl.load(k_col + rn[:, None] * stride_k + rd_{c}[None, :]"
        lines.append(f"k_{c} = {load}, mask={mask}, other=0.0)" if mask else f"k_{c} = {load})")
    first = True
    for c, _, _ in chunks:
        acc = "" if first else ", s"
        lines.append(f"s = tl.dot(q_{c}, tl.trans(k_{c}){acc}, {dot})")
        first = False
    lines.append("s = s * scale_log2e")
    if masked:
        allowed = "(rn[None, :] <= rm[:, None]) & (rn[None, :] < S)"
        if sliding:
            allowed += " & (rn[None, :] > rm[:, None] - WINDOW)"
        lines.append(f"s = tl.where({allowed}, s, float(\"-inf\"))")
        lines.append("m_new = tl.maximum(m_i, tl.max(s, axis=1))")
        lines.append("m_use = tl.where(m_new == float(\"-inf\"), 0.0, m_new)  # no key yet")
    else:  # every row already holds a finite max (the diagonal run came first)
        lines.append("m_new = tl.maximum(m_i, tl.max(s, axis=1))")
        lines.append("m_use = m_new")
    lines.append("alpha = tl.exp2(m_i - m_use)")
    lines.append("p = tl.exp2(s - m_use[:, None])")
    lines.append("l_i = l_i * alpha + tl.sum(p, axis=1)")
    for c, _, dmask in chunks:
        mask = " & ".join(x for x in (row_mask, f"(rd_{c}[None, :] < HEAD_DIM)" if dmask else None) if x)
        load = f"tl.load(v_col + rn[:, None] * stride_v + rd_{c}[None, :]"
        lines.append(f"v_{c} = {load}, mask={mask}, other=0.0)" if mask else f"v_{c} = {load})")
        lines.append(f"acc_{c} = tl.dot(p.to(v_{c}.dtype), v_{c}, acc_{c} * alpha[:, None], {dot})")
    lines.append("m_i = m_new")
    return "\n".join(lines)


def emit(sliding: bool, precision: str, head_dim: int) -> str:
    dot = f'input_precision="{precision}"'
    chunks = head_chunks(head_dim)
    setup = []
    for i, (c, start, dmask) in enumerate(chunks):
        width = f"D{i}"
        setup.append(f"rd_{c} = {start} + tl.arange(0, {width})")
        mask = "(rm[:, None] < S)" + (f" & (rd_{c}[None, :] < HEAD_DIM)" if dmask else "")
        setup.append(f"q_{c} = tl.load(q_row + rd_{c}[None, :], mask={mask}, other=0.0)")
        setup.append(f"acc_{c} = tl.zeros((BLOCK_M, {width}), dtype=tl.float32)")
    if sliding:
        ranges = ("lo = (tl.maximum(q0 - WINDOW + 1, 0) // BLOCK_N) * BLOCK_N  # first key block in the window\n"
                  "full = tl.maximum(q0 + BLOCK_M - WINDOW, 0)  # keys from here on: in every row's window\n"
                  "full = tl.minimum(tl.maximum((full + BLOCK_N - 1) // BLOCK_N * BLOCK_N, lo), q0)")
    else:
        ranges = "lo = 0\nfull = 0"
    masked = _block(chunks, True, sliding, dot)
    plain = _block(chunks, False, sliding, dot)
    edge = (f"\n# blocks across the window's lower edge\nfor n0 in range(lo, full, BLOCK_N):\n"
            f"{indent(masked, 4)}" if sliding else "")
    stores = "\n".join(
        f"tl.store(o_row + rd_{c}[None, :], (acc_{c} / l_safe[:, None]).to(o_ptr.dtype.element_ty), "
        f"mask=(rm[:, None] < S){f' & (rd_{c}[None, :] < HEAD_DIM)' if dmask else ''})"
        for c, _, dmask in chunks)
    body = f'''
h = tl.program_id(0)
qb = tl.num_programs(1) - 1 - tl.program_id(1)  # longest rows first
kvh = h // GROUP
q0 = qb * BLOCK_M
rm = q0 + tl.arange(0, BLOCK_M)
q_row = q_ptr + rm[:, None].to(tl.int64) * stride_q + h * HEAD_DIM
k_col = k_ptr + kvh * HEAD_DIM
v_col = v_ptr + kvh * HEAD_DIM
{chr(10).join(setup)}
m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
{ranges}
# the diagonal blocks, masked: afterwards every row has a finite running max
hi = tl.minimum(q0 + BLOCK_M, S)
for n0 in range(q0, hi, BLOCK_N):
{indent(masked, 4)}
# blocks wholly inside the mask
for n0 in range(full, q0, BLOCK_N):
{indent(plain, 4)}{edge}
l_safe = tl.where(l_i == 0.0, 1.0, l_i)  # padded rows past S see no key
o_row = o_ptr + rm[:, None].to(tl.int64) * stride_o + h * HEAD_DIM
{stores}
'''
    params = ["q_ptr", "k_ptr", "v_ptr", "o_ptr", "stride_q", "stride_k", "stride_v", "stride_o",
              "S", "scale_log2e"] + (["WINDOW"] if sliding else [])
    params += ["GROUP: tl.constexpr", "HEAD_DIM: tl.constexpr"]
    params += [f"D{i}: tl.constexpr" for i in range(len(chunks))]
    params += ["BLOCK_M: tl.constexpr", "BLOCK_N: tl.constexpr"]
    return HEADER + f"def attention_kernel({', '.join(params)}):\n" + indent(body, 4) + "\n"


# (BLOCK_M, BLOCK_N, warps, stages) by the padded head width, bf16 on the GPU, from
# benchmarks/kernel_sweep.py on the H200 (4b 128 wide, 27b 144 = 128 + 16, 12b 240 -> 256)
# and, not yet measured, 512 (the published model's full-attention heads, 2 x 256)
GPU_BLOCKS = {64: (64, 64, 4, 3), 128: (64, 64, 4, 3), 144: (128, 64, 8, 3),
              256: (128, 64, 8, 2), 512: (64, 32, 8, 2)}


def blocks(head_dim: int, target: Target) -> tuple[int, int, int, int]:
    width = sum(head_dim_chunks(head_dim))
    if target.interpreted:  # two key blocks per query block: the diagonal run loops
        return 32, 16, 4, 1
    if target.dtype == torch.float32:
        return (64, 32, 4, 2) if width <= 128 else (32, 32, 4, 2)
    key = min((w for w in GPU_BLOCKS if w >= width), default=512)
    return GPU_BLOCKS[key]


def build(node, graph, target: Target) -> KernelSpec:
    q, k, v = (graph[i] for i in node.inputs)
    s = q.shape[0]
    a = node.attrs
    sliding = node.op == "sliding_window_attention"
    hd = a["head_dim"]
    widths = head_dim_chunks(hd)
    bm, bn, warps, want = blocks(hd, target)
    elem = 4 if target.dtype == torch.float32 else 2
    stages = fit_stages(2 * bn * sum(widths) * elem, bm * sum(widths) * elem, want)
    args = [("node", q.id), ("node", k.id), ("node", v.id), ("node", node.id),
            ("stride", q.id), ("stride", k.id), ("stride", v.id), ("stride", node.id),
            ("value", s), ("value", math.log2(math.e) * a["scale"])]
    args += [("value", a["window"])] if sliding else []
    cx = dict(GROUP=a["num_heads"] // a["num_kv_heads"], HEAD_DIM=hd,
              **{f"D{i}": w for i, w in enumerate(widths)}, BLOCK_M=bm, BLOCK_N=bn)
    return KernelSpec("attention", "sliding-window" if sliding else "causal",
                      emit(sliding, target.dot_precision, hd), "attention_kernel",
                      (a["num_heads"], cdiv(s, bm)), args, cx, num_warps=warps,
                      num_stages=stages)
