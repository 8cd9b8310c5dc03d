"""Flash attention with online softmax: causal or sliding window, GQA, any even head_dim.

    o[i] = sum_j softmax_j(q[i] . k[j] / sqrt(hd)) v[j]  over  j <= i  (and j > i - window)

One program per (query block, query head); query head h reads kv head h // group.
Key blocks wholly outside the mask are never visited: the loop runs from the first
block that reaches into the window to the block holding the diagonal. A head_dim
that is not a power of two (132, 144, 240) is padded to the next one inside
registers only; loads and stores are masked to the real width.

bytes: elem * (S*H*hd + 2*S*KV*hd + S*H*hd) (q, k, v read once per head, o written)
FLOPs: 4 * H * hd * pairs on the matrix units, pairs = sum_i min(i + 1, window)
"""

from __future__ import annotations

import math

import torch

from .common import HEADER, KernelSpec, Target, cdiv, fit_stages, indent, next_pow2

OPS = ("causal_attention", "sliding_window_attention")


def emit(sliding: bool, precision: str) -> str:
    dot = f'input_precision="{precision}"'
    lo = "(tl.maximum(q0 - WINDOW + 1, 0) // BLOCK_N) * BLOCK_N" if sliding else "0"
    window_mask = "\n    allowed = allowed & (rn[None, :] > rm[:, None] - WINDOW)" if sliding else ""
    body = f'''
qb = tl.program_id(0)
h = tl.program_id(1)
kvh = h // GROUP
q0 = qb * BLOCK_M
rm = q0 + tl.arange(0, BLOCK_M)
rd = tl.arange(0, BLOCK_D)
d_mask = rd < HEAD_DIM
q = tl.load(q_ptr + rm[:, None] * stride_q + h * HEAD_DIM + rd[None, :],
            mask=(rm[:, None] < S) & d_mask[None, :], other=0.0)
m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
# only the key blocks that the mask reaches: [first block in the window, diagonal block]
lo = {lo}
hi = tl.minimum(q0 + BLOCK_M, S)
for n0 in range(lo, hi, BLOCK_N):
    rn = n0 + tl.arange(0, BLOCK_N)
    kv_mask = (rn[None, :] < S) & d_mask[:, None]
    kt = tl.load(k_ptr + rn[None, :] * stride_k + kvh * HEAD_DIM + rd[:, None], mask=kv_mask,
                 other=0.0)
    s = tl.dot(q, kt, {dot}) * scale_log2e
    allowed = (rn[None, :] <= rm[:, None]) & (rn[None, :] < S){window_mask}
    s = tl.where(allowed, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key yet
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    v = tl.load(v_ptr + rn[:, None] * stride_v + kvh * HEAD_DIM + rd[None, :],
                mask=(rn[:, None] < S) & d_mask[None, :], other=0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, {dot})
    m_i = m_new
out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # padded rows past S see no key
tl.store(o_ptr + rm[:, None] * stride_o + h * HEAD_DIM + rd[None, :],
         out.to(o_ptr.dtype.element_ty), mask=(rm[:, None] < S) & d_mask[None, :])
'''
    params = ["q_ptr", "k_ptr", "v_ptr", "o_ptr", "stride_q", "stride_k", "stride_v", "stride_o",
              "S", "scale_log2e"] + (["WINDOW"] if sliding else [])
    params += ["GROUP: tl.constexpr", "HEAD_DIM: tl.constexpr", "BLOCK_D: tl.constexpr",
               "BLOCK_M: tl.constexpr", "BLOCK_N: tl.constexpr"]
    return HEADER + f"def attention_kernel({', '.join(params)}):\n" + indent(body, 4) + "\n"


def build(node, graph, target: Target) -> KernelSpec:
    q, k, v = (graph[i] for i in node.inputs)
    s = q.shape[0]
    a = node.attrs
    sliding = node.op == "sliding_window_attention"
    hd = a["head_dim"]
    bd = next_pow2(max(hd, 16))
    if target.interpreted:
        bm = bn = 16
    elif target.dtype == torch.float32:
        bm, bn = (64, 32) if bd <= 128 else (32, 32)
    else:
        bm, bn = (128, 64) if bd <= 128 else (64, 32)
    args = [("node", q.id), ("node", k.id), ("node", v.id), ("node", node.id),
            ("stride", q.id), ("stride", k.id), ("stride", v.id), ("stride", node.id),
            ("value", s), ("value", math.log2(math.e) / math.sqrt(hd))]
    args += [("value", a["window"])] if sliding else []
    cx = dict(GROUP=a["num_heads"] // a["num_kv_heads"], HEAD_DIM=hd, BLOCK_D=bd, BLOCK_M=bm,
              BLOCK_N=bn)
    warps = 4 if target.interpreted or bd <= 64 else 8
    elem = 4 if target.dtype == torch.float32 else 2
    stages = 1 if target.interpreted else fit_stages(2 * bn * bd * elem, bm * bd * elem, 3)
    return KernelSpec("attention", "sliding-window" if sliding else "causal",
                      emit(sliding, target.dot_precision), "attention_kernel",
                      (cdiv(s, bm), a["num_heads"]), args, cx, num_warps=warps,
                      num_stages=stages)
