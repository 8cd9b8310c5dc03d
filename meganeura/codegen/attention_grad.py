"""Attention's gradient, [dq | dk | dv] of causal (or windowed) GQA attention, in two
kernels of one node, recomputing the softmax rather than storing it.

    P = softmax(scale q k^T) (masked), dV = P^T dO, dP = dO V^T, dS = P (dP - delta),
    dQ = scale dS K, dK = scale dS^T Q; delta[i] = sum_j P[i, j] dP[i, j]

1. stats: a program per (query block, head) walks the keys once, keeping the running max,
   the sum of exponentials and the sum of exponentials times dP (online, as a forward
   does): lse and delta of each row and head, into a scratch buffer.
2. grads: programs of two kinds in one grid. A dq program per (query block, head) walks
   the keys again, P from lse; a dk, dv program per (key block, kv head) walks the query
   blocks of each head of its group. Each program owns the rows it writes: no atomics.

Masks give causality and the window; a whole head width is one tile (BLOCK_D, padded to a
power of two). Dots in fp32 (tf32 on a GPU).

bytes: about 4 passes over q, k, v and dO per kv head group; FLOPs 4 x the forward's
"""

from __future__ import annotations

from .common import HEADER, KernelSpec, Target, cdiv, indent, next_pow2


def _dots(body: str, precision: str) -> str:
    """The body's products as tl.dot with the target's precision."""
    for a, b in (("q", "tl.trans(k)"), ("do", "tl.trans(v)"), ("ds", "k"), ("tl.trans(p)", "do"),
                 ("tl.trans(ds)", "q")):
        body = body.replace(f"dot({a}, {b})", f'tl.dot({a}, {b}, input_precision="{precision}")')
    assert " dot(" not in body and "(dot(" not in body
    return body


def _allowed(i: str, j: str, windowed: bool) -> str:
    mask = f"({j}[None, :] <= {i}[:, None]) & ({j}[None, :] < T) & ({i}[:, None] < T)"
    return mask + (f" & ({j}[None, :] > {i}[:, None] - WINDOW)" if windowed else "")


# the key blocks a query block from i0 sees: from 0 (causal), or from its first row's window
KEYS = """
if WINDOW > 0:
    lo = (tl.maximum(i0 - WINDOW + 1, 0) // BLOCK_N) * BLOCK_N
else:
    lo = 0
"""

# rows i of head h (q, dO), their statistics, keys j of kv head kh (k, v)
QUERY_ROWS = """rows = (i[:, None] < T) & dmask
q = tl.load(q_ptr + i[:, None].to(tl.int64) * stride_q + h * HD + dd[None, :], mask=rows, other=0.0).to(tl.float32)
do = tl.load(do_ptr + i[:, None].to(tl.int64) * stride_do + h * HD + dd[None, :], mask=rows, other=0.0).to(tl.float32)
"""
STATS = """at = stats_ptr + (i.to(tl.int64) * HEADS + h) * 2
lse = tl.load(at, mask=i < T, other=0.0)
delta = tl.load(at + 1, mask=i < T, other=0.0)
"""
KEY_ROWS = """cols = (j[:, None] < T) & dmask
k = tl.load(k_ptr + j[:, None].to(tl.int64) * stride_k + kh * HD + dd[None, :], mask=cols, other=0.0).to(tl.float32)
v = tl.load(v_ptr + j[:, None].to(tl.int64) * stride_v + kh * HD + dd[None, :], mask=cols, other=0.0).to(tl.float32)
"""

LOADS = """
dd = tl.arange(0, BLOCK_D)
dmask = dd[None, :] < HD
"""


def emit_stats(precision: str, windowed: bool) -> str:
    body = LOADS + """
i0 = tl.program_id(0) * BLOCK_M
i = i0 + tl.arange(0, BLOCK_M)
h = tl.program_id(1)
kh = h // GROUP
{QUERY_ROWS}
m = tl.full((BLOCK_M,), -1e30, dtype=tl.float32)
l = tl.zeros((BLOCK_M,), dtype=tl.float32)
t = tl.zeros((BLOCK_M,), dtype=tl.float32)
{KEYS}
for j0 in range(lo, tl.minimum(T, i0 + BLOCK_M), BLOCK_N):
    j = j0 + tl.arange(0, BLOCK_N)
{KEY_ROWS}
    ok = ALLOWED
    s = tl.where(ok, dot(q, tl.trans(k)) * SCALE, -1e30)
    dp = dot(do, tl.trans(v))
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
""".replace("{KEYS}", KEYS).replace("{QUERY_ROWS}", QUERY_ROWS) \
        .replace("{KEY_ROWS}", indent(KEY_ROWS, 4)).replace("ALLOWED", _allowed("i", "j", windowed))
    params = ("q_ptr, k_ptr, v_ptr, do_ptr, stats_ptr, stride_q, stride_k, stride_v, stride_do, "
              "T, HD, SCALE, WINDOW: tl.constexpr, HEADS: tl.constexpr, GROUP: tl.constexpr, "
              "BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr")
    return HEADER + f"def attention_stats_kernel({params}):\n" + \
        indent(_dots(body, precision), 4) + "\n"


def emit_grads(precision: str, windowed: bool) -> str:
    body = LOADS + f"""
pid = tl.program_id(0)
if pid < QBLOCKS * HEADS:  # dq of a query block and head
    i0 = (pid // HEADS) * BLOCK_M
    i = i0 + tl.arange(0, BLOCK_M)
    h = pid % HEADS
    kh = h // GROUP
{indent(QUERY_ROWS + STATS, 4)}
    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
{indent(KEYS, 4)}
    for j0 in range(lo, tl.minimum(T, i0 + BLOCK_M), BLOCK_N):
        j = j0 + tl.arange(0, BLOCK_N)
{indent(KEY_ROWS, 8)}
        ok = {_allowed("i", "j", windowed)}
        p = tl.where(ok, tl.exp(dot(q, tl.trans(k)) * SCALE - lse[:, None]), 0.0)
        ds = p * (dot(do, tl.trans(v)) - delta[:, None])
        dq += dot(ds, k)
    tl.store(out_ptr + i[:, None].to(tl.int64) * stride_out + h * HD + dd[None, :],
             (dq * SCALE).to(out_ptr.dtype.element_ty), mask=rows)
else:  # dk, dv of a key block and kv head: every head of its group, every query block
    pid = pid - QBLOCKS * HEADS
    j0 = (pid // KV_HEADS) * BLOCK_N
    j = j0 + tl.arange(0, BLOCK_N)
    kh = pid % KV_HEADS
{indent(KEY_ROWS, 4)}
    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for g in range(GROUP):
        h = kh * GROUP + g
        # the query blocks that see this key block: from its own on (causal), up to its
        # last key + the window
        first = (j0 // BLOCK_M) * BLOCK_M
        if WINDOW > 0:
            last = tl.minimum(T, j0 + BLOCK_N + WINDOW - 1)
        else:
            last = T
        for i0 in range(first, last, BLOCK_M):
            i = i0 + tl.arange(0, BLOCK_M)
{indent(QUERY_ROWS + STATS, 12)}
            ok = {_allowed("i", "j", windowed)}
            p = tl.where(ok, tl.exp(dot(q, tl.trans(k)) * SCALE - lse[:, None]), 0.0)
            dv += dot(tl.trans(p), do)
            ds = p * (dot(do, tl.trans(v)) - delta[:, None])
            dk += dot(tl.trans(ds), q)
    base = out_ptr + j[:, None].to(tl.int64) * stride_out + dd[None, :]
    tl.store(base + HEADS * HD + kh * HD, (dk * SCALE).to(out_ptr.dtype.element_ty), mask=cols)
    tl.store(base + (HEADS + KV_HEADS) * HD + kh * HD, dv.to(out_ptr.dtype.element_ty), mask=cols)
"""
    params = ("q_ptr, k_ptr, v_ptr, do_ptr, stats_ptr, out_ptr, stride_q, stride_k, stride_v, "
              "stride_do, stride_out, T, HD, SCALE, QBLOCKS, WINDOW: tl.constexpr, HEADS: tl.constexpr, "
              "KV_HEADS: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, "
              "BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr")
    return HEADER + f"def attention_grad_kernel({params}):\n" + \
        indent(_dots(body, precision), 4) + "\n"


def build(node, graph, target: Target) -> KernelSpec:
    q, k, v, dy = (graph[i] for i in node.inputs)
    a = node.attrs
    t = q.shape[0]
    heads, kv_heads, hd = a["num_heads"], a["num_kv_heads"], a["head_dim"]
    bd = max(16, next_pow2(hd))
    if target.interpreted:
        bm = bn = 16
    else:
        bm = bn = 64 if bd <= 128 else (32 if bd <= 256 else 16)
    stats = ("scratch", ("attention_stats", (t, heads, 2), "fp32"))
    common = [("node", q.id), ("node", k.id), ("node", v.id), ("node", dy.id), stats]
    strides = [("stride", q.id), ("stride", k.id), ("stride", v.id), ("stride", dy.id)]
    values = [("value", t), ("value", hd), ("value", a["scale"])]
    warps = 4 if target.interpreted or bd <= 128 else 8
    group = heads // kv_heads
    qblocks = cdiv(t, bm)
    grads = KernelSpec("attention_grad", "grads", emit_grads(target.dot_precision, a["window"] > 0),
                       "attention_grad_kernel", (qblocks * heads + cdiv(t, bn) * kv_heads,),
                       common + [("node", node.id)] + strides + [("stride", node.id)] + values
                       + [("value", qblocks)],
                       dict(WINDOW=a["window"], HEADS=heads, KV_HEADS=kv_heads, GROUP=group,
                            BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd), num_warps=warps, num_stages=1)
    return KernelSpec("attention_grad", "stats", emit_stats(target.dot_precision, a["window"] > 0),
                      "attention_stats_kernel", (qblocks, heads), common + strides + values,
                      dict(WINDOW=a["window"], HEADS=heads, GROUP=group, BLOCK_M=bm,
                           BLOCK_N=bn, BLOCK_D=bd), num_warps=warps, num_stages=1, then=grads)
