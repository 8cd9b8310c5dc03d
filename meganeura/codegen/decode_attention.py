"""Attention of rows over the KV cache: a decode step (one row, or one row per sequence of a
batched step) or a prefill chunk (rows of one sequence at consecutive positions).

    o[i, h] = sum_p softmax_p(scale * q[i, h] . k[p]) v[p]   over the positions
              p in [max(0, pos[i] - reach + 1), pos[i]],  reach = min(window, slots)

position p at slot p % slots of the row's sequence block (the only one, or block i in a
batched step). A tile is ROWS query rows times the query heads of one GQA group, padded
to the 16 rows the matrix units take: a kv head's keys and values are read once for the
whole tile. A decode step's tile is one row (its group's heads); a chunk's tile is several
rows of one sequence, whose key range is the union of theirs, each row masked to its own
(causal and window). Positions come from the device, so one captured step replays at
every position; keys are visited in position order, read at their ring slots. Head
widths split into power-of-two column chunks as in the prefill kernel.
A decode step's long key range is shared among a row's programs (CHUNK positions each,
fixed when the plan is built; those past the row's keys return at once): each writes its
unnormalized output with its running max and sum, and a second kernel, one program per
(row, query head) and column block, merges them as the online softmax would have
(o = sum_j e^(m_j - m) o_j / sum_j e^(m_j - m) l_j). A short range (a sliding ring, a
small capacity) stays in one program per (row, kv head).

bytes: elem * (2 * n * KV * hd + 2 * H * hd) per row, n its keys (a chunk's tile reads its
keys once for its rows); FLOPs: 4 * H * hd * n per row
"""

from __future__ import annotations

import math

from ..compiler.cost import head_dim_chunks
from .attention import head_chunks
from .common import HEADER, KernelSpec, Target, indent, next_pow2



def emit(precision: str, head_dim: int, split: bool = False) -> str:
    """split: a row's positions are shared among the programs of grid axis 2, CHUNK each;
    every program with keys writes its partial (unnormalized output, running max and sum
    in log2 units) for `combine` to merge."""
    dot = f'input_precision="{precision}"'
    chunks = head_chunks(head_dim)
    setup, block_k, block_v, stores = [], [], [], []
    for i, (c, start, dmask) in enumerate(chunks):
        dm = f" & (rd_{c}[None, :] < HEAD_DIM)" if dmask else ""
        setup += [f"rd_{c} = {start} + tl.arange(0, D{i})",
                  f"q_{c} = tl.load(q_ptr + q_at[:, None] + rd_{c}[None, :], "
                  f"mask=valid[:, None]{dm}, other=0.0)",
                  f"acc_{c} = tl.zeros((BLOCK_M, D{i}), dtype=tl.float32)"]
        block_k.append(f"k_{c} = tl.load(k_ptr + slot[:, None] * stride_k + kv_col + rd_{c}[None, :], "
                       f"mask=(kp[:, None] < n_end){dm}, other=0.0)")
        # V's block is asked with K's, so both stream while the scores are computed
        block_k.append(f"v_{c} = tl.load(v_ptr + slot[:, None] * stride_v + kv_col + rd_{c}[None, :], "
                       f"mask=(kp[:, None] < n_end){dm}, other=0.0)")
        block_v += [f"acc_{c} = tl.dot(p.to(v_{c}.dtype), v_{c}, acc_{c} * alpha[:, None], {dot})"]
        omask = f"mask=valid[:, None]{dm}"
        if not split:
            stores.append(f"tl.store(o_ptr + o_at[:, None] + rd_{c}[None, :], "
                          f"(acc_{c} / l_div[:, None]).to(o_ptr.dtype.element_ty), {omask})")
            continue
        # partial outputs: [row, kv head, split, GROUP, HEAD_DIM] fp32, the group's rows only
        stores.append(f"tl.store(po_ptr + part_row[:, None] + rd_{c}[None, :], acc_{c}, "
                      f"{omask})")
    scores = [f"s = tl.dot(q_{c}, tl.trans(k_{c}){'' if k == 0 else ', s'}, {dot})"
              for k, (c, _, _) in enumerate(chunks)]
    loop = ["kp = n0 + tl.arange(0, BLOCK_N)  # key positions",
            "slot = base + (kp % SLOTS).to(tl.int64)"] + block_k + scores + [
        "seen = (kp[None, :] < n_end) & (kp[None, :] <= p_row[:, None]) & "
        "(kp[None, :] > p_row[:, None] - REACH)",
        "s = tl.where(seen, s * scale_log2e, float(\"-inf\"))",
        "m_new = tl.maximum(m_i, tl.max(s, axis=1))",
        "m_use = tl.where(m_new == float(\"-inf\"), 0.0, m_new)  # a row with no key yet",
        "alpha = tl.exp2(m_i - m_use)",
        "p = tl.exp2(s - m_use[:, None])",
        "l_i = l_i * alpha + tl.sum(p, axis=1)"] + block_v + ["m_i = m_new"]
    key_loop = f"""m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
for n0 in range(n_begin, n_end, BLOCK_N):
{indent(chr(10).join(loop), 4)}"""
    if split:
        finish = ["part = ((row * KV_HEADS + kvh) * SPLITS + tl.program_id(2)) * GROUP + g",
                  "part_row = part.to(tl.int64) * HEAD_DIM"] + stores + [
            "tl.store(pm_ptr + part, m_i, mask=valid)",
            "tl.store(pl_ptr + part, l_i, mask=valid)"]
        main = """n_begin = lo + tl.program_id(2) * CHUNK
if n_begin < hi:  # programs past the row's keys have nothing to add
    n_end = tl.minimum(n_begin + CHUNK, hi)
""" + indent(key_loop + "\n" + "\n".join(finish), 4)
    else:
        main = "n_begin = lo\nn_end = hi\n" + key_loop + \
            "\nl_div = tl.where(valid, l_i, 1.0)  # (rows past the tile's: nothing stored)\n" + \
            "\n".join(stores)
    body = f'''
tile = tl.program_id(0)
kvh = tl.program_id(1)
m = tl.arange(0, BLOCK_M)
row = tile * ROWS + m // GROUP_PAD  # a tile's rows, the group's query heads of each
g = m % GROUP_PAD
valid = (m < ROWS * GROUP_PAD) & (g < GROUP) & (row < T)
p_row = tl.load(pos_ptr + row, mask=valid, other=0).to(tl.int32)
first = tl.load(pos_ptr + tile * ROWS).to(tl.int32)
last = tl.load(pos_ptr + tl.minimum(tile * ROWS + ROWS, T) - 1).to(tl.int32)
lo = tl.maximum(first - REACH + 1, 0)  # the tile's key positions: [lo, hi)
hi = last + 1
base = (tile * SLOTS).to(tl.int64) if BATCHED else 0  # the rows' sequence block
q_at = row.to(tl.int64) * stride_q + (kvh * GROUP + g) * HEAD_DIM
o_at = row.to(tl.int64) * stride_o + (kvh * GROUP + g) * HEAD_DIM
kv_col = kvh * HEAD_DIM
{chr(10).join(setup)}
{main}
'''
    params = ["q_ptr", "k_ptr", "v_ptr", "pos_ptr", "o_ptr"]
    params += ["po_ptr", "pm_ptr", "pl_ptr"] if split else []
    params += ["stride_q", "stride_o", "stride_k", "stride_v", "T", "SLOTS", "REACH",
               "scale_log2e", "GROUP: tl.constexpr", "GROUP_PAD: tl.constexpr",
               "KV_HEADS: tl.constexpr", "HEAD_DIM: tl.constexpr"]
    params += [f"D{i}: tl.constexpr" for i in range(len(chunks))]
    params += ["ROWS: tl.constexpr", "BATCHED: tl.constexpr", "BLOCK_M: tl.constexpr",
               "BLOCK_N: tl.constexpr"]
    params += ["CHUNK: tl.constexpr", "SPLITS: tl.constexpr"] if split else []
    return HEADER + f"def decode_attention_kernel({', '.join(params)}):\n" + indent(body, 4) + "\n"


def emit_combine() -> str:
    """The merge of a split attention: one program per (row, query head) and BLOCK_D columns,
    the partials of the row's splits weighted by e^(m_j - m) (o = sum_j w_j o_j / sum_j w_j l_j),
    BLOCK_J splits a load."""
    body = '''
row = tl.program_id(0) // HEADS
h = tl.program_id(0) % HEADS
kvh = h // GROUP
g = h % GROUP
rd = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
d_mask = rd < HEAD_DIM
p = tl.load(pos_ptr + row).to(tl.int32)
n_parts = tl.cdiv(p + 1 - tl.maximum(p - REACH + 1, 0), CHUNK)
first = (row * KV_HEADS + kvh) * SPLITS
m = tl.full((BLOCK_J,), float("-inf"), dtype=tl.float32)
for j0 in range(0, n_parts, BLOCK_J):
    rj = j0 + tl.arange(0, BLOCK_J)
    cell = (first + rj) * GROUP + g
    m = tl.maximum(m, tl.load(pm_ptr + cell, mask=rj < n_parts, other=float("-inf")))
m_all = tl.max(m, axis=0)
acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
l_all = tl.zeros((BLOCK_J,), dtype=tl.float32)
for j0 in range(0, n_parts, BLOCK_J):
    rj = j0 + tl.arange(0, BLOCK_J)
    j_mask = rj < n_parts
    cell = (first + rj) * GROUP + g
    w = tl.exp2(tl.load(pm_ptr + cell, mask=j_mask, other=float("-inf")) - m_all)
    l_all += w * tl.load(pl_ptr + cell, mask=j_mask, other=0.0)
    po = tl.load(po_ptr + cell.to(tl.int64)[:, None] * HEAD_DIM + rd[None, :],
                 mask=j_mask[:, None] & d_mask[None, :], other=0.0)
    acc += tl.sum(w[:, None] * po, axis=0)
tl.store(o_ptr + row.to(tl.int64) * stride_o + h * HEAD_DIM + rd,
         (acc / tl.sum(l_all, axis=0)).to(o_ptr.dtype.element_ty), mask=d_mask)
'''
    params = ["po_ptr", "pm_ptr", "pl_ptr", "pos_ptr", "o_ptr", "stride_o", "REACH",
              "HEADS: tl.constexpr", "GROUP: tl.constexpr", "KV_HEADS: tl.constexpr",
              "HEAD_DIM: tl.constexpr", "CHUNK: tl.constexpr", "SPLITS: tl.constexpr",
              "BLOCK_D: tl.constexpr", "BLOCK_J: tl.constexpr"]
    return HEADER + f"def decode_combine_kernel({', '.join(params)}):\n" + indent(body, 4) + "\n"


def split_chunk(keys: int, programs: int, block_n: int, target: Target) -> int:
    """Key positions per program: a row's range shared so that the (row, kv head) programs
    fill the SMs about twice, each streaming at least one key block (e4b's 512-key windows:
    8 programs a kv head); a range of one chunk stays in one program (no merge)."""
    if target.interpreted:  # each program costs there: one a row, or two where tests
        # cover the split and its merge
        half = -(-keys // 2) if target.interpreter_splits else keys
        return max(2 * block_n, next_pow2(half))
    want = -(-keys * programs // (2 * target.sm_count))
    return max(block_n, next_pow2(want))


def reach(node, graph) -> tuple[int, int]:
    """(slots of a sequence's block, the most keys a row attends to)."""
    a = node.attrs
    slots = graph[node.inputs[1]].shape[0] // a.get("sequences", 1)
    return slots, min(a.get("window") or slots, slots)


def build(node, graph, target: Target) -> KernelSpec:
    q, k, v, pos = (graph[i] for i in node.inputs)
    a = node.attrs
    hd, group, kv_heads = a["head_dim"], a["num_heads"] // a["num_kv_heads"], a["num_kv_heads"]
    b, t = a.get("sequences", 1), q.shape[0]
    widths = head_dim_chunks(hd)
    block_n = 16 if target.interpreted else (32 if sum(widths) > 256 else 64)
    slots, keys = reach(node, graph)
    group_pad = next_pow2(group)
    if b > 1 or t == 1:  # a decode step: a row a tile, its long key range split
        rows, block_m = 1, max(16, group_pad)
        chunk = split_chunk(keys, t * kv_heads, block_n, target)
        splits = -(-keys // chunk)
    else:  # a chunk's rows: tiles of about 64 (32 for heads over 256 wide) query rows
        block_m = 16 if target.interpreted else (32 if sum(widths) > 256 else 64)
        block_m = max(block_m, group_pad)
        rows, chunk, splits = block_m // group_pad, 0, 1
    tiles = -(-t // rows)
    cells = (t, kv_heads, splits, group)
    scratch = [("scratch", ("partial_out", cells + (hd,), "fp32")),
               ("scratch", ("partial_max", cells, "fp32")),
               ("scratch", ("partial_sum", cells, "fp32"))] if splits > 1 else []
    args = [("node", q.id), ("node", k.id), ("node", v.id), ("node", pos.id), ("node", node.id)]
    args += scratch
    args += [("stride", q.id), ("stride", node.id), ("stride", k.id), ("stride", v.id),
             ("value", t), ("value", slots), ("value", keys),
             ("value", math.log2(math.e) * a["scale"])]
    cx = dict(GROUP=group, GROUP_PAD=group_pad, KV_HEADS=kv_heads, HEAD_DIM=hd,
              **{f"D{i}": w for i, w in enumerate(widths)}, ROWS=rows, BATCHED=b > 1,
              BLOCK_M=block_m, BLOCK_N=block_n)
    then = None
    if splits > 1:
        cx.update(CHUNK=chunk, SPLITS=splits)
        block_d = min(128, next_pow2(hd))
        block_j = min(64, next_pow2(splits))
        then = KernelSpec("decode_attention", "combine", emit_combine(), "decode_combine_kernel",
                          (t * a["num_heads"], -(-hd // block_d)),
                          scratch + [("node", pos.id), ("node", node.id), ("stride", node.id),
                                     ("value", keys)],
                          dict(HEADS=a["num_heads"], GROUP=group, KV_HEADS=kv_heads, HEAD_DIM=hd,
                               CHUNK=chunk, SPLITS=splits, BLOCK_D=block_d, BLOCK_J=block_j),
                          num_warps=4, num_stages=1)
    # 4 warps (benchmarks/decode_attention_sweep.py on the H200: e4b's full layers at 4096
    # 12.7 us with 4, 14.7 with 8; 31b's 16.6 and over 20)
    warps = 4
    kind = "cache" if rows == 1 else f"chunk-{rows}"
    return KernelSpec("decode_attention", kind + (f"+split-{chunk}" if splits > 1 else ""),
                      emit(target.dot_precision, hd, splits > 1), "decode_attention_kernel",
                      (tiles, kv_heads, splits), args, cx, num_warps=warps, num_stages=2,
                      then=then)
