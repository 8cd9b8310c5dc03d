"""Attention of one new token over the KV cache (a decode step). One program per kv head.

    o[h] = sum_j softmax_j(scale * q[h] . k[j]) v[j]   over the first min(pos + 1, slots)
                                                       cache slots

The query heads of one GQA group are the rows of one tile (padded to the 16 rows the
matrix units take), so a kv head's keys and values are read once for the whole group.
The valid slots come from the device-held position, so one captured step replays at
every position: a full-attention cache is filled in position order, a sliding-window
ring holds exactly the window once it has wrapped, and attention over a set of keys does
not depend on their order (RoPE was applied at their positions when they were written).
Head widths split into power-of-two column chunks as in the prefill kernel.

bytes: elem * (2 * n * KV * hd + 2 * H * hd), n = valid slots; FLOPs: 4 * H * hd * n
"""

from __future__ import annotations

import math

import torch

from ..compiler.cost import head_dim_chunks
from .attention import head_chunks
from .common import HEADER, KernelSpec, Target, indent, next_pow2

OPS = ("cache_attention",)


def emit(precision: str, head_dim: int) -> str:
    dot = f'input_precision="{precision}"'
    chunks = head_chunks(head_dim)
    setup, block_k, block_v, stores = [], [], [], []
    for i, (c, start, dmask) in enumerate(chunks):
        dm = f" & (rd_{c}[None, :] < HEAD_DIM)" if dmask else ""
        setup += [f"rd_{c} = {start} + tl.arange(0, D{i})",
                  f"q_{c} = tl.load(q_ptr + q_col[:, None] + rd_{c}[None, :], mask=(g[:, None] < GROUP){dm}, "
                  "other=0.0)",
                  f"acc_{c} = tl.zeros((BLOCK_G, D{i}), dtype=tl.float32)"]
        block_k.append(f"k_{c} = tl.load(k_ptr + rn[:, None].to(tl.int64) * stride_k + kv_col + rd_{c}[None, :], "
                       f"mask=(rn[:, None] < n_valid){dm}, other=0.0)")
        block_v += [f"v_{c} = tl.load(v_ptr + rn[:, None].to(tl.int64) * stride_v + kv_col + rd_{c}[None, :], "
                    f"mask=(rn[:, None] < n_valid){dm}, other=0.0)",
                    f"acc_{c} = tl.dot(p.to(v_{c}.dtype), v_{c}, acc_{c} * alpha[:, None], {dot})"]
        stores.append(f"tl.store(o_ptr + q_col[:, None] + rd_{c}[None, :], (acc_{c} / l_i[:, None])"
                      f".to(o_ptr.dtype.element_ty), mask=(g[:, None] < GROUP){dm})")
    scores = [f"s = tl.dot(q_{c}, tl.trans(k_{c}){'' if k == 0 else ', s'}, {dot})"
              for k, (c, _, _) in enumerate(chunks)]
    loop = block_k + scores + [
        "s = tl.where(rn[None, :] < n_valid, s * scale_log2e, float(\"-inf\"))",
        "m_new = tl.maximum(m_i, tl.max(s, axis=1))  # finite: every block holds a valid slot",
        "alpha = tl.exp2(m_i - m_new)",
        "p = tl.exp2(s - m_new[:, None])",
        "l_i = l_i * alpha + tl.sum(p, axis=1)"] + block_v + ["m_i = m_new"]
    body = f'''
kvh = tl.program_id(0)
g = tl.arange(0, BLOCK_G)
q_col = (kvh * GROUP + g) * HEAD_DIM  # the group's query heads, one row each
kv_col = kvh * HEAD_DIM
n_valid = tl.minimum(tl.load(pos_ptr).to(tl.int32) + 1, SLOTS)
{chr(10).join(setup)}
m_i = tl.full((BLOCK_G,), float("-inf"), dtype=tl.float32)
l_i = tl.zeros((BLOCK_G,), dtype=tl.float32)
for n0 in range(0, n_valid, BLOCK_N):
    rn = n0 + tl.arange(0, BLOCK_N)
{indent(chr(10).join(loop), 4)}
{chr(10).join(stores)}
'''
    params = ["q_ptr", "k_ptr", "v_ptr", "pos_ptr", "o_ptr", "stride_k", "stride_v", "SLOTS",
              "scale_log2e", "GROUP: tl.constexpr", "HEAD_DIM: tl.constexpr"]
    params += [f"D{i}: tl.constexpr" for i in range(len(chunks))]
    params += ["BLOCK_G: tl.constexpr", "BLOCK_N: tl.constexpr"]
    return HEADER + f"def decode_attention_kernel({', '.join(params)}):\n" + indent(body, 4) + "\n"


def build(node, graph, target: Target) -> KernelSpec:
    q, k, v, pos = (graph[i] for i in node.inputs)
    a = node.attrs
    hd, group = a["head_dim"], a["num_heads"] // a["num_kv_heads"]
    widths = head_dim_chunks(hd)
    block_n = 16 if target.interpreted else (32 if sum(widths) > 256 else 64)
    args = [("node", q.id), ("node", k.id), ("node", v.id), ("node", pos.id), ("node", node.id),
            ("stride", k.id), ("stride", v.id), ("value", k.shape[0]),
            ("value", math.log2(math.e) * a["scale"])]
    cx = dict(GROUP=group, HEAD_DIM=hd, **{f"D{i}": w for i, w in enumerate(widths)},
              BLOCK_G=max(16, next_pow2(group)), BLOCK_N=block_n)
    warps = 4 if target.interpreted or target.dtype == torch.float32 else 8
    return KernelSpec("decode_attention", "cache", emit(target.dot_precision, hd),
                      "decode_attention_kernel", (a["num_kv_heads"],), args, cx, num_warps=warps,
                      num_stages=2)
