"""Attention's gradient, [dq | dk | dv] of causal (or windowed) GQA attention, in the kernels
of one node, recomputing the softmax rather than storing it.

    P = softmax(scale q k^T) (masked), dV = P^T dO, dP = dO V^T, dS = P (dP - delta),
    dQ = scale dS K, dK = scale dS^T Q; delta[i] = sum_j P[i, j] dP[i, j]

1. stats: a program per (query block, head) walks the keys once, keeping the running max,
   the sum of exponentials and the sum of exponentials times dP (online, as a forward
   does): lse and delta of each row and head, into a scratch buffer.
2. dq: a program per (query block, head) walks the keys again, P from lse.
3. dk, dv: a program per (key block, query head) walks the query blocks that see its keys,
   with S^T = K Q^T so that both gradients are products of [keys, queries] tiles. A head
   of a group of one writes its kv head's rows; in larger groups each head writes its
   share in fp32 to a scratch buffer and
4. sum: a program per rows of a kv head adds its group's shares, in head order (the same
   bits on every run), into the output.
A group's heads thus run side by side instead of one after another in one program (e2b's
single kv head left a program per key block at 2048 tokens, 64 to 128, each walking 8 heads).

Operands enter the products in the plan's type (bf16 on a GPU; an fp32 input rounded to it),
P and dS rounded to it as a flash backward does (or in two terms, TERMS_BF16); sums in fp32
(tf32 products of an fp32 plan on a GPU; exact on the interpreter). Masks give causality
and the window; a whole head width is one tile (BLOCK_D, padded to a power of two). Tiles
per kernel and head width: GPU_TILES, from benchmarks/attention_grad_sweep.py on an H100
(the best of each kernel's candidates, the others at their defaults).

bytes: q, k, v and dO read per block pair from L2, dq, dk, dv written, 8 bytes a row and
column of each head's share in larger groups; FLOPs 5 x the forward's (stats 2 products a
block pair, dq 3, dk and dv 5 with P in two terms)
"""

from __future__ import annotations

import torch

from ..compiler.plan import holds_fp32
from .common import HEADER, KernelSpec, Target, cdiv, fit_stages, indent, next_pow2

# padded head width -> kernel -> (query rows, key rows, warps, stages) of its tiles
GPU_TILES = {
    64: {"stats": (64, 64, 4, 2), "dq": (64, 64, 4, 2), "dkv": (64, 64, 4, 2)},
    128: {"stats": (64, 64, 4, 2), "dq": (64, 64, 4, 2), "dkv": (64, 64, 4, 2)},
    256: {"stats": (64, 64, 8, 2), "dq": (128, 32, 8, 2), "dkv": (64, 64, 8, 2)},
    512: {"stats": (64, 32, 8, 1), "dq": (64, 32, 8, 1), "dkv": (32, 16, 4, 2)},
}
# P (into dv) and dS (into dq, dk) in how many terms of a narrower operand type than fp32:
# one (rounded once, as a flash backward does), or two (what the first left, rounded
# again: about 16 significant bits). On an H100 (benchmarks/results/HISTORY.md,
# 2026-12-07): P in two terms costs e2b's 256-wide heads 37 % and its 512-wide 18 %, dS in
# two 44 % and 4.7x; with both rounded once, every_feature's bf16 training gradients put
# the first layer's q and k norm weights 1-2 % past the GPU test's bound (0.96-0.99 of it
# with the earlier tf32 kernel, and with P in two terms)
TERMS_BF16 = {"p": 2, "ds": 1}
INTERPRETER_TILES = {"stats": (16, 16, 4, 1), "dq": (16, 16, 4, 1), "dkv": (16, 16, 4, 1)}


def tiles(bd: int, target: Target) -> dict:
    if target.interpreted:
        return INTERPRETER_TILES
    return GPU_TILES[min((w for w in GPU_TILES if w >= bd), default=512)]


def _allowed(i: str, j: str, windowed: bool, transposed: bool = False) -> str:
    """Where query i sees key j: [queries, keys] tiles, or [keys, queries] (transposed)."""
    ii, jj = (f"{i}[None, :]", f"{j}[:, None]") if transposed else (f"{i}[:, None]", f"{j}[None, :]")
    mask = f"({jj} <= {ii}) & ({jj} < T) & ({ii} < T)"
    return mask + (f" & ({jj} > {ii} - WINDOW)" if windowed else "")


# the key blocks a query block from i0 sees: from 0 (causal), or from its first row's window
KEYS = """if WINDOW > 0:
    lo = (tl.maximum(i0 - WINDOW + 1, 0) // BLOCK_N) * BLOCK_N
else:
    lo = 0
"""
HEAD = """dd = tl.arange(0, BLOCK_D)
dmask = dd[None, :] < HD
"""
# rows i of head h (q, dO), their statistics, keys j of kv head kh (k, v)
QUERY_ROWS = """rows = (i[:, None] < T) & dmask
q = tl.load(q_ptr + i[:, None].to(tl.int64) * stride_q + h * HD + dd[None, :], mask=rows, other=0.0).to(OPTYPE)
do = tl.load(do_ptr + i[:, None].to(tl.int64) * stride_do + h * HD + dd[None, :], mask=rows, other=0.0).to(OPTYPE)
"""
STATS = """at = stats_ptr + (i.to(tl.int64) * HEADS + h) * 2
lse = tl.load(at, mask=i < T, other=0.0)
delta = tl.load(at + 1, mask=i < T, other=0.0)
"""
KEY_ROWS = """cols = (j[:, None] < T) & dmask
k = tl.load(k_ptr + j[:, None].to(tl.int64) * stride_k + kh * HD + dd[None, :], mask=cols, other=0.0).to(OPTYPE)
v = tl.load(v_ptr + j[:, None].to(tl.int64) * stride_v + kh * HD + dd[None, :], mask=cols, other=0.0).to(OPTYPE)
"""
OPERANDS = ("q_ptr, k_ptr, v_ptr, do_ptr, stats_ptr", "stride_q, stride_k, stride_v, stride_do",
            "T, HD, SCALE")


def _kernel(name: str, params: list[str], body: str, precision: str, operand: str = "") -> str:
    """precision: of fp32 products; operand: the type q, k, v and dO enter products in."""
    body = body.replace("PREC", f'input_precision="{precision}"').replace("OPTYPE", operand)
    return HEADER + f"def {name}({', '.join(params)}):\n" + indent(body, 4) + "\n"


def emit_stats(precision: str, windowed: bool, operand: str) -> str:
    body = HEAD + f"""i0 = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M  # longest rows first
i = i0 + tl.arange(0, BLOCK_M)
h = tl.program_id(1)
kh = h // GROUP
{QUERY_ROWS}m = tl.full((BLOCK_M,), -1e30, dtype=tl.float32)
l = tl.zeros((BLOCK_M,), dtype=tl.float32)
t = tl.zeros((BLOCK_M,), dtype=tl.float32)
{KEYS}for j0 in range(lo, tl.minimum(T, i0 + BLOCK_M), BLOCK_N):
    j = j0 + tl.arange(0, BLOCK_N)
{indent(KEY_ROWS, 4)}
    ok = {_allowed("i", "j", windowed)}
    s = tl.where(ok, tl.dot(q, tl.trans(k), PREC) * SCALE, -1e30)
    dp = tl.dot(do, tl.trans(v), PREC)
    new = tl.maximum(m, tl.max(s, axis=1))
    alpha = tl.exp(m - new)
    e = tl.where(ok, tl.exp(s - new[:, None]), 0.0)
    l = l * alpha + tl.sum(e, axis=1)
    t = t * alpha + tl.sum(e * dp, axis=1)
    m = new
l = tl.where(l > 0.0, l, 1.0)
at = stats_ptr + (i.to(tl.int64) * HEADS + h) * 2
tl.store(at, m + tl.log(l), mask=i < T)
tl.store(at + 1, t / l, mask=i < T)
"""
    params = [*OPERANDS, "WINDOW: tl.constexpr", "HEADS: tl.constexpr", "GROUP: tl.constexpr",
              "BLOCK_M: tl.constexpr", "BLOCK_N: tl.constexpr", "BLOCK_D: tl.constexpr"]
    return _kernel("attention_stats_kernel", params, body, precision, operand)


def emit_dq(precision: str, windowed: bool, operand: str) -> str:
    body = HEAD + f"""pid = tl.program_id(0)
i0 = (tl.cdiv(T, BLOCK_M) - 1 - pid // HEADS) * BLOCK_M  # longest rows first
i = i0 + tl.arange(0, BLOCK_M)
h = pid % HEADS
kh = h // GROUP
{QUERY_ROWS}{STATS}dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
{KEYS}for j0 in range(lo, tl.minimum(T, i0 + BLOCK_M), BLOCK_N):
    j = j0 + tl.arange(0, BLOCK_N)
{indent(KEY_ROWS, 4)}
    ok = {_allowed("i", "j", windowed)}
    p = tl.where(ok, tl.exp(tl.dot(q, tl.trans(k), PREC) * SCALE - lse[:, None]), 0.0)
    ds = p * (tl.dot(do, tl.trans(v), PREC) - delta[:, None])
    dsh = ds.to(k.dtype)
    dq = tl.dot(dsh, k, dq, PREC)
    if DS_TERMS == 2:  # what rounding dS left, as a second term
        dq = tl.dot((ds - dsh.to(tl.float32)).to(k.dtype), k, dq, PREC)
tl.store(out_ptr + i[:, None].to(tl.int64) * stride_out + h * HD + dd[None, :],
         (dq * SCALE).to(out_ptr.dtype.element_ty), mask=rows)
"""
    params = [*OPERANDS, "out_ptr", "stride_out", "WINDOW: tl.constexpr", "HEADS: tl.constexpr",
              "GROUP: tl.constexpr", "BLOCK_M: tl.constexpr", "BLOCK_N: tl.constexpr",
              "BLOCK_D: tl.constexpr", "DS_TERMS: tl.constexpr"]
    return _kernel("attention_dq_kernel", params, body, precision, operand)


def emit_dkv(precision: str, windowed: bool, shares: bool, operand: str) -> str:
    """shares: the group has several heads; each head's dk, dv go to the fp32 scratch."""
    rows_t = """rows = (i[None, :] < T) & (dd[:, None] < HD)
qt = tl.load(q_ptr + i[None, :].to(tl.int64) * stride_q + h * HD + dd[:, None], mask=rows, other=0.0).to(OPTYPE)
do = tl.load(do_ptr + i[:, None].to(tl.int64) * stride_do + h * HD + dd[None, :], mask=(i[:, None] < T) & dmask, other=0.0).to(OPTYPE)
"""
    stats_t = STATS
    if shares:
        store = """share = ws_ptr + ((h * T + j[:, None]).to(tl.int64)) * HD + dd[None, :]
tl.store(share, dk * SCALE, mask=cols)
tl.store(share + (HEADS * T).to(tl.int64) * HD, dv, mask=cols)  # past 2^31 elements: 31b at 128k
"""
    else:
        store = """base = out_ptr + j[:, None].to(tl.int64) * stride_out + dd[None, :]
tl.store(base + (HEADS + kh) * HD, (dk * SCALE).to(out_ptr.dtype.element_ty), mask=cols)
tl.store(base + (HEADS + KV_HEADS + kh) * HD, dv.to(out_ptr.dtype.element_ty), mask=cols)
"""
    body = HEAD + f"""pid = tl.program_id(0)
j0 = (pid // HEADS) * BLOCK_N  # the first keys see the most queries: they start first
j = j0 + tl.arange(0, BLOCK_N)
h = pid % HEADS
kh = h // GROUP
{KEY_ROWS}dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
# the query blocks that see these keys: from the block of the first on (causal), up to
# the last key + the window
if WINDOW > 0:
    last = tl.minimum(T, j0 + BLOCK_N + WINDOW - 1)
else:
    last = T
for i0 in range((j0 // BLOCK_M) * BLOCK_M, last, BLOCK_M):
    i = i0 + tl.arange(0, BLOCK_M)
{indent(rows_t + stats_t, 4)}
    ok = {_allowed("i", "j", windowed, transposed=True)}
    pt = tl.where(ok, tl.exp(tl.dot(k, qt, PREC) * SCALE - lse[None, :]), 0.0)
    pth = pt.to(do.dtype)
    dv = tl.dot(pth, do, dv, PREC)
    if P_TERMS == 2:  # what rounding P left, as a second term
        dv = tl.dot((pt - pth.to(tl.float32)).to(do.dtype), do, dv, PREC)
    dst = pt * (tl.dot(v, tl.trans(do), PREC) - delta[None, :])
    dsh = dst.to(qt.dtype)
    dk = tl.dot(dsh, tl.trans(qt), dk, PREC)
    if DS_TERMS == 2:
        dk = tl.dot((dst - dsh.to(tl.float32)).to(qt.dtype), tl.trans(qt), dk, PREC)
{store}"""
    params = [*OPERANDS, "out_ptr"] + (["ws_ptr"] if shares else []) + ["stride_out",
              "WINDOW: tl.constexpr",
              "HEADS: tl.constexpr", "KV_HEADS: tl.constexpr", "GROUP: tl.constexpr",
              "BLOCK_M: tl.constexpr", "BLOCK_N: tl.constexpr", "BLOCK_D: tl.constexpr",
              "DS_TERMS: tl.constexpr", "P_TERMS: tl.constexpr"]
    return _kernel("attention_dkv_kernel", params, body, precision, operand)


def emit_sum() -> str:
    body = """r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
w = tl.program_id(1)  # 0: dk, 1: dv, of kv head kh
kh = tl.program_id(2)
dd = tl.arange(0, BLOCK_D)
m = (r[:, None] < T) & (dd[None, :] < HD)
acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
for g in range(GROUP):
    share = ws_ptr + (((w * HEADS + kh * GROUP + g) * T + r[:, None]).to(tl.int64)) * HD
    acc += tl.load(share + dd[None, :], mask=m, other=0.0)
col = (HEADS + w * KV_HEADS + kh) * HD
tl.store(out_ptr + r[:, None].to(tl.int64) * stride_out + col + dd[None, :],
         acc.to(out_ptr.dtype.element_ty), mask=m)
"""
    params = ["ws_ptr", "out_ptr", "stride_out", "T", "HD", "HEADS: tl.constexpr",
              "KV_HEADS: tl.constexpr", "GROUP: tl.constexpr", "BLOCK_R: tl.constexpr",
              "BLOCK_D: tl.constexpr"]
    return _kernel("attention_share_sum_kernel", params, body, "ieee")


def build(node, graph, target: Target) -> KernelSpec:
    q, k, v, dy = (graph[i] for i in node.inputs)
    a = node.attrs
    t = q.shape[0]
    heads, kv_heads, hd = a["num_heads"], a["num_kv_heads"], a["head_dim"]
    group = heads // kv_heads
    bd = max(16, next_pow2(hd))
    cfg = tiles(bd, target)
    windowed = a["window"] > 0
    prec = target.dot_precision
    narrow = target.dtype != torch.float32
    # the plan's type (an fp32 input, as LoRA's held sums give dO, is rounded to it)
    op = {torch.bfloat16: "tl.bfloat16", torch.float16: "tl.float16"}.get(target.dtype, "tl.float32")
    ds_terms, p_terms = (TERMS_BF16["ds"], TERMS_BF16["p"]) if narrow else (1, 1)
    stats = ("scratch", ("attention_stats", (t, heads, 2), "fp32"))
    common = [("node", q.id), ("node", k.id), ("node", v.id), ("node", dy.id), stats,
              ("stride", q.id), ("stride", k.id), ("stride", v.id), ("stride", dy.id),
              ("value", t), ("value", hd), ("value", a["scale"])]
    shape = dict(WINDOW=a["window"], HEADS=heads, GROUP=group, BLOCK_D=bd)

    held = 4 if target.dtype == torch.float32 else 2  # a tile converted once, held

    def size(n) -> int:  # bytes an element of an operand takes where it is stored
        return 4 if held == 4 or holds_fp32(graph, n.id) else 2

    def spec(kind, source, entry, grid, args, **cx):
        bm, bn, warps, want = cfg[kind]
        # the stage buffers hold the loop's tiles (queries and dO, or keys and values) as
        # stored: an fp32 input, as a LoRA plan's dO, takes twice the room
        if kind == "dkv":
            stages = fit_stages(bm * bd * (size(q) + size(dy)), bn * bd * 2 * held, want)
        else:
            stages = fit_stages(bn * bd * (size(k) + size(v)), bm * bd * 2 * held, want)
        return KernelSpec("attention_grad", kind, source, entry, grid, args,
                          dict(shape, BLOCK_M=bm, BLOCK_N=bn, **cx), num_warps=warps,
                          num_stages=stages)

    out = [("node", node.id)]
    shares = group > 1
    ws = ("scratch", ("attention_grad_shares", (2, heads, t, hd), "fp32"))
    dkv = spec("dkv", emit_dkv(prec, windowed, shares, op), "attention_dkv_kernel",
               (cdiv(t, cfg["dkv"][1]) * heads,),
               common + out + ([ws] if shares else []) + [("stride", node.id)], KV_HEADS=kv_heads,
               DS_TERMS=ds_terms, P_TERMS=p_terms)
    if shares:
        br = max(8, 4096 // bd)
        dkv.then = KernelSpec("attention_grad", "share-sum", emit_sum(),
                              "attention_share_sum_kernel", (cdiv(t, br), 2, kv_heads),
                              [ws] + out + [("stride", node.id), ("value", t), ("value", hd)],
                              dict(HEADS=heads, KV_HEADS=kv_heads, GROUP=group, BLOCK_R=br,
                                   BLOCK_D=bd), num_warps=4, num_stages=1)
    dq = spec("dq", emit_dq(prec, windowed, op), "attention_dq_kernel",
              (cdiv(t, cfg["dq"][0]) * heads,), common + out + [("stride", node.id)],
              DS_TERMS=ds_terms)
    dq.then = dkv
    first = spec("stats", emit_stats(prec, windowed, op), "attention_stats_kernel",
                 (cdiv(t, cfg["stats"][0]), heads), common)
    first.then = dq
    return first
