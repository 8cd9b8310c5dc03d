"""Attention of one new token over the KV cache (a decode step): per kv head, its slots
shared among programs (split keys) whose partials a second kernel merges.

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
its running max and sum, and a second kernel, one program per query head and column block,
merges them as the online softmax would have (o = sum_j e^(m_j - m) o_j / sum_j e^(m_j - m) l_j).
A short cache (a sliding ring, a small capacity) stays in one program per kv head.

bytes: elem * (2 * n * KV * hd + 2 * H * hd), n = valid slots; FLOPs: 4 * H * hd * n
"""

from __future__ import annotations

import math

from ..compiler.cost import head_dim_chunks
from .attention import head_chunks
from .common import HEADER, KernelSpec, Target, indent, next_pow2



def emit(precision: str, head_dim: int, split: bool = False) -> str:
    """split: the slots are shared among the programs of grid axis 1, CHUNK each; every
    program with valid slots writes its partial (unnormalized output, running max and sum
    in log2 units) for `combine` to merge."""
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
                       f"mask=(rn[:, None] < n_end){dm}, other=0.0)")
        # V's block is asked with K's, so both stream while the scores are computed
        block_k.append(f"v_{c} = tl.load(v_ptr + rn[:, None].to(tl.int64) * stride_v + kv_col + rd_{c}[None, :], "
                       f"mask=(rn[:, None] < n_end){dm}, other=0.0)")
        block_v += [f"acc_{c} = tl.dot(p.to(v_{c}.dtype), v_{c}, acc_{c} * alpha[:, None], {dot})"]
        out = f"o_ptr + q_col[:, None] + rd_{c}[None, :]"
        omask = f"mask=(g[:, None] < GROUP){dm}"
        if not split:
            stores.append(f"tl.store({out}, (acc_{c} / l_i[:, None]).to(o_ptr.dtype.element_ty), "
                          f"{omask})")
            continue
        # partial outputs: [kv head, split, GROUP, HEAD_DIM] fp32, the group's rows only
        stores.append(f"tl.store(po_ptr + part_row[:, None] + rd_{c}[None, :], acc_{c}, "
                      f"{omask})")
    scores = [f"s = tl.dot(q_{c}, tl.trans(k_{c}){'' if k == 0 else ', s'}, {dot})"
              for k, (c, _, _) in enumerate(chunks)]
    loop = block_k + scores + [
        "s = tl.where(rn[None, :] < n_end, s * scale_log2e, float(\"-inf\"))",
        "m_new = tl.maximum(m_i, tl.max(s, axis=1))  # finite: every block holds a valid slot",
        "alpha = tl.exp2(m_i - m_new)",
        "p = tl.exp2(s - m_new[:, None])",
        "l_i = l_i * alpha + tl.sum(p, axis=1)"] + block_v + ["m_i = m_new"]
    key_loop = f"""m_i = tl.full((BLOCK_G,), float("-inf"), dtype=tl.float32)
l_i = tl.zeros((BLOCK_G,), dtype=tl.float32)
for n0 in range(n_begin, n_end, BLOCK_N):
    rn = n0 + tl.arange(0, BLOCK_N)
{indent(chr(10).join(loop), 4)}"""
    if split:
        finish = ["part = (kvh * SPLITS + tl.program_id(1)) * GROUP + g",
                  "part_row = part.to(tl.int64) * HEAD_DIM"] + stores + [
            "tl.store(pm_ptr + part, m_i, mask=g < GROUP)",
            "tl.store(pl_ptr + part, l_i, mask=g < GROUP)"]
        main = """n_begin = tl.program_id(1) * CHUNK
if n_begin < n_valid:  # programs past the valid slots have nothing to add
    n_end = tl.minimum(n_begin + CHUNK, n_valid)
""" + indent(key_loop + "\n" + "\n".join(finish), 4)
    else:
        main = "n_begin = 0\nn_end = n_valid\n" + key_loop + "\n" + "\n".join(stores)
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
    params += ["po_ptr", "pm_ptr", "pl_ptr"] if split else []
    params += ["stride_k", "stride_v", "SLOTS", "scale_log2e", "GROUP: tl.constexpr",
               "HEAD_DIM: tl.constexpr"]
    params += [f"D{i}: tl.constexpr" for i in range(len(chunks))]
    params += ["BLOCK_G: tl.constexpr", "BLOCK_N: tl.constexpr"]
    params += ["CHUNK: tl.constexpr", "SPLITS: tl.constexpr"] if split else []
    return HEADER + f"def decode_attention_kernel({', '.join(params)}):\n" + indent(body, 4) + "\n"


def emit_combine() -> str:
    """The merge of a split attention: one program per query head and BLOCK_D columns,
    the partials of the valid splits weighted by e^(m_j - m) (o = sum_j w_j o_j / sum_j w_j l_j),
    BLOCK_J splits a load."""
    body = '''
h = tl.program_id(0)
kvh = h // GROUP
g = h % GROUP
rd = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
d_mask = rd < HEAD_DIM
n_valid = tl.minimum(tl.load(pos_ptr).to(tl.int32) + 1, SLOTS)
n_parts = tl.cdiv(n_valid, CHUNK)
m = tl.full((BLOCK_J,), float("-inf"), dtype=tl.float32)
for j0 in range(0, n_parts, BLOCK_J):
    rj = j0 + tl.arange(0, BLOCK_J)
    cell = (kvh * SPLITS + rj) * GROUP + g
    m = tl.maximum(m, tl.load(pm_ptr + cell, mask=rj < n_parts, other=float("-inf")))
m_all = tl.max(m, axis=0)
acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
l_all = tl.zeros((BLOCK_J,), dtype=tl.float32)
for j0 in range(0, n_parts, BLOCK_J):
    rj = j0 + tl.arange(0, BLOCK_J)
    j_mask = rj < n_parts
    cell = (kvh * SPLITS + rj) * GROUP + g
    w = tl.exp2(tl.load(pm_ptr + cell, mask=j_mask, other=float("-inf")) - m_all)
    l_all += w * tl.load(pl_ptr + cell, mask=j_mask, other=0.0)
    po = tl.load(po_ptr + cell.to(tl.int64)[:, None] * HEAD_DIM + rd[None, :],
                 mask=j_mask[:, None] & d_mask[None, :], other=0.0)
    acc += tl.sum(w[:, None] * po, axis=0)
tl.store(o_ptr + h * HEAD_DIM + rd, (acc / tl.sum(l_all, axis=0)).to(o_ptr.dtype.element_ty),
         mask=d_mask)
'''
    params = ["po_ptr", "pm_ptr", "pl_ptr", "pos_ptr", "o_ptr", "SLOTS", "GROUP: tl.constexpr",
              "HEAD_DIM: tl.constexpr", "CHUNK: tl.constexpr", "SPLITS: tl.constexpr",
              "BLOCK_D: tl.constexpr", "BLOCK_J: tl.constexpr"]
    return HEADER + f"def decode_combine_kernel({', '.join(params)}):\n" + indent(body, 4) + "\n"


def split_chunk(slots: int, kv_heads: int, block_n: int, target: Target) -> int:
    """Slots per program: a full cache shared so that the kv heads' programs fill the SMs
    about twice, each streaming at least one key block (e4b's 512-slot rings: 8 programs a
    kv head); a cache of one chunk stays in one program per kv head (no merge)."""
    if target.interpreted:
        return 2 * block_n
    want = -(-slots * kv_heads // (2 * target.sm_count))
    return max(block_n, next_pow2(want))


def build(node, graph, target: Target) -> KernelSpec:
    q, k, v, pos = (graph[i] for i in node.inputs)
    a = node.attrs
    hd, group, kv_heads = a["head_dim"], a["num_heads"] // a["num_kv_heads"], a["num_kv_heads"]
    widths = head_dim_chunks(hd)
    block_n = 16 if target.interpreted else (32 if sum(widths) > 256 else 64)
    slots = k.shape[0]
    chunk = split_chunk(slots, kv_heads, block_n, target)
    splits = -(-slots // chunk)
    cells = (kv_heads, splits, group)
    scratch = [("scratch", ("partial_out", cells + (hd,), "fp32")),
               ("scratch", ("partial_max", cells, "fp32")),
               ("scratch", ("partial_sum", cells, "fp32"))] if splits > 1 else []
    args = [("node", q.id), ("node", k.id), ("node", v.id), ("node", pos.id), ("node", node.id)]
    args += scratch
    args += [("stride", k.id), ("stride", v.id), ("value", slots),
             ("value", math.log2(math.e) * a["scale"])]
    cx = dict(GROUP=group, HEAD_DIM=hd, **{f"D{i}": w for i, w in enumerate(widths)},
              BLOCK_G=max(16, next_pow2(group)), BLOCK_N=block_n)
    then = None
    if splits > 1:
        cx.update(CHUNK=chunk, SPLITS=splits)
        block_d = min(128, next_pow2(hd))
        block_j = min(64, next_pow2(splits))
        then = KernelSpec("decode_attention", "combine", emit_combine(), "decode_combine_kernel",
                          (a["num_heads"], -(-hd // block_d)),
                          scratch + [("node", pos.id), ("node", node.id), ("value", slots)],
                          dict(GROUP=group, HEAD_DIM=hd, CHUNK=chunk, SPLITS=splits,
                               BLOCK_D=block_d, BLOCK_J=block_j), num_warps=4, num_stages=1)
    # 4 warps (benchmarks/decode_attention_sweep.py on the H200: e4b's full layers at 4096
    # 12.7 us with 4, 14.7 with 8; 31b's 16.6 and over 20)
    warps = 4
    return KernelSpec("decode_attention", "cache" + (f"+split-{chunk}" if splits > 1 else ""),
                      emit(target.dot_precision, hd, splits > 1), "decode_attention_kernel",
                      (kv_heads, splits), args, cx, num_warps=warps, num_stages=2, then=then)
