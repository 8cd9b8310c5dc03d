"""Mixture-of-experts kernels: the router's top-k, and products whose weight each row picks.

A route is [tokens, 2 k] fp32 (compiler/formulas.py): each token's k expert weights, then
the k expert indices. A (token, slot) pair is a row of the expert products, token-major.

moe_route: a program per few rows; the softmax over all experts in fp32, then k rounds of
  "take the largest, the lower index on a tie", renormalized and scaled per expert.

expert products, two paths chosen by the token count:
- one token (a decode step): a program per (pair, column tile) streams that pair's expert
  rows against the token's row, as the one-row product does: only the k chosen experts'
  weights are read. expert_matmul_combine runs a program per (token, column tile) that
  walks the token's k experts and sums their products with the route weights, so the
  pairs' rows are never stored.
- several tokens: a counting sort in two launches (a program per chunk of pairs counts
  them by expert, then places them) orders the pairs by expert (stable: by pair within an
  expert; no capacity, no pair dropped) into a scratch list, with each expert's
  first sorted row and first tile; then one grouped tiled product over every expert's
  tiles: a program finds its expert from the tile starts, gathers its pairs' rows, streams
  that expert's weight tiles through the matrix units and writes each result row at its
  pair. expert_glu runs gate and up tiles side by side and writes act(gate) * up.
expert_combine: a program per (token block, column block) sums the token's k rows.
"""

from __future__ import annotations

from ..compiler.ops import OPS
from .common import HEADER, KernelSpec, Target, activation, cdiv, indent, next_pow2
from .matvec import k_slices


def _route_source() -> str:
    return HEADER + "def moe_route_kernel(z_ptr, scale_ptr, out_ptr, S, E, stride_z, stride_out, " \
        "K: tl.constexpr, KP: tl.constexpr, ROWS: tl.constexpr, BLOCK_E: tl.constexpr):\n" + \
        indent("""
r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
e = tl.arange(0, BLOCK_E)
real = e[None, :] < E
z = tl.load(z_ptr + r[:, None].to(tl.int64) * stride_z + e[None, :],
            mask=(r[:, None] < S) & real, other=0.0).to(tl.float32)
z = tl.where(real, z, float("-inf"))
p = tl.exp(z - tl.max(z, 1)[:, None])
p = p / tl.sum(p, 1)[:, None]
p = tl.where(real, p, -1.0)  # padding is never chosen
slot = tl.arange(0, KP)[None, :]
wts = tl.zeros([ROWS, KP], dtype=tl.float32)
idx = tl.zeros([ROWS, KP], dtype=tl.int32)
for j in tl.static_range(K):
    best = tl.max(p, 1)
    pick = tl.min(tl.where(p == best[:, None], e[None, :], BLOCK_E), 1)  # the lower on a tie
    pick = tl.minimum(pick, E - 1)  # a NaN logit: no index past the experts (NaN weights)
    wts = tl.where(slot == j, best[:, None], wts)
    idx = tl.where(slot == j, pick[:, None], idx)
    p = tl.where(e[None, :] == pick[:, None], -2.0, p)
total = tl.sum(tl.where(slot < K, wts, 0.0), 1)
scale = tl.load(scale_ptr + idx, mask=slot < K, other=0.0).to(tl.float32)
wts = wts / total[:, None] * scale
keep = (r[:, None] < S) & (slot < K)
at = out_ptr + r[:, None].to(tl.int64) * stride_out + slot
tl.store(at, wts, mask=keep)
tl.store(at + K, idx.to(tl.float32), mask=keep)
""", 4) + "\n"


def _route(node, graph, target: Target) -> KernelSpec:
    z, scale = (graph[i] for i in node.inputs)
    s, e = z.shape
    k = node.attrs["top_k"]
    block_e = max(16, next_pow2(e))
    rows = min(16, next_pow2(s)) if target.interpreted else max(1, min(16, 2048 // block_e))
    args = [("node", z.id), ("node", scale.id), ("node", node.id), ("value", s), ("value", e),
            ("stride", z.id), ("stride", node.id)]
    return KernelSpec("moe_route", f"top{k}", _route_source(), "moe_route_kernel",
                      (cdiv(s, rows),), args,
                      dict(K=k, KP=max(2, next_pow2(k)), ROWS=rows, BLOCK_E=block_e),
                      num_warps=4, num_stages=1)


# ---- one token: a program per (pair, column tile) -----------------------------------------

# A routed kernel (expert_*_routed) computes its token's route itself, from the router's
# logits row (a few hundred values) and the per-expert scale, with the values
# moe_route_kernel computes: the probabilities p, then each expert's rank (how many experts
# come first: a larger p, or the same p and a lower index) in one [E, E] comparison rather
# than k rounds of reductions, for the weight loads wait on it; expert j is the one of rank
# j. _ROUTE_WEIGHTS then makes wts / idx [KP], the k weights and experts. Else the kernel
# reads them from the route.
_ROUTE_RANKS = """
ex = tl.arange(0, BLOCK_E)
z = tl.load(z_ptr + tok * stride_z + ex, mask=ex < E, other=0.0).to(tl.float32)
z = tl.where(ex < E, z, float("-inf"))
p = tl.exp(z - tl.max(z, 0))
p = p / tl.sum(p, 0)
p = tl.where(ex < E, p, -1.0)
first = (p[None, :] > p[:, None]) | ((p[None, :] == p[:, None]) & (ex[None, :] < ex[:, None]))
rank = tl.sum(first.to(tl.int32), 1)
"""
_ROUTE_WEIGHTS = """
slot = tl.arange(0, KP)
hit = rank[None, :] == slot[:, None]
idx = tl.minimum(tl.sum(tl.where(hit, ex[None, :], 0), 1), E - 1)  # (NaN: ranks are not)
wts = tl.sum(tl.where(hit, p[None, :], 0.0), 1)
total = tl.sum(tl.where(slot < TOPK, wts, 0.0), 0)
wts = wts / total * tl.load(scale_ptr + idx, mask=slot < TOPK, other=0.0).to(tl.float32)
"""
_ROUTE_OF_TOKEN = _ROUTE_RANKS + _ROUTE_WEIGHTS
_ROUTE_ARGS = "z_ptr, scale_ptr, E, stride_z, "
_ROUTE_CONSTS = "KP: tl.constexpr, BLOCK_E: tl.constexpr, "


def _last_of_split(row0: str, slices: str, width: str, counter: str, sums: list[str],
                   finish: list[str]) -> list[str]:
    """Source lines that end a program whose partial sums share one result: after it stored
    them in its workspace row, it counts itself in `counter` (release / acquire); the last
    of `slices` to count reads their rows (row0 + j, `width` values apart) at once from L2,
    sums each name of `sums` (at that offset in the row) in row order, so the bits are the
    same whatever order programs finish in, runs `finish` and zeroes the counter for the
    next launch."""
    lines = ["tl.debug_barrier()  # every thread's partials before the count",
             f"cnt = {counter}",
             'done = tl.atomic_add(cnt, 1, sem="acq_rel")',
             f"if done == {slices} - 1:",
             "    js = tl.arange(0, BLOCK_S)",
             f"    rows = ws_ptr + ({row0} + js)[:, None] * {width} + n[None, :]",
             f"    rmask = (js[:, None] < {slices}) & (n[None, :] < NOUT)"]
    lines += [f"    {name} = tl.sum(tl.load(rows + {off}, mask=rmask, other=0.0, "
              f'cache_modifier=".cg"), 0)' for name, off in sums]
    return lines + ["    " + x for x in finish + ["tl.store(cnt, 0)"]]


def _row_source(glu: str | None, routed: bool, norm: bool, split: bool = False) -> str:
    """y[pair, n] = x[row] . w[e, n, :] (with glu: act(gate) * up of columns n and NOUT + n;
    with norm: of x's row RMS-normalized with weight nw, its sum of squares taken in the same
    pass and applied at the end, the product being linear in the row). As the one-row
    product does (codegen/matvec.py): products summed element-wise into [BN, BK]
    accumulators and reduced once at the end, each weight tile asked one K step ahead.
    split: grid axis 2 shares K among SPLIT programs (K_SPLIT rows each); each stores its
    partial sums in its own workspace row ([pairs, SPLIT, 2 NOUT] fp32) and counts itself in
    the (pair, column tile)'s counter; the last to count reads the SPLIT rows at once, sums
    them in one fixed order, takes the row's sum of squares (x from L2), finishes the tile
    and leaves the counter zeroed for the next launch."""
    def tile(off: str, k: str) -> str:
        return (f"tl.load(wp + ({off} + n[:, None]).to(tl.int64) * stride_wn + {k}[None, :], "
                f"mask=(n[:, None] < NOUT) & ({k}[None, :] < k_hi), other=0.0)")
    first = [f"g_next = {tile('0', '(k_lo + rk)')}"] + \
        ([f"u_next = {tile('NOUT', '(k_lo + rk)')}"] if glu else [])
    loop = ["kk = k0 + rk", "g = g_next", f"g_next = {tile('0', '(kk + BK)')}"]
    loop += ["u = u_next", f"u_next = {tile('NOUT', '(kk + BK)')}"] if glu else []
    loop += ["xv = tl.load(x_ptr + xrow * stride_x + kk, mask=kk < k_hi, other=0.0)"
             ".to(tl.float32)"]
    if norm:
        loop += [] if split else ["ss += xv * xv"]
        loop += ["xv = xv * tl.load(nw_ptr + kk, mask=kk < k_hi, other=0.0).to(tl.float32)"]
    loop += ["acc += g.to(tl.float32) * xv[None, :]"]
    loop += ["acc_u += u.to(tl.float32) * xv[None, :]"] if glu else []
    sums = ["out = tl.sum(acc, 1)"] + (["up = tl.sum(acc_u, 1)"] if glu else [])
    tail = []
    if norm:
        if split:  # the whole row's sum of squares, read back from L2
            tail += ["for k0 in range(0, KDIM, BK):",
                     "    xv = tl.load(x_ptr + xrow * stride_x + k0 + rk, mask=k0 + rk < KDIM, "
                     "other=0.0).to(tl.float32)",
                     "    ss += xv * xv"]
        tail += ["rstd = 1.0 / tl.sqrt(tl.sum(ss, 0) / KDIM + eps)", "out = out * rstd"]
        tail += ["up = up * rstd"] if glu else []
    tail += [f"out = {activation(glu, 'out')} * up"] if glu else []
    tail += ["tl.store(out_ptr + pair.to(tl.int64) * stride_out + n, "
             "out.to(out_ptr.dtype.element_ty), mask=n < NOUT)"]
    if split:
        width = "2 * NOUT" if glu else "NOUT"
        sums += [f"part = ws_ptr + (pair.to(tl.int64) * SPLIT + tl.program_id(2)) * {width} + n",
                 "tl.store(part, out, mask=n < NOUT)"]
        sums += ["tl.store(part + NOUT, up, mask=n < NOUT)"] if glu else []
        tail = _last_of_split("pair.to(tl.int64) * SPLIT", "SPLIT", width,
                              "cnt_ptr + pair * tl.num_programs(1) + tl.program_id(1)",
                              [("out", "0")] + ([("up", "NOUT")] if glu else []), tail)
    if routed:
        expert = _ROUTE_RANKS + ("e = tl.minimum(tl.sum(tl.where(rank == pair % TOPK, ex, 0), 0), "
                                 "E - 1).to(tl.int64)")
    else:
        expert = ("e = tl.load(route_ptr + tok * stride_route + TOPK + pair % TOPK)"
                  ".to(tl.int64)")
    params = ("x_ptr, nw_ptr, eps, " if norm else "x_ptr, ") + \
        (_ROUTE_ARGS if routed else "route_ptr, stride_route, ") + \
        "w_ptr, out_ptr, " + ("ws_ptr, cnt_ptr, K_SPLIT, SPLIT, " if split else "") + \
        "NOUT, KDIM, stride_x, stride_we, stride_wn, stride_out, " + \
        (_ROUTE_CONSTS if routed else "") + \
        "TOPK: tl.constexpr, PER_TOKEN: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr" + \
        (", BLOCK_S: tl.constexpr" if split else "")
    k_range = (["k_lo = tl.program_id(2) * K_SPLIT", "k_hi = tl.minimum(k_lo + K_SPLIT, KDIM)"]
               if split else ["k_lo = 0", "k_hi = KDIM"])
    return HEADER + f"def expert_row_kernel({params}):\n" + indent(f"""
pair = tl.program_id(0)
tok = (pair // TOPK).to(tl.int64)
{expert}
xrow = tok if PER_TOKEN else pair.to(tl.int64)
n = tl.program_id(1) * BN + tl.arange(0, BN)
rk = tl.arange(0, BK)
{chr(10).join(k_range)}
wp = w_ptr + e * stride_we
acc = tl.zeros([BN, BK], dtype=tl.float32)
acc_u = tl.zeros([BN, BK], dtype=tl.float32)
ss = tl.zeros([BK], dtype=tl.float32)
{chr(10).join(first)}
for k0 in range(k_lo, k_hi, BK):
{indent(chr(10).join(loop), 4)}
{chr(10).join(sums)}
{chr(10).join(tail)}
""", 4) + "\n"


def _combine_row_source(routed: bool) -> str:
    """y[t, n] = sum_j w_tj * (a[t k + j] . w[e_tj, n, :]) (a[t] with PER_TOKEN), fp32
    throughout: one loop over the k experts' K steps (KSTEPS each), the route weight folded
    into the row's values, one [BN, BK] accumulator, each tile asked one step ahead."""
    def pick(j: str, weight: bool) -> list[str]:
        if routed:
            return ([f"wt = tl.sum(tl.where(slot == {j}, wts, 0.0), 0)"] if weight else []) + \
                [f"e = tl.sum(tl.where(slot == {j}, idx, 0), 0).to(tl.int64)"]
        return ([f"wt = tl.load(route_ptr + tok * stride_route + {j})"] if weight else []) + \
            [f"e = tl.load(route_ptr + tok * stride_route + TOPK + {j}).to(tl.int64)"]

    def tile(k: str) -> str:
        return (f"tl.load(w_ptr + e * stride_we + n[:, None].to(tl.int64) * stride_wn + "
                f"{k}[None, :], mask=(n[:, None] < NOUT) & ({k}[None, :] < KDIM), other=0.0)")
    params = "a_ptr, " + (_ROUTE_ARGS if routed else "route_ptr, stride_route, ") + \
        "w_ptr, out_ptr, NOUT, KDIM, stride_a, stride_we, stride_wn, stride_out, " + \
        (_ROUTE_CONSTS if routed else "") + \
        "TOPK: tl.constexpr, PER_TOKEN: tl.constexpr, KSTEPS: tl.constexpr, " \
        "BN: tl.constexpr, BK: tl.constexpr"
    loop = (["j = step // KSTEPS", "kk = (step % KSTEPS) * BK + rk"] + pick("j", True) +
            ["w = w_next",
             "nxt = tl.minimum(step + 1, TOPK * KSTEPS - 1)  # the last step asks itself again",
             "kn = (nxt % KSTEPS) * BK + rk"] + pick("nxt // KSTEPS", False) +
            [f"w_next = {tile('kn')}",
             "arow = tok if PER_TOKEN else tok * TOPK + j",
             "av = tl.load(a_ptr + arow * stride_a + kk, mask=kk < KDIM, other=0.0)"
             ".to(tl.float32)",
             "acc += w.to(tl.float32) * (av * wt)[None, :]"])
    return HEADER + f"def expert_combine_row_kernel({params}):\n" + indent(f"""
tok = tl.program_id(0).to(tl.int64)
{_ROUTE_OF_TOKEN if routed else ""}
n = tl.program_id(1) * BN + tl.arange(0, BN)
rk = tl.arange(0, BK)
acc = tl.zeros([BN, BK], dtype=tl.float32)
{chr(10).join(pick("0", False))}
w_next = {tile("rk")}
for step in range(0, TOPK * KSTEPS):
{indent(chr(10).join(loop), 4)}
out = tl.sum(acc, 1)
tl.store(out_ptr + tok * stride_out + n, out.to(out_ptr.dtype.element_ty), mask=n < NOUT)
""", 4) + "\n"


def _combine_split_source(routed: bool) -> str:
    """The same sum with the k experts spread over grid axis 2: each program streams one
    expert's rows for its columns (all of them in flight at once, rather than k K loops
    in turn), stores its weighted product in the token's workspace row j and counts itself
    in the column tile's counter; the last of the k to count reads the k rows at once, sums
    them in slot order (the same bits every run, whatever order programs finish), stores
    the tile and leaves the counter zeroed for the next launch."""
    def tile(k: str) -> str:
        return (f"tl.load(wp + n[:, None].to(tl.int64) * stride_wn + {k}[None, :], "
                f"mask=(n[:, None] < NOUT) & ({k}[None, :] < KDIM), other=0.0)")
    if routed:
        pick = _ROUTE_OF_TOKEN + """
wt = tl.sum(tl.where(slot == j, wts, 0.0), 0)
e = tl.sum(tl.where(slot == j, idx, 0), 0).to(tl.int64)"""
    else:
        pick = """
wt = tl.load(route_ptr + tok * stride_route + j)
e = tl.load(route_ptr + tok * stride_route + TOPK + j).to(tl.int64)"""
    params = "a_ptr, " + (_ROUTE_ARGS if routed else "route_ptr, stride_route, ") + \
        "w_ptr, out_ptr, ws_ptr, cnt_ptr, NOUT, KDIM, stride_a, stride_we, stride_wn, " \
        "stride_out, " + (_ROUTE_CONSTS if routed else "") + \
        "TOPK: tl.constexpr, PER_TOKEN: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, " \
        "BLOCK_S: tl.constexpr"
    last = _last_of_split("tok * TOPK", "TOPK", "NOUT",
                          "cnt_ptr + tok * tl.num_programs(1) + pid_n", [("out", "0")],
                          ["tl.store(out_ptr + tok * stride_out + n, "
                           "out.to(out_ptr.dtype.element_ty), mask=n < NOUT)"])
    return HEADER + f"def expert_combine_split_kernel({params}):\n" + indent(f"""
tok = tl.program_id(0).to(tl.int64)
j = tl.program_id(2)
{pick}
pid_n = tl.program_id(1)
n = pid_n * BN + tl.arange(0, BN)
rk = tl.arange(0, BK)
wp = w_ptr + e * stride_we
arow = tok if PER_TOKEN else tok * TOPK + j
acc = tl.zeros([BN, BK], dtype=tl.float32)
w_next = {tile("rk")}
for k0 in range(0, KDIM, BK):
    kk = k0 + rk
    w = w_next
    w_next = {tile("(kk + BK)")}
    av = tl.load(a_ptr + arow * stride_a + kk, mask=kk < KDIM, other=0.0).to(tl.float32)
    acc += w.to(tl.float32) * av[None, :]
out = tl.sum(acc, 1) * wt
tl.store(ws_ptr + (tok * TOPK + j) * NOUT + n, out, mask=n < NOUT)
{chr(10).join(last)}
""", 4) + "\n"


# ---- several tokens: sort the pairs by expert, one grouped product -------------------------

def _pair_experts() -> str:
    """Source lines loading the experts e [CHUNK] of chunk c's pairs (-1 past the last)."""
    return """
p = c * CHUNK + tl.arange(0, CHUNK)
e = tl.load(route_ptr + (p // TOPK).to(tl.int64) * stride_route + TOPK + p % TOPK,
            mask=p < P, other=-1.0).to(tl.int32)
hot = (e[:, None] == ex[None, :]).to(tl.int32)
"""


def _count_source() -> str:
    """The first pass of the counting sort: hist[c, e] counts chunk c's pairs of expert e."""
    return HEADER + "def expert_count_kernel(route_ptr, hist_ptr, P, stride_route, " \
        "TOPK: tl.constexpr, BLOCK_E: tl.constexpr, CHUNK: tl.constexpr):\n" + indent("""
c = tl.program_id(0)
ex = tl.arange(0, BLOCK_E)""" + _pair_experts() + """
tl.store(hist_ptr + c * BLOCK_E + ex, tl.sum(hot, 0))
""", 4) + "\n"


def _place_source() -> str:
    """The second pass: a program per chunk sums the chunks' counts (all of them per expert,
    the earlier chunks' apart) and writes each of its pairs at its expert's first sorted row
    plus the expert's pairs in earlier chunks plus those earlier in its chunk; stable, so
    the same bits on every run. order[i] is the i-th pair in expert order. The first
    program also writes info: each expert's first tile, pair count and first sorted row
    ([3, BLOCK_E] int32)."""
    return HEADER + "def expert_place_kernel(route_ptr, hist_ptr, order_ptr, info_ptr, P, " \
        "CHUNKS, stride_route, TOPK: tl.constexpr, BLOCK_E: tl.constexpr, " \
        "CHUNK: tl.constexpr, RB: tl.constexpr, BM: tl.constexpr):\n" + indent("""
c = tl.program_id(0)
ex = tl.arange(0, BLOCK_E)
total = tl.zeros([BLOCK_E], dtype=tl.int32)
earlier = tl.zeros([BLOCK_E], dtype=tl.int32)
for r0 in range(0, CHUNKS, RB):
    r = r0 + tl.arange(0, RB)
    h = tl.load(hist_ptr + r[:, None] * BLOCK_E + ex[None, :], mask=r[:, None] < CHUNKS,
                other=0)
    total += tl.sum(h, 0)
    earlier += tl.sum(tl.where(r[:, None] < c, h, 0), 0)
first_row = tl.cumsum(total, 0) - total
tiles = (total + BM - 1) // BM
head = c * BLOCK_E + ex < BLOCK_E  # the first program
tl.store(info_ptr + ex, tl.cumsum(tiles, 0) - tiles, mask=head)
tl.store(info_ptr + BLOCK_E + ex, total, mask=head)
tl.store(info_ptr + 2 * BLOCK_E + ex, first_row, mask=head)""" + _pair_experts() + """
before = tl.cumsum(hot, 0) - hot  # pairs of the same expert earlier in the chunk
at = tl.sum(hot * ((first_row + earlier)[None, :] + before), 1)
tl.store(order_ptr + at, p, mask=p < P)
""", 4) + "\n"


def sort_chunk(block_e: int, interpreted: bool) -> int:
    """Pairs a program of the sort counts and places: a [CHUNK, BLOCK_E] one-hot each."""
    return 16 if interpreted else max(16, min(128, 16384 // block_e))


def _grouped_source(glu: str | None, tma: bool) -> str:
    """tma: the expert's weight tiles come through a [experts, rows, K] tensor descriptor
    (Hopper's bulk copies; rows past the weight's read as zeros, a gate tile's columns past
    NOUT read up's rows: masked at the store); else through pointers."""
    def dot(name: str, off: str) -> str:
        if tma:
            return (f"b = w_desc.load([e_w, {off} + n0, k0]).reshape(BN, BK)\n"
                    f"{name} = tl.dot(a, tl.trans(b), {name}, input_precision=PRECISION)")
        return (f"b = tl.load(wp + ({off} + n[None, :]).to(tl.int64) * stride_wn + kk[:, None], "
                f"mask=(n[None, :] < NOUT) & (kk[:, None] < KDIM), other=0.0)\n"
                f"{name} = tl.dot(a, b, {name}, input_precision=PRECISION)")
    loop = dot("acc", "0") + ("\n" + dot("acc_u", "NOUT") if glu else "")
    out = f"acc = {activation(glu, 'acc')} * acc_u" if glu else ""
    weights = "w_desc" if tma else "w_ptr"
    strides = "" if tma else "stride_we, stride_wn, "
    elem = "w_desc.dtype" if tma else "w_ptr.dtype.element_ty"
    at = "e_w = tl.maximum(e, 0)" if tma else \
        "wp = w_ptr + tl.maximum(e, 0).to(tl.int64) * stride_we"
    return HEADER + f"def expert_grouped_kernel(x_ptr, order_ptr, info_ptr, {weights}, " \
        f"out_ptr, E, NOUT, KDIM, stride_x, {strides}stride_out, TOPK: tl.constexpr, " \
        "PER_TOKEN: tl.constexpr, BLOCK_E: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, " \
        "BK: tl.constexpr, PRECISION: tl.constexpr):\n" + indent(f"""
t = tl.program_id(0)
ex = tl.arange(0, BLOCK_E)
first_tile = tl.load(info_ptr + ex)
counts = tl.load(info_ptr + BLOCK_E + ex)
e = tl.max(tl.where((first_tile <= t) & (counts > 0) & (ex < E), ex, -1), 0)
mine = ex == e
local = t - tl.sum(tl.where(mine, first_tile, 0), 0)
count = tl.sum(tl.where(mine, counts, 0), 0)
first = tl.sum(tl.where(mine, tl.load(info_ptr + 2 * BLOCK_E + ex), 0), 0)
i = local * BM + tl.arange(0, BM)
live = i < count  # no expert (e = -1): count 0
pair = tl.load(order_ptr + first + i, mask=live, other=0)
xrow = (pair // TOPK if PER_TOKEN else pair).to(tl.int64)
n0 = tl.program_id(1) * BN
n = n0 + tl.arange(0, BN)
{at}
acc = tl.zeros([BM, BN], dtype=tl.float32)
acc_u = tl.zeros([BM, BN], dtype=tl.float32)
k_end = tl.where(tl.max(live.to(tl.int32), 0) > 0, KDIM, 0)  # tiles past the last: no work
for k0 in range(0, k_end, BK):
    kk = k0 + tl.arange(0, BK)
    a = tl.load(x_ptr + xrow[:, None] * stride_x + kk[None, :],
                mask=live[:, None] & (kk[None, :] < KDIM), other=0.0).to({elem})
{indent(loop, 4)}
{out}
tl.store(out_ptr + pair[:, None].to(tl.int64) * stride_out + n[None, :],
         acc.to(out_ptr.dtype.element_ty), mask=live[:, None] & (n[None, :] < NOUT))
""", 4) + "\n"


def _combine_source() -> str:
    return HEADER + "def expert_combine_kernel(y_ptr, route_ptr, out_ptr, S, N, stride_y, " \
        "stride_route, stride_out, TOPK: tl.constexpr, ROWS: tl.constexpr, " \
        "BLOCK: tl.constexpr):\n" + indent("""
r = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)
c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
m = (r[:, None] < S) & (c[None, :] < N)
acc = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
for j in tl.static_range(TOPK):
    wt = tl.load(route_ptr + r * stride_route + j, mask=r < S, other=0.0)
    y = tl.load(y_ptr + (r * TOPK + j)[:, None] * stride_y + c[None, :], mask=m, other=0.0)
    acc += wt[:, None] * y.to(tl.float32)
tl.store(out_ptr + r[:, None] * stride_out + c[None, :], acc.to(out_ptr.dtype.element_ty),
         mask=m)
""", 4) + "\n"


def row_tile(nout: int, pairs: int, sms: int, interpreted: bool) -> int:
    """Output columns of a one-token program: at most 32, at least 8, fewer while the
    programs would not fill the SMs twice. Measured on an H100 (benchmarks/moe_sweep.py,
    26B-A4B's shapes, results/moe-2026-12-07-h100-66178c6-moe_sweep.log): the gate | up
    kernel's 8 pairs took 32.3 us at 16 columns against 37.2 at 8 and 39.1 at 32; the
    weighted sum's one token 18.2 us at 8 columns, 19.6 at 16 (both at BK 256, 4 warps)."""
    if interpreted:
        return min(32, next_pow2(nout))
    bn = 32
    while bn > 8 and pairs * cdiv(nout, bn) < 2 * sms:
        bn //= 2
    return bn


def grouped_tiles(pairs: int, experts: int, glu: bool, interpreted: bool
                  ) -> tuple[int, int, int, int]:
    """(BM, BN, BK, warps) of the grouped product: short tiles when few pairs share an
    expert. Measured on an H100 (benchmarks/moe_sweep.py, 26B-A4B's shapes at 2048 tokens:
    128 pairs an expert on average, results/moe-2026-12-07-h100-4408c4b-moe_sweep.log):
    gate | up 451.6 us at 128 x 64 tiles, 8 warps, against 493.7 at 64 x 64, 4 warps;
    down 333.7 us at 128 x 256, 8 warps, against 389.9 at 64 x 128, 4 warps."""
    if interpreted:
        return 16, 32, 32, 4
    if pairs >= 96 * experts:
        return (128, 64, 64, 8) if glu else (128, 256, 64, 8)
    bm = 16 if pairs <= 256 else 32 if pairs <= 2048 else 64
    return bm, 64 if glu else 128, 64, 4


def _experts(node, graph, target: Target) -> KernelSpec:
    op = node.op
    ins = [graph[i] for i in node.inputs]
    if op == "expert_combine":
        y, route = ins
        s, n = node.shape
        rows = min(16, next_pow2(s)) if target.interpreted else 4
        block = min(next_pow2(n), 128 if target.interpreted else 1024)
        args = [("node", y.id), ("node", route.id), ("node", node.id), ("value", s),
                ("value", n), ("stride", y.id), ("stride", route.id), ("stride", node.id)]
        return KernelSpec("experts", "combine", _combine_source(), "expert_combine_kernel",
                          (cdiv(s, rows), cdiv(n, block)), args,
                          dict(TOPK=route.shape[1] // 2, ROWS=rows, BLOCK=block), num_warps=4,
                          num_stages=1)
    routed = op.endswith("_routed")
    norm = op == "expert_glu_routed"
    x, w = ins[0], ins[-1]
    if routed:
        z, scale = (ins[2], ins[3]) if norm else (ins[1], ins[2])
        tokens, k, experts = z.shape[0], node.attrs["top_k"], z.shape[1]
        block_e = max(16, next_pow2(experts))
        route_args = [("node", z.id), ("node", scale.id), ("value", experts), ("stride", z.id)]
        route_consts = dict(KP=max(2, next_pow2(k)), BLOCK_E=block_e)
    else:
        route = ins[1]
        tokens, k = route.shape[0], route.shape[1] // 2
        route_args = [("node", route.id), ("stride", route.id)]
        route_consts = {}
    glu = node.attrs["act"] if op.startswith("expert_glu") else None
    nout = w.shape[1] // 2 if glu else w.shape[1]
    kdim = w.shape[2]
    per_token = int(x.shape[0] == tokens)
    bk = min(next_pow2(kdim), 32 if target.interpreted else 256)
    head = [("node", x.id)] + ([("node", ins[1].id), ("value", node.attrs["eps"])] if norm
                               else [])
    tail = [("node", w.id), ("node", node.id), ("value", nout), ("value", kdim),
            ("stride", x.id), ("value", w.shape[1] * kdim), ("value", kdim),
            ("stride", node.id)]
    # few tokens (too few 32-column programs for two an SM): each of a token's k experts is
    # a program; on the interpreter, where tests ask for splits, at one token
    bn = min(next_pow2(nout), 16 if target.interpreted else 32)
    if op.startswith("expert_matmul_combine") and target.expert_splits and (
            target.interpreter_splits and tokens == 1 if target.interpreted
            else tokens * cdiv(nout, bn) < 2 * target.sm_count):
        tiles = cdiv(nout, bn)
        split = [("scratch", ("expert_partials", (tokens * k * nout,), "fp32")),
                 ("scratch", ("expert_counters", (tokens * tiles,), "i32"))]
        return KernelSpec("experts", "matmul-combine-split" + ("-routed" if routed else ""),
                          _combine_split_source(routed), "expert_combine_split_kernel",
                          (tokens, tiles, k), head + route_args + tail[:2] + split + tail[2:],
                          dict(route_consts, TOPK=k, PER_TOKEN=per_token, BN=bn, BK=bk,
                               BLOCK_S=max(2, next_pow2(k))),
                          num_warps=4, num_stages=2)
    if op.startswith("expert_matmul_combine"):
        bn = row_tile(nout, tokens, target.sm_count, target.interpreted)
        return KernelSpec("experts", "matmul-combine" + ("-routed" if routed else ""),
                          _combine_row_source(routed), "expert_combine_row_kernel",
                          (tokens, cdiv(nout, bn)), head + route_args + tail,
                          dict(route_consts, TOPK=k, PER_TOKEN=per_token,
                               KSTEPS=cdiv(kdim, bk), BN=bn, BK=bk),
                          num_warps=4, num_stages=2)
    variant = f"{'glu' if glu else 'matmul'}-{'token' if per_token else 'pair'}"
    pairs = tokens * k
    if tokens == 1 or routed:
        bn = row_tile(nout, pairs, target.sm_count, target.interpreted)
        programs = pairs * cdiv(nout, bn)
        # K shared among programs while they are few (each then waits on fewer loads in
        # turn), in slices of at least 512 rows; on the interpreter where tests ask, at one
        # token, in slices of one K step
        split = 1
        if target.expert_splits and target.interpreted:
            split = cdiv(kdim, bk) if target.interpreter_splits and tokens == 1 else 1
        elif target.expert_splits:
            while split < 8 and programs * split < 8 * target.sm_count and \
                    kdim // (split * 2) >= 512:
                split *= 2
        k_split, split = k_slices(kdim, split, bk)
        extra, consts = [], {}
        if split > 1:
            width = (2 if glu else 1) * nout
            extra = [("scratch", ("expert_row_partials", (pairs * split * width,), "fp32")),
                     ("scratch", ("expert_row_counters", (programs,), "i32")),
                     ("value", k_split), ("value", split)]
            consts = dict(BLOCK_S=next_pow2(split))
        name = variant + ("-routed-norm" if routed else "-row") + ("-split" if split > 1 else "")
        return KernelSpec("experts", name, _row_source(glu, routed, norm, split > 1),
                          "expert_row_kernel", (pairs, cdiv(nout, bn)) + ((split,) if split > 1
                                                                         else ()),
                          head + route_args + tail[:2] + extra + tail[2:],
                          dict(route_consts, TOPK=k, PER_TOKEN=per_token, BN=bn, BK=bk,
                               **consts),
                          num_warps=4, num_stages=2)
    experts = w.shape[0]
    block_e = max(16, next_pow2(experts))
    bm, bn, bk, warps = grouped_tiles(pairs, experts, bool(glu), target.interpreted)
    bk = min(bk, max(16, next_pow2(kdim)))
    order = ("scratch", ("expert_order", (pairs,), "i32"))
    info = ("scratch", ("expert_tiles", (3 * block_e,), "i32"))
    chunk = sort_chunk(block_e, target.interpreted)
    chunks = cdiv(pairs, chunk)
    hist = ("scratch", ("expert_counts", (chunks, block_e), "i32"))
    sort = KernelSpec("experts", "count", _count_source(), "expert_count_kernel", (chunks,),
                      [("node", route.id), hist, ("value", pairs), ("stride", route.id)],
                      dict(TOPK=k, BLOCK_E=block_e, CHUNK=chunk), num_warps=4, num_stages=1)
    sort.then = KernelSpec("experts", "place", _place_source(), "expert_place_kernel",
                           (chunks,), [("node", route.id), hist, order, info, ("value", pairs),
                                       ("value", chunks), ("stride", route.id)],
                           dict(TOPK=k, BLOCK_E=block_e, CHUNK=chunk,
                                RB=2 if target.interpreted else max(1, min(64, 8192 // block_e)),
                                BM=bm),
                           num_warps=4, num_stages=1)
    tiles = cdiv(pairs, bm) + min(experts, pairs)  # the most tiles any routing needs
    # the weights through a tensor descriptor where their rows start on 16 bytes
    tma = kdim % 8 == 0 and graph[w.id].op == "parameter"
    args = [("node", x.id), order, info,
            ("desc", (w.id, (1, bn, bk))) if tma else ("node", w.id), ("node", node.id),
            ("value", experts), ("value", nout), ("value", kdim), ("stride", x.id)]
    args += [] if tma else [("value", w.shape[1] * kdim), ("value", kdim)]
    args += [("stride", node.id)]
    sort.then.then = KernelSpec("experts", variant + "-grouped" + ("-tma" if tma else ""),
                                _grouped_source(glu, tma), "expert_grouped_kernel",
                                (tiles, cdiv(nout, bn)), args,
                                dict(TOPK=k, PER_TOKEN=per_token, BLOCK_E=block_e, BM=bm,
                                     BN=bn, BK=bk, PRECISION=target.dot_precision),
                                num_warps=warps, num_stages=3 if not target.interpreted else 1)
    return sort


def build(node, graph, target: Target) -> KernelSpec:
    if OPS[node.op].archetype == "moe_route":
        return _route(node, graph, target)
    return _experts(node, graph, target)
