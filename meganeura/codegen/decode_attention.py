"""Attention of one new token over the KV cache (a decode step): per kv head, its slots
shared among programs (split keys) that a last program merges.

    o[h] = sum_j softmax_j(scale * q[h] . k[j]) v[j]   over the first min(pos + 1, slots)
                                                       cache slots

The query heads of one GQA group are the rows of one tile (padded to the 16 rows the
matrix units take), so a kv head's keys and values are read once for the whole group.
The valid slots come from the device-held position, so one captured step replays at
every position: a full-attention cache is filled in position order, a sliding-window
ring holds exactly the window once it has wrapped, and attention over a set of keys does
not depend on their order (RoPE was applied at their positions when they were written).
Head widths split into power-of-two column chunks as in the prefill kernel.
A long cache is shared among a kv head's programs (CHUNK slots each, fixed when the plan is
built; those past the valid slots return at once): each writes its unnormalized output with
its running max and sum, and the last to finish, told by a counter, merges them as the
online softmax would have (o = sum_j e^(m_j - m) o_j / sum_j e^(m_j - m) l_j). A short one
(a sliding ring, a small capacity) stays in one program per kv head.

bytes: elem * (2 * n * KV * hd + 2 * H * hd), n = valid slots; FLOPs: 4 * H * hd * n
"""

from __future__ import annotations

import math

import torch

from ..compiler.cost import head_dim_chunks
from .attention import head_chunks
from .common import HEADER, KernelSpec, Target, indent, next_pow2

OPS = ("cache_attention",)


def emit(precision: str, head_dim: int, split: bool = False) -> str:
    """split: the slots are shared among the programs of grid axis 1, CHUNK each; every
    program with valid slots writes its partial (unnormalized output, running max and sum)
    to the scratch buffers, and the last of a kv head's programs to finish (a counter,
    released and acquired at GPU scope) merges them and writes the output."""
    dot = f'input_precision="{precision}"'
    chunks = head_chunks(head_dim)
    setup, block_k, block_v, stores, merge = [], [], [], [], []
    for i, (c, start, dmask) in enumerate(chunks):
        dm = f" & (rd_{c}[None, :] < HEAD_DIM)" if dmask else ""
        setup += [f"rd_{c} = {start} + tl.arange(0, D{i})",
                  f"q_{c} = tl.load(q_ptr + q_col[:, None] + rd_{c}[None, :], mask=(g[:, None] < GROUP){dm}, "
                  "other=0.0)",
                  f"acc_{c} = tl.zeros((BLOCK_G, D{i}), dtype=tl.float32)"]
        block_k.append(f"k_{c} = tl.load(k_ptr + rn[:, None].to(tl.int64) * stride_k + kv_col + rd_{c}[None, :], "
                       f"mask=(rn[:, None] < n_end){dm}, other=0.0)")
        block_v += [f"v_{c} = tl.load(v_ptr + rn[:, None].to(tl.int64) * stride_v + kv_col + rd_{c}[None, :], "
                    f"mask=(rn[:, None] < n_end){dm}, other=0.0)",
                    f"acc_{c} = tl.dot(p.to(v_{c}.dtype), v_{c}, acc_{c} * alpha[:, None], {dot})"]
        out = f"o_ptr + q_col[:, None] + rd_{c}[None, :]"
        omask = f"mask=(g[:, None] < GROUP){dm}"
        if not split:
            stores.append(f"tl.store({out}, (acc_{c} / l_i[:, None]).to(o_ptr.dtype.element_ty), "
                          f"{omask})")
            continue
        # partial outputs: [kv head, split, BLOCK_G, HEAD_DIM] fp32
        part = f"po_ptr + (part_row[:, None] + rd_{c}[None, :])"
        stores.append(f"tl.store({part}, acc_{c}, mask=rd_{c}[None, :] < HEAD_DIM)")
        merge += [f"o_{c} = tl.zeros((BLOCK_G, D{i}), dtype=tl.float32)",
                  f"for j in range(0, n_parts):",
                  f"    rows_j = ((kvh * SPLITS + j) * BLOCK_G + g).to(tl.int64) * HEAD_DIM",
                  f"    w_j = tl.exp2(tl.load(pm_ptr + (kvh * SPLITS + j) * BLOCK_G + g, "
                  f"cache_modifier=\".cg\") - m_all)",
                  f"    o_{c} += w_j[:, None] * tl.load(po_ptr + rows_j[:, None] + rd_{c}[None, :], "
                  f"mask=rd_{c}[None, :] < HEAD_DIM, other=0.0, cache_modifier=\".cg\")",
                  f"tl.store({out}, (o_{c} / l_all[:, None]).to(o_ptr.dtype.element_ty), {omask})"]
    scores = [f"s = tl.dot(q_{c}, tl.trans(k_{c}){'' if k == 0 else ', s'}, {dot})"
              for k, (c, _, _) in enumerate(chunks)]
    loop = block_k + scores + [
        "s = tl.where(rn[None, :] < n_end, s * scale_log2e, float(\"-inf\"))",
        "m_new = tl.maximum(m_i, tl.max(s, axis=1))  # finite: every block holds a valid slot",
        "alpha = tl.exp2(m_i - m_new)",
        "p = tl.exp2(s - m_new[:, None])",
        "l_i = l_i * alpha + tl.sum(p, axis=1)"] + block_v + ["m_i = m_new"]
    if split:
        span = """n_begin = tl.program_id(1) * CHUNK
if n_begin < n_valid:
    n_end = tl.minimum(n_begin + CHUNK, n_valid)"""
        finish = ["part = (kvh * SPLITS + tl.program_id(1)) * BLOCK_G + g",
                  "part_row = part.to(tl.int64) * HEAD_DIM"] + stores + [
            "tl.store(pm_ptr + part, m_i)", "tl.store(pl_ptr + part, l_i)",
            "tl.debug_barrier()  # every thread's partial is written before the count",
            "done = tl.atomic_add(count_ptr + kvh, 1, sem=\"acq_rel\", scope=\"gpu\")",
            "n_parts = tl.cdiv(n_valid, CHUNK)",
            "if done == n_parts - 1:  # the last: merge the partials, reset the count",
            indent("\n".join([
                "m_all = tl.full((BLOCK_G,), float(\"-inf\"), dtype=tl.float32)",
                "for j in range(0, n_parts):",
                "    m_all = tl.maximum(m_all, tl.load(pm_ptr + (kvh * SPLITS + j) * BLOCK_G + g, "
                "cache_modifier=\".cg\"))",
                "l_all = tl.zeros((BLOCK_G,), dtype=tl.float32)",
                "for j in range(0, n_parts):",
                "    cell = (kvh * SPLITS + j) * BLOCK_G + g",
                "    l_all += tl.exp2(tl.load(pm_ptr + cell, cache_modifier=\".cg\") - m_all) * "
                "tl.load(pl_ptr + cell, cache_modifier=\".cg\")"] + merge +
                ["tl.atomic_xchg(count_ptr + kvh, 0)"]), 4)]
        body_loop = indent(f"""m_i = tl.full((BLOCK_G,), float("-inf"), dtype=tl.float32)
l_i = tl.zeros((BLOCK_G,), dtype=tl.float32)
for n0 in range(n_begin, n_end, BLOCK_N):
    rn = n0 + tl.arange(0, BLOCK_N)
{indent(chr(10).join(loop), 4)}
{chr(10).join(finish)}""", 4)
        main = span + "\n" + body_loop
    else:
        main = f"""n_end = n_valid
m_i = tl.full((BLOCK_G,), float("-inf"), dtype=tl.float32)
l_i = tl.zeros((BLOCK_G,), dtype=tl.float32)
for n0 in range(0, n_valid, BLOCK_N):
    rn = n0 + tl.arange(0, BLOCK_N)
{indent(chr(10).join(loop), 4)}
{chr(10).join(stores)}"""
    body = f'''
kvh = tl.program_id(0)
g = tl.arange(0, BLOCK_G)
q_col = (kvh * GROUP + g) * HEAD_DIM  # the group's query heads, one row each
kv_col = kvh * HEAD_DIM
n_valid = tl.minimum(tl.load(pos_ptr).to(tl.int32) + 1, SLOTS)
{chr(10).join(setup)}
{main}
'''
    params = ["q_ptr", "k_ptr", "v_ptr", "pos_ptr", "o_ptr"]
    params += ["po_ptr", "pm_ptr", "pl_ptr", "count_ptr"] if split else []
    params += ["stride_k", "stride_v", "SLOTS", "scale_log2e", "GROUP: tl.constexpr",
               "HEAD_DIM: tl.constexpr"]
    params += [f"D{i}: tl.constexpr" for i in range(len(chunks))]
    params += ["BLOCK_G: tl.constexpr", "BLOCK_N: tl.constexpr"]
    params += ["CHUNK: tl.constexpr", "SPLITS: tl.constexpr"] if split else []
    return HEADER + f"def decode_attention_kernel({', '.join(params)}):\n" + indent(body, 4) + "\n"


def split_chunk(slots: int, kv_heads: int, block_n: int, target: Target) -> int:
    """Slots per program: the slots shared so that the kv heads' programs fill the SMs twice
    over at a full cache, each streaming at least four key blocks; all of them (one program
    per kv head) where that leaves one chunk."""
    if target.interpreted:
        return 2 * block_n
    want = -(-slots * kv_heads // (2 * target.sm_count))
    return max(4 * block_n, next_pow2(want))


def build(node, graph, target: Target) -> KernelSpec:
    q, k, v, pos = (graph[i] for i in node.inputs)
    a = node.attrs
    hd, group, kv_heads = a["head_dim"], a["num_heads"] // a["num_kv_heads"], a["num_kv_heads"]
    widths = head_dim_chunks(hd)
    block_n = 16 if target.interpreted else (32 if sum(widths) > 256 else 64)
    block_g = max(16, next_pow2(group))
    slots = k.shape[0]
    chunk = split_chunk(slots, kv_heads, block_n, target)
    splits = -(-slots // chunk)
    args = [("node", q.id), ("node", k.id), ("node", v.id), ("node", pos.id), ("node", node.id)]
    if splits > 1:  # scratch shared by every launch of the same shape (they run in order)
        cells = (kv_heads, splits, block_g)
        args += [("scratch", ("partial_out", cells + (hd,), "fp32")),
                 ("scratch", ("partial_max", cells, "fp32")),
                 ("scratch", ("partial_sum", cells, "fp32")),
                 ("scratch", ("count", (kv_heads,), "i32"))]
    args += [("stride", k.id), ("stride", v.id), ("value", slots),
             ("value", math.log2(math.e) * a["scale"])]
    cx = dict(GROUP=group, HEAD_DIM=hd, **{f"D{i}": w for i, w in enumerate(widths)},
              BLOCK_G=block_g, BLOCK_N=block_n)
    cx.update(dict(CHUNK=chunk, SPLITS=splits) if splits > 1 else {})
    warps = 4 if target.interpreted or target.dtype == torch.float32 else 8
    return KernelSpec("decode_attention", "cache" + (f"+split-{chunk}" if splits > 1 else ""),
                      emit(target.dot_precision, hd, splits > 1), "decode_attention_kernel",
                      (kv_heads, splits), args, cx, num_warps=warps, num_stages=2)
