"""The product archetype at one row (a decode step): a matrix-vector product that streams B.

    c[n] = epilogue( rstd * sum_k (a[k] w[k]) B[k, n] )

At one row the product is bound by reading B once: the tiled kernel's 64-row tiles would
waste the matrix units and, with N / 128 programs, leave most SMs idle. Here each program
owns BLOCK_N output columns and streams their whole K extent (B stored [N, K] gives
K-contiguous rows; stored [K, N], BLOCK_N-wide segments of each row), multiplying in fp32
on the ordinary units and reducing once at the end; narrow column tiles give every SM
several programs. Over [K, N] weights with too few column tiles, SPLIT_K programs share a
tile's K extent and the last of them to finish sums their partials (in one fixed order, so
every run gives the same bits) and applies the epilogue. The prologue and the element
stages of the epilogue are the tiled kernel's (RMSNorm of a with its weight; act(G) * U of
paired halves, then codegen/elementwise.py's expressions), so the e-graph's fusions carry
over unchanged; one more stage runs only here: the whole row's RMSNorm, in the last column
tile to finish (and the element stages after it). A B that concatenates weights
(q | k | v, gate | up) is always read in place: each program reads the part that holds
its columns.

bytes: elem * (K + K*N' + N [+ N]) (+ 8 * SPLIT_K * N' of fp32 partials at L2, split);
FLOPs: 2*N'*K on the vector units
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch

from ..compiler.kernels import Kernel
from ..compiler.ops import OPS
from .common import GATE, HEADER, KernelSpec, Target, cdiv, indent, next_pow2, part_branches
from .stages import Names, Stages, element_stages, load_once, variant

ROWS = 1  # the matmul archetype hands over products of at most this many rows
# and products of at most this many rows (a batched decode step, a short chunk) to the
# few-row form: every row in each program, B streamed once for them all
FEW_ROWS = 16


@dataclass
class RowNorm:
    """An epilogue's RMSNorm of the whole row (weight pw), and the element stages after it."""

    weight: int  # node-input position of the norm weight
    eps: str  # its argument's name
    eps_value: float
    after: Stages


def emit(pre: Stages, norm: bool, parts: int = 1, weights: bool = True, split_k: bool = False,
         post: RowNorm | None = None, few: bool = False, precision: str = "ieee") -> str:
    """Source of one variant. pre: the epilogue's element stages (a paired first stage: B's
    columns are [G | U], two accumulators); norm: the RMSNorm prologue. parts: B's weights
    passed separately (the paired product reads G from the first and U from the second;
    otherwise a column tile reads the one part that holds it, its end columns `end_i`).
    weights: B is made of parameters (never written at run time), so its first tile may be
    read before the dependent-launch gate. split_k: grid axis 2 shares K among SPLIT_K
    programs per column tile, K_SPLIT rows each (a multiple of BLOCK_K); each stores its
    partial sums in its own row of an fp32 workspace (`ws`, SPLIT_K rows of N values, 2N
    paired) and counts itself in the tile's counter (`cnt`); the last to count reads the
    BLOCK_S rows at once and sums them in one fixed order, finishes the tile (epilogue,
    store) and leaves the counter zeroed for the next launch.
    post: the epilogue ends with the row's RMSNorm (weight pw), then these element stages:
    each program stores its columns (after `pre`) in the row's workspace (`y`) and counts
    itself in its group's counter (GROUPS of GROUP_TILES column tiles), the last of a group
    in the row's; the last of those reads the row back from L2, normalizes it in
    BLOCK_R-wide pieces, applies `post`, and leaves the counters zeroed (not with split_k).
    few: every row of A (M of them, at most BLOCK_M) in each program: the K loop multiplies
    the rows' [BLOCK_M, BLOCK_K] tile by the B tile on the matrix units (`precision`), so B
    is streamed once for them all; the split workspace holds SPLIT_K slices of M rows."""
    assert not (post is not None and (split_k or few))
    paired = bool(pre.stages) and pre.stages[0].pair
    split = parts > 1 and not paired
    after = post.after if post is not None else Stages([])
    tiles, scalars = pre.tiles + after.tiles, pre.scalars + after.scalars
    params = ["a_ptr"] + [f"b{i}_ptr" for i in range(parts)] + ["c_ptr"]
    params += [f"{t.name}_ptr" for t in tiles] + (["nw_ptr"] if norm else [])
    params += ["pw_ptr"] if post is not None else []
    params += [f"{x.name}_ptr" for x in scalars]
    params += ["y_ptr", "row_cnt_ptr"] if post is not None else []
    params += ["ws_ptr", "cnt_ptr", "K_SPLIT", "SPLIT_K"] if split_k else []
    params += (["M"] if few else []) + ["N", "K", "stride_am"]
    params += [f"stride_bn{i}" for i in range(parts)] + [f"stride_bk{i}" for i in range(parts)]
    params += ["stride_cm"] + [f"stride_{t.name}m" for t in tiles]
    params += [f"end_{i}" for i in range(parts - 1)] if split else []
    params += ["eps"] if norm else []
    params += [post.eps] if post is not None else []
    params += [name for name, _ in pre.values + after.values]
    params += ["BLOCK_M: tl.constexpr"] if few else []
    params += ["BLOCK_N: tl.constexpr", "BLOCK_K: tl.constexpr"]
    params += ["BLOCK_S: tl.constexpr"] if split_k else []
    params += ["BLOCK_R: tl.constexpr", "GROUP_TILES: tl.constexpr", "GROUPS: tl.constexpr",
               "BLOCK_CNT: tl.constexpr"] if post is not None else []

    def a_load(k: str, k_mask: str) -> str:
        """A's values at the K positions `k` in fp32: the row's, or the rows' tile (few)."""
        if few:
            return (f"tl.load(a_rows + {k}[None, :], mask=m_mask[:, None] & {k_mask}[None, :], "
                    "other=0.0).to(tl.float32)")
        return f"tl.load(a_row + {k}, mask={k_mask}, other=0.0).to(tl.float32)"
    squares = "tl.sum(a * a, axis=1)" if few else "a * a"  # a norm's sum, per row

    def k_loop(i: int, col: str, up: str | None) -> str:
        """The K loop over part i's columns `col` (and the U columns `up` of a paired
        product). B's tiles are loaded one K step ahead (two in flight per program); the
        first is asked before the dependent-launch gate: weights are never written, so they
        stream while the kernel before finishes."""
        j = 1 if parts == 2 else 0

        def tile(p: int, c: str, k: str) -> str:
            return (f"tl.load(b{p}_ptr + {c}[:, None].to(tl.int64) * stride_bn{p} + "
                    f"{k}[None, :].to(tl.int64) * stride_bk{p}, mask=n_mask[:, None] & "
                    f"({k}[None, :] < k_hi), other=0.0)")

        first = [f"w_next = {tile(i, col, '(k_lo + rk)')}"]
        first += [f"u_next = {tile(j, up, '(k_lo + rk)')}"] if up is not None else []
        lines = ["kk = k0 + rk", "k_mask = kk < k_hi", "w = w_next",
                 f"w_next = {tile(i, col, '(kk + BLOCK_K)')}"]
        if up is not None:
            lines += ["u = u_next", f"u_next = {tile(j, up, '(kk + BLOCK_K)')}"]
        lines.append(f"a = {a_load('kk', 'k_mask')}")
        if norm:  # sum of squares of the row; the norm weight scales it on the way in
            lines += [f"ss += {squares}"] if not split_k else []
            nw = "tl.load(nw_ptr + kk, mask=k_mask, other=0.0).to(tl.float32)"
            lines += [f"a = a * {nw}[None, :]" if few else f"a = a * {nw}"]
        if few:  # the rows' tile against B's, transposed, on the matrix units
            dot = f'input_precision="{precision}"'
            lines.append(f"acc = tl.dot(a.to(w.dtype), tl.trans(w), acc, {dot})")
            if up is not None:
                lines.append(f"acc_up = tl.dot(a.to(u.dtype), tl.trans(u), acc_up, {dot})")
        else:
            lines.append("acc += w.to(tl.float32) * a[None, :]")
            if up is not None:
                lines.append("acc_up += u.to(tl.float32) * a[None, :]")
        head = first + ([GATE] if weights else [])
        if norm and split_k:  # the norm needs the whole row's sum of squares (from L2)
            head += ["for k0 in range(0, K, BLOCK_K):",
                     f"    a = {a_load('(k0 + rk)', '(k0 + rk < K)')}",
                     f"    ss += {squares}"]
        return "\n".join(head) + "\nfor k0 in range(k_lo, k_hi, BLOCK_K):\n" + indent(
            "\n".join(lines), 4)

    if split:
        loop = part_branches(parts, "rn", lambda i, c: k_loop(i, f"({c})", None))
    else:
        loop = k_loop(0, "rn", ("rn" if parts == 2 else "(N + rn)") if paired else None)
    shape = "(BLOCK_M, BLOCK_N)" if few else "(BLOCK_N, BLOCK_K)"
    init = [f"acc = tl.zeros({shape}, dtype=tl.float32)"]
    init += [f"acc_up = tl.zeros({shape}, dtype=tl.float32)"] if paired else []
    init += [f"ss = tl.zeros(({'BLOCK_M' if few else 'BLOCK_K'},), dtype=tl.float32)"] if norm else []
    if few:  # the rows' tile is the product's
        finish = ["out = acc"] + (["up = acc_up"] if paired else [])
        if norm:
            finish += ["rstd = 1.0 / tl.sqrt(ss / K + eps)", "out = out * rstd[:, None]"]
            finish += ["up = up * rstd[:, None]"] if paired else []
        value = load_once("{x}_ptr + rows[:, None] * stride_{x}m + rn[None, :]", "c_mask")
    else:
        finish = ["out = tl.sum(acc, axis=1)"]
        finish += ["up = tl.sum(acc_up, axis=1)"] if paired else []
        if norm:
            finish += ["rstd = 1.0 / tl.sqrt(tl.sum(ss, axis=0) / K + eps)", "out = out * rstd"]
            finish += ["up = up * rstd"] if paired else []
        value = load_once("{x}_ptr + row * stride_{x}m + rn", "n_mask")  # the program's columns
    tail = [line for k in range(len(pre.stages)) for line in pre.lines(k, "out", value, "up")]
    if post is not None:
        tail += _post_norm_tail(post)
    elif few:
        tail.append("tl.store(c_ptr + rows[:, None] * stride_cm + rn[None, :], "
                    "out.to(c_ptr.dtype.element_ty), mask=c_mask)")
    else:
        tail.append("tl.store(c_ptr + row * stride_cm + rn, out.to(c_ptr.dtype.element_ty), "
                    "mask=n_mask)")
    if split_k:  # each slice's partials in its own workspace row; the last to count sums
        # the rows in one fixed order (the same bits every run, whatever order programs finish)
        width = "2 * N" if paired else "N"
        if few:  # slice j's rows from workspace row j * M
            finish += [f"part = ws_ptr + (tl.program_id(2) * M + rows[:, None]) * {width} + "
                       "rn[None, :]", "tl.store(part, out, mask=c_mask)"]
            finish += ["tl.store(part + N, up, mask=c_mask)"] if paired else []
        else:
            finish += [f"part = ws_ptr + tl.program_id(2).to(tl.int64) * {width} + rn",
                       "tl.store(part, out, mask=n_mask)"]
            finish += ["tl.store(part + N, up, mask=n_mask)"] if paired else []
        finish += ["tl.debug_barrier()  # every thread's partials before the count",
                   'done = tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel")']
        if few:  # the slices in order, each asked from L2 (other SMs wrote them)
            last = ["out = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)"]
            last += ["up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)"] if paired else []
            last += ["for j in tl.static_range(BLOCK_S):",
                     f"    part = ws_ptr + (j * M + rows[:, None]) * {width} + rn[None, :]",
                     "    jmask = c_mask & (rm[:, None] * 0 + j < SPLIT_K)  # (a tensor: the interpreter)",
                     '    out += tl.load(part, mask=jmask, other=0.0, cache_modifier=".cg")']
            last += ['    up += tl.load(part + N, mask=jmask, other=0.0, cache_modifier=".cg")'
                     ] if paired else []
        else:  # every slice's row asked at once (from L2: other SMs wrote them), then summed
            last = ["js = tl.arange(0, BLOCK_S)",
                    f"rows = ws_ptr + js[:, None].to(tl.int64) * {width} + rn[None, :]",
                    "rmask = (js[:, None] < SPLIT_K) & n_mask[None, :]",
                    'out = tl.sum(tl.load(rows, mask=rmask, other=0.0, cache_modifier=".cg"), '
                    'axis=0)']
            last += ['up = tl.sum(tl.load(rows + N, mask=rmask, other=0.0, cache_modifier=".cg"), '
                     'axis=0)'] if paired else []
        last += tail + ["tl.store(cnt_ptr + pid_n, 0)"]
        tail = ["if done == SPLIT_K - 1:"] + ["    " + x for x in last]
    k_range = (["k_lo = tl.program_id(2) * K_SPLIT", "k_hi = tl.minimum(k_lo + K_SPLIT, K)"]
               if split_k else ["k_lo = 0", "k_hi = K"])
    if few:
        rows = """rm = tl.arange(0, BLOCK_M)
m_mask = rm < M
rows = rm.to(tl.int64)
c_mask = m_mask[:, None] & n_mask[None, :]
a_rows = a_ptr + rows[:, None] * stride_am"""
    else:
        rows = """row = tl.program_id(1).to(tl.int64)
a_row = a_ptr + row * stride_am"""
    body = f'''
pid_n = tl.program_id(0)
rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
n_mask = rn < N
rk = tl.arange(0, BLOCK_K)
{rows}
{chr(10).join(k_range)}
{chr(10).join(init)}
{loop}
{chr(10).join(finish)}
{chr(10).join(tail)}
'''
    return HEADER + f"def matvec_kernel({', '.join(params)}):\n" + indent(body, 4) + "\n"


def _post_norm_tail(post: RowNorm) -> list[str]:
    """The row's post-norm after the product: columns to the workspace, counted in two
    levels (hundreds of tiles adding to one counter queue at L2: each counts in its group's
    counter, the last of a group in the row's); the last to count reads the whole row back
    (from L2: other SMs wrote it), then normalizes it and applies the stages after the norm
    (a residual, a layer scalar) piece by piece, and zeroes the row's counters."""
    def piece(name: str) -> list[str]:
        return ["cols = c0 + tl.arange(0, BLOCK_R)",
                "cm = cols < N",
                f"{name} = tl.load(y_ptr + row * N + cols, mask=cm, other=0.0, "
                'cache_modifier=".cg")']

    def value(x):  # inline, at the piece's columns
        if x.kind == "scalar":
            return [], f"tl.load({x.name}_ptr).to(tl.float32)"
        return [], (f"tl.load({x.name}_ptr + row * stride_{x.name}m + cols, mask=cm, other=0.0)"
                    ".to(tl.float32)")
    out = ["tl.store(y_ptr + row * N + rn, out, mask=n_mask)",
           "tl.debug_barrier()  # every thread's columns before the count",
           "grp = pid_n // GROUP_TILES",
           "# the row's counter, then its groups', a cache line (32 counters) apart",
           "cnt_row = row_cnt_ptr + row * (GROUPS + 1) * 32",
           "in_group = tl.minimum(GROUP_TILES, tl.num_programs(0) - grp * GROUP_TILES)",
           'done = tl.atomic_add(cnt_row + (1 + grp) * 32, 1, sem="acq_rel")',
           "if done == in_group - 1:  # the group's last: its columns are in",
           '    done = tl.atomic_add(cnt_row, 1, sem="acq_rel")',
           "    if done == GROUPS - 1:  # the row's last: every column is in"]
    # the row's statistics under names of their own: a norm prologue's ss and rstd have
    # the tile's shape (Triton keeps one type a name across the branch)
    last = ["pss = tl.zeros((BLOCK_R,), dtype=tl.float32)",
            "for c0 in range(0, N, BLOCK_R):"]
    last += ["    " + x for x in piece("y") + ["pss += y * y"]]
    last += [f"prstd = 1.0 / tl.sqrt(tl.sum(pss, axis=0) / N + {post.eps})",
             "for c0 in range(0, N, BLOCK_R):"]
    body = piece("y") + ["y = y * prstd * tl.load(pw_ptr + cols, mask=cm, other=0.0).to(tl.float32)"]
    body += [line for k in range(len(post.after.stages)) for line in post.after.lines(k, "y", value)]
    body += ["tl.store(c_ptr + row * stride_cm + cols, y.to(c_ptr.dtype.element_ty), mask=cm)"]
    last += ["    " + x for x in body]
    last += ["rc = tl.arange(0, BLOCK_CNT)  # the counters zeroed for the next launch",
             "tl.store(cnt_row + rc * 32, rc * 0, mask=rc < GROUPS + 1)"]
    return out + ["        " + x for x in last]


def tiles(n: int, k: int, paired: bool, b_trans: bool, target: Target,
          splits: bool = True) -> dict:
    """Column tile and K step, from benchmarks/matvec_sweep.py on the H200 (Triton 3.6,
    results/matvec-sweep-2026-12-01-*.log; pipeline stages change nothing here).
    Stored [N, K], a column's K run is contiguous:
    - paired gate | up: 8 columns of each part (fewer where a program would read more than
      96 KB or the SMs get fewer than two programs) in K steps of 256: e4b 26.2 us for
      105 MB in the decode step (32.4 at one column in steps of 512); 31b 110.8 us for
      463 MB at 4 columns, 116.1 at 8;
    - long rows (K >= 4096) with at least two programs an SM at 16 columns: 16 columns in K
      steps of 256 (512 for K >= 8192): 31b's q | k | v 45.5 us for 176 MB (53.0 at 2
      columns in steps of 512), its o projection 23.4 us for 88 MB (25.3), its down
      projection 58.4 us for 231 MB (as at one column);
    - otherwise the widest tile (up to 8 columns) whose program reads at most 40 KB of B and
      that still gives every SM a program, 4 columns at most for the widest products (the
      lm_head: 302 us for 1.34 GB at 4, 359 at 8), K steps of 1024 for K >= 8192 (e4b's
      down projection: 13.5 us for 52 MB, 16.1 in steps of 512), else 512;
    - too few columns for every SM even at one column a program (a MoE router's 128
      experts): K split in up to 8 slices of at least 512 rows, K steps of 256, until every
      SM gets two programs (26B-A4B's router took 9.2 us at one column, whole K, on an
      H100: its 128 programs each waited on six loads in turn).
    Stored [K, N] (the seed's layout), each K row gives a BLOCK_N-wide segment; timed with
    B out of L2 (results/matvec-sweep-2026-12-01-h200-3357d59-seed-split-k-cold.log):
    - paired gate | up: 32 columns (16 where that leaves fewer than two programs an SM) in
      K steps of 128, whole K a program: 29.6 us for 105 MB (32.2 and more split);
    - the widest products (the lm_head): 64 columns in K steps of 128: 347 us for 1.34 GB
      (381 in steps of 64, over 392 at 16-32 columns);
    - two programs an SM at 16 columns (q | k | v): 16 columns in K steps of 256, whole K:
      11.5 us for 26 MB (12.5 split four ways);
    - else (down, o) 32 columns in K steps of 128, K split up to 8 ways in slices of at
      least 640 rows: down 16.6 us for 52 MB (8 ways; 26 us whole at 16 columns), o 7.9 us
      for 13 MB (4 ways).
    splits=False (a row's post-norm counts whole column tiles): 16 columns in K steps of
    256 where a split would have been chosen, so every SM still gets a program."""
    if target.interpreted:  # in up to three K slices where tests cover the split;
        # 32 columns: several tiles at the tests' widths, and few programs (each program of
        # the interpreter runs in Python, at about the same time for 8 columns as for 32)
        split = splits and target.interpreter_splits
        return dict(BLOCK_N=32, BLOCK_K=32, warps=4, SPLIT_K=min(3, cdiv(k, 32)) if split else 1)
    if not b_trans:
        if paired:
            return dict(BLOCK_N=32 if cdiv(n, 32) >= 2 * target.sm_count else 16, BLOCK_K=128,
                        warps=4, SPLIT_K=1)
        if n >= 65536:
            return dict(BLOCK_N=64, BLOCK_K=128, warps=4, SPLIT_K=1)
        if cdiv(n, 16) >= 2 * target.sm_count or not splits:
            return dict(BLOCK_N=16, BLOCK_K=256, warps=4, SPLIT_K=1)
        split = 1
        while split < 8 and k // (split * 2) >= 640:
            split *= 2
        return dict(BLOCK_N=32, BLOCK_K=128, warps=4, SPLIT_K=split)
    elem = 4 if target.dtype == torch.float32 else 2
    k_pow2 = max(32, 1 << (k - 1).bit_length())
    if paired:  # G and U tiles side by side in 256-wide K steps, at most 96 KB a program
        bn = 8
        while bn > 1 and (bn * 2 * elem * k > 96 * 1024 or cdiv(n, bn) < 2 * target.sm_count):
            bn //= 2
        return dict(BLOCK_N=bn, BLOCK_K=min(256, k_pow2), warps=4)
    if k >= 4096 and n < 65536 and cdiv(n, 16) >= 2 * target.sm_count:
        return dict(BLOCK_N=16, BLOCK_K=256 if k < 8192 else 512, warps=4)
    per_column = elem * k
    bn = 4 if n >= 65536 else 8
    while bn > 1 and (bn * per_column > 40 * 1024 or cdiv(n, bn) < target.sm_count):
        bn //= 2
    if splits and cdiv(n, bn) < target.sm_count:  # too few columns for the SMs (a router)
        split = 1
        while split < 8 and cdiv(n, bn) * split < 2 * target.sm_count and k // (split * 2) >= 512:
            split *= 2
        return dict(BLOCK_N=bn, BLOCK_K=min(256, k_pow2), warps=4, SPLIT_K=split)
    bk = 1024 if k >= 8192 else 512
    return dict(BLOCK_N=bn, BLOCK_K=min(bk, k_pow2), warps=4)


def few_tiles(n: int, k: int, paired: bool, target: Target, norm: bool = False) -> dict:
    """Column tile, K step and K slices of the few-row form, bound like one row by reading B
    once; from `benchmarks/matvec_sweep.py --rows 8` on the H100 (B out of L2,
    results/matvec-sweep-2026-12-07-h100-*-rows-8.log): 32 columns (64 for the widest
    products, the lm_head: 435 us for 1.35 GB) in K steps of 128, K split in up to 4 slices
    of at least 512 rows until every SM has two programs (e4b's down projection 23.1 us in
    four slices, its o projection 7.7). A norm prologue reads the rows' fp32 stream tile
    by tile beside B: K steps of 64 and programs for four an SM (e4b's q | k | v 17.7 us in
    four slices, 23 at K steps of 256 and 16 columns)."""
    if target.interpreted:  # few programs, in K slices where tests cover the split
        split = target.interpreter_splits
        return dict(BLOCK_N=32, BLOCK_K=32, warps=4, SPLIT_K=min(3, cdiv(k, 32)) if split else 1)
    bn = 64 if n >= 65536 else 32
    bk = min(64 if norm else 128, max(32, next_pow2(k)))
    per_sm = 4 if norm else 2
    split = 1
    while split < 4 and cdiv(n, bn) * split < per_sm * target.sm_count and k // (split * 2) >= 512:
        split *= 2
    return dict(BLOCK_N=bn, BLOCK_K=bk, warps=4, SPLIT_K=split)


def k_slices(k: int, split: int, block_k: int) -> tuple[int, int]:
    """(rows a slice, slices): K in at most `split` slices of whole K steps."""
    k_split = cdiv(cdiv(k, split), block_k) * block_k
    return k_split, cdiv(k, k_split)


def build(node, graph, target: Target, stored: list[tuple[int, bool]], cfg: dict,
          k: Kernel) -> KernelSpec:
    """The one-row kernel of a product node. stored: the tensors holding B's parts and
    whether each holds it transposed; cfg: `tiles`; k: the node's kernel (its stages)."""
    a = graph[node.inputs[0]]
    kk, n = a.shape[1], node.shape[1]
    norm = bool(k.prologue)  # the RMSNorm of the row, the prologue a product takes
    names = Names({"eps"} if norm else ())
    # the epilogue up to a row's RMSNorm runs on the program's columns; the norm and what
    # follows it, in the last column tile to finish (over the whole row)
    cut = next((i for i, st in enumerate(k.epilogue) if OPS[st.op].locality == "row"),
               len(k.epilogue))
    pre = element_stages(k.epilogue[:cut], node, graph, names, node.shape)
    post = None
    if cut < len(k.epilogue):
        st = k.epilogue[cut]
        post = RowNorm(st.operands[0], names.take("eps"), st.attr["eps"], None)
        post.after = element_stages(k.epilogue[cut + 1:], node, graph, names, node.shape)
        post.after.prefix = "p_"  # its temporaries live in the row's loop, not the tile's
    rows = a.shape[0]
    cfg = dict(cfg)
    warps, split_k = cfg.pop("warps"), cfg.pop("SPLIT_K", 1)
    split = len(stored) > 1 and not k.paired
    after = post.after if post is not None else Stages([])
    args = [("node", a.id)] + [("node", sid) for sid, _ in stored] + [("node", node.id)]
    args += [("node", node.inputs[t.input]) for t in pre.tiles + after.tiles]
    args += [("node", node.inputs[k.prologue[0].operands[0]])] if norm else []
    args += [("node", node.inputs[post.weight])] if post is not None else []
    args += [("node", node.inputs[x.input]) for x in pre.scalars + after.scalars]
    if post is not None:  # the rows' workspace and counters
        # column tiles counted in about sqrt(tiles) groups of about sqrt(tiles)
        n_tiles = cdiv(n, cfg["BLOCK_N"])
        group_tiles = math.isqrt(n_tiles - 1) + 1
        groups = cdiv(n_tiles, group_tiles)
        args += [("scratch", ("matvec_rows", (rows * n,), "fp32")),
                 ("scratch", ("matvec_row_counters", (rows * (groups + 1) * 32,), "i32"))]
        # the row in pieces of 1024 on the GPU: wider ones cost the whole kernel registers
        # (128 a thread at 4096, against the product's 60-96: fewer programs stream B), and
        # in pieces of 32 on the interpreter (so tests cover several)
        cfg.update(BLOCK_R=min(next_pow2(n), 32 if target.interpreted else 1024),
                   GROUP_TILES=group_tiles, GROUPS=groups, BLOCK_CNT=next_pow2(groups + 1))
    # K in SPLIT_K slices of whole K steps (one row: the workspace holds one row's partials;
    # a post-norm row counts whole column tiles)
    k_split, split_k = k_slices(kk, split_k, cfg["BLOCK_K"])
    few = rows > 1 and post is None  # every row in each program (at most FEW_ROWS)
    split_k = split_k if (rows == 1 or few) and post is None else 1
    if split_k > 1:  # a workspace row per slice (and row) and a counter per column tile,
        # shared by the plan's products of the same shape (each leaves the counters zeroed)
        width = (2 if k.paired else 1) * n
        args += [("scratch", ("matvec_partials", (split_k * rows * width,), "fp32")),
                 ("scratch", ("matvec_counters", (cdiv(n, cfg["BLOCK_N"]),), "i32")),
                 ("value", k_split), ("value", split_k)]
        cfg["BLOCK_S"] = next_pow2(split_k)  # the slices' rows, read at once
    args += [("value", rows)] if few else []
    args += [("value", n), ("value", kk), ("stride", a.id)]
    # each part's stride along N, then along K
    args += [("stride", sid) if tr else ("value", 1) for sid, tr in stored]
    args += [("value", 1) if tr else ("stride", sid) for sid, tr in stored]
    args += [("stride", node.id)]
    args += [("stride", node.inputs[t.input]) for t in pre.tiles + after.tiles]
    if split:
        widths = [graph[sid].shape[0] if tr else graph[sid].shape[1] for sid, tr in stored]
        args += [("value", e) for e in list(itertools.accumulate(widths))[:-1]]
    args += [("value", k.prologue[0].attr["eps"])] if norm else []
    args += [("value", post.eps_value)] if post is not None else []
    args += [("value", v) for _, v in pre.values + after.values]
    name = (variant(k.prologue, k.epilogue) or "plain") + "+matvec"
    name += "+B-transposed" if stored[0][1] else ""
    name += f"+{len(stored)}-part-B" if len(stored) > 1 else ""
    name += "+split-K" if split_k > 1 else ""
    if few:
        assert rows <= FEW_ROWS, rows
        name = name.replace("+matvec", f"+matvec-{rows}-rows")
        cfg["BLOCK_M"] = max(16, next_pow2(rows))  # the matrix units' least height
    grid = (cdiv(n, cfg["BLOCK_N"]), 1 if few else rows) + ((split_k,) if split_k > 1 else ())
    weights = all(graph.load_time(sid) for sid, _ in stored)
    streams = None
    if weights and grid[1:] == (1,) and all(tr for _, tr in stored):  # [N, K] weights, one
        # row, whole K a program: a program's columns are whole rows of its part
        col = kk * torch.empty((), dtype=target.dtype).element_size()
        if k.paired:  # G and U at the same columns: of two parts, or of one [G | U]
            parts = [(1, 0, n, col, 0), (2, 0, n, col, 0)] if len(stored) == 2 else \
                [(1, 0, n, col, 0), (1, 0, n, col, n)]
        else:
            ends = list(itertools.accumulate(graph[sid].shape[0] for sid, _ in stored))
            parts = [(1 + i, lo, hi, col, 0) for i, (lo, hi) in enumerate(zip([0] + ends, ends))]
        streams = (cfg["BLOCK_N"], tuple(parts))
    return KernelSpec("matmul", name, emit(pre, norm, len(stored), weights, split_k > 1, post,
                                           few, target.dot_precision),
                      "matvec_kernel", grid, args, cfg, num_warps=warps, num_stages=3,
                      streams=streams)


__all__ = ["FEW_ROWS", "ROWS", "build", "emit", "few_tiles", "k_slices", "tiles"]
