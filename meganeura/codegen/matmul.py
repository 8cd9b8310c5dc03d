"""The product archetype, tiled: C = epilogue(prologue(A) @ B) with fp32 accumulation.

    C[m, n] = epilogue( rstd[m] * sum_k (A[m, k] w[k]) B[k, n] )

Prologue (an rms_norm stage): RMSNorm of A's rows, rstd[m] = rsqrt(sum_k A[m, k]^2 / K + eps),
gathered from the A tiles the K loop loads anyway; the norm weight w scales the A tiles on
their way to the matrix units, so no weight is copied.
Epilogue: the element stages in order, on the fp32 accumulator tile (codegen/elementwise.py:
`+ R[m, n]`, `act(C) * R[m, n]`, `cap * tanh(C / cap)`, ...); a paired stage first, where B is
[G | U]: the program keeps a G and a U accumulator and the stage combines them (act(G) * U).
A one-row product (a decode step) runs the matrix-vector kernel (codegen/matvec.py), which
also takes a row's RMSNorm in its epilogue.
A may be fp32 (the residual stream): its tiles are cast to B's dtype for the dot, and the
norm statistics use the fp32 values.
B is a weight read where it lies: stored [K, N] (the seed's layout), or transposed, stored
[N, K] as checkpoints hold linear weights (the tile is loaded [BLOCK_N, BLOCK_K] and fed
transposed to the matrix units); a B that is a concatenation of weights (gate | up,
q | k | v) is read from the weights in place, so no concatenated copy is kept. Where rows
are 16-byte aligned, A and B tiles come through tensor descriptors (TMA).

bytes: elem * (M*K + K*N' + M*N [+ M*N per tile operand]), N' = 2N for paired tiles
FLOPs: 2*M*N'*K on the matrix units; 3*M*K per column tile for the norm prologue
"""

from __future__ import annotations

import itertools

import torch

from ..compiler.cost import halve_last_wave, matmul_tile
from ..compiler.kernels import node_kernel, unrunnable
from ..compiler.ops import OPS
from ..compiler.plan import holds_fp32
from ..errors import MeganeuraError
from . import matvec
from .common import HEADER, KernelSpec, Target, cdiv, fit_stages, indent, part_branches
from .stages import Names, Stages, element_stages, load_once, variant


def emit(epi: Stages, norm: bool, precision: str, tma: bool = False, parts: int = 1,
         b_trans: bool = False, halves: bool = False) -> str:
    """Source of one variant; each stage and flag adds its fragment, nothing else differs.

    epi: the element stages of the epilogue (a paired first stage: B's columns are [G | U],
    read as two accumulators). norm: the RMSNorm prologue.
    tma: A and B tiles come through tensor descriptors (Hopper's bulk tensor copies, which
    also zero-fill past the edges) instead of masked pointer loads.
    parts (tma only): B is read from `parts` weight tensors side by side rather than from
    their concatenation: paired products read G from the first and U from the second; other
    products pick, per column tile, the part that holds the tile's columns (ends `end_i`).
    b_trans: B's storage is [N, K] (tiles are loaded transposed).
    halves: the tiles from FULL on (those past the last full wave of SMs) run as two
    programs each, one per half of the tile's rows: twice as many programs fill SMs that
    would idle, each with half the work (cost.halve_last_wave prices it). The two tile
    heights are two bodies under independent ifs (they share the pipeline's buffers); A's
    half tiles come through their own descriptor (ah_desc).
    """
    paired = bool(epi.stages) and epi.stages[0].pair
    if tma:
        params = ["a_desc"] + (["ah_desc"] if halves else []) + [f"b{i}_desc" for i in range(parts)]
    else:
        params = ["a_ptr", "b_ptr"]
    params += ["c_ptr"] + [f"{t.name}_ptr" for t in epi.tiles] + (["nw_ptr"] if norm else [])
    params += [f"{x.name}_ptr" for x in epi.scalars]
    params += ["M", "N", "K"] + ([] if tma else ["stride_am", "stride_bk", "stride_bn"])
    params += ["stride_cm"]
    split = tma and parts > 1 and not paired  # column tiles choose their part
    params += [f"end_{i}" for i in range(parts - 1)] if split else []
    params += [f"stride_{t.name}m" for t in epi.tiles]
    params += ["eps"] if norm else []
    params += [name for name, _ in epi.values]
    params += ["FULL"] if halves else []
    params += ["BLOCK_M: tl.constexpr", "BLOCK_N: tl.constexpr", "BLOCK_K: tl.constexpr",
               "GROUP_M: tl.constexpr"]
    dot = f'input_precision="{precision}"'

    def load_b(desc: str, col: str) -> str:
        if b_trans:
            return f"tl.trans({desc}.load([{col}, k0]))"
        return f"{desc}.load([k0, {col}])"

    def k_step(b_tile: str, up_tile: str | None, a_desc: str) -> str:
        a_load = (f"{a_desc}.load([row0, k0])" if tma else
                  "tl.load(a_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)")
        lines = [f"a = {a_load}", f"b = {b_tile}"]
        if norm:  # sum of squares of A's rows; the norm weight scales A on the way in
            lines += ["a32 = a.to(tl.float32)",
                      "ss += tl.sum(a32 * a32, axis=1)",
                      "nw = tl.load(nw_ptr + k0 + rk, mask=rk < K - k0, other=0.0).to(tl.float32)",
                      "a = a32 * nw[None, :]"]
        lines.append(f"acc = tl.dot(a.to(b.dtype), b, acc, {dot})")
        if paired:
            lines += [f"b_up = {up_tile}", f"acc_up = tl.dot(a.to(b_up.dtype), b_up, acc_up, {dot})"]
        return "\n".join(lines)

    def tile(tm: str, a_desc: str) -> str:
        """One output tile of `tm` rows from row0 (tm a constexpr expression)."""
        if tma:  # columns of a G tile past N read U's first columns: masked at the store
            def k_loop(desc: str, col: str) -> str:
                if paired:
                    up = load_b("b1_desc", col) if parts == 2 else load_b(desc, f"N + {col}")
                else:
                    up = None
                step = k_step(load_b(desc, col), up, a_desc)
                return f"for k0 in range(0, K, BLOCK_K):\n{indent(step, 4)}"
            if split:
                loop = part_branches(parts, "col0", lambda i, c: k_loop(f"b{i}_desc", c))
            else:
                loop = k_loop("b0_desc", "pid_n * BLOCK_N")
        else:
            b_tile = "tl.load(b_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)"
            up_tile = ("tl.load(b_ptrs + N * stride_bn, mask=k_mask[:, None] & n_mask[None, :], "
                       "other=0.0)")
            loop = f"""a_ptrs = a_ptr + rows[:, None] * stride_am + rk[None, :]
b_ptrs = b_ptr + rk[:, None].to(tl.int64) * stride_bk + rn[None, :].to(tl.int64) * stride_bn
for k0 in range(0, K, BLOCK_K):
    k_mask = rk < K - k0
{indent(k_step(b_tile, up_tile if paired else None, a_desc), 4)}
    a_ptrs += BLOCK_K
    b_ptrs += BLOCK_K * stride_bk"""
        init = [f"acc = tl.zeros(({tm}, BLOCK_N), dtype=tl.float32)"]
        init += [f"acc_up = tl.zeros(({tm}, BLOCK_N), dtype=tl.float32)"] if paired else []
        init += [f"ss = tl.zeros(({tm},), dtype=tl.float32)"] if norm else []
        finish = []
        if norm:
            finish += ["rstd = 1.0 / tl.sqrt(ss / K + eps)", "acc = acc * rstd[:, None]"]
            finish += ["acc_up = acc_up * rstd[:, None]"] if paired else []
        value = load_once("{x}_ptr + rows[:, None] * stride_{x}m + rn[None, :]", "c_mask")
        for k in range(len(epi.stages)):
            finish += epi.lines(k, "acc", value, "acc_up")
        return f'''rm = row0 + tl.arange(0, {tm})
rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
rk = tl.arange(0, BLOCK_K)
rows = rm.to(tl.int64)  # M * N can pass 2^31 (8192 tokens x 262144 logits)
m_mask = rm < M
n_mask = rn < N
{chr(10).join(init)}
{loop}
c_mask = m_mask[:, None] & n_mask[None, :]
{chr(10).join(finish)}
tl.store(c_ptr + rows[:, None] * stride_cm + rn[None, :], acc.to(c_ptr.dtype.element_ty),
         mask=c_mask)'''

    if halves:
        head = """pid = tl.program_id(0)
# programs from FULL on: two for each remaining tile, one per half of its rows
t = tl.where(pid < FULL, pid, FULL + (pid - FULL) // 2)"""
        tiles = f"""if pid < FULL:
    row0 = pid_m * BLOCK_M
{indent(tile("BLOCK_M", "a_desc"), 4)}
if pid >= FULL:  # an independent if: the two bodies share the pipeline's buffers
    row0 = pid_m * BLOCK_M + (pid - FULL) % 2 * (BLOCK_M // 2)
{indent(tile("BLOCK_M // 2", "ah_desc"), 4)}"""
    else:
        head = "t = tl.program_id(0)"
        tiles = "row0 = pid_m * BLOCK_M\n" + tile("BLOCK_M", "a_desc")
    body = f'''
{head}
num_m = tl.cdiv(M, BLOCK_M)
num_n = tl.cdiv(N, BLOCK_N)
# grouped order: GROUP_M row tiles share each B column tile while it is in L2
per_group = GROUP_M * num_n
first_m = (t // per_group) * GROUP_M
size_m = min(num_m - first_m, GROUP_M)
pid_m = first_m + (t % per_group) % size_m
pid_n = (t % per_group) // size_m
{tiles}
'''
    return HEADER + f"def matmul_kernel({', '.join(params)}):\n" + indent(body, 4) + "\n"


def tiles(m: int, n: int, k: int, paired: bool, residual: bool, target: Target) -> dict:
    """Block sizes: small on the interpreter (Python per program), MMA-sized on the GPU.

    GPU choices come from benchmarks/kernel_sweep.py on the H200 (gemma4-4b and 12b, 2048
    tokens, results/kernel-sweep-*.log): paired gate/up tiles 128x128 with 8 warps (two
    accumulators); otherwise 128x256 tiles, unless they leave the last wave of SMs mostly
    empty (4b's N=2560: 160 tiles on 132 SMs), then 128x128.
    """
    if target.interpreted:
        return dict(BLOCK_M=16 if m <= 16 else 32, BLOCK_N=32, BLOCK_K=32, GROUP_M=4,
                    warps=4, stages=1)
    if target.dtype == torch.float32:  # 4-byte tiles: half the size for the same smem
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, warps=4, stages=3)
    if m <= 16:  # a batched decode step's rows: bound by reading B, as one row is; tiles
        # of 16 rows, and narrow enough that every SM streams a share of B (about two
        # programs each, 16 to 128 columns)
        bn = 16
        while bn < 128 and cdiv(n, 2 * bn) >= 2 * target.sm_count:
            bn *= 2
        return dict(BLOCK_M=16, BLOCK_N=bn, BLOCK_K=128, GROUP_M=1, warps=4, stages=4)
    if m <= 64:
        return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, warps=4, stages=4)
    # the cost model prices the same tile (build narrows a 256-wide one to 128 where that
    # lets it read concatenated weights in place)
    bm, bn = matmul_tile(m, n, paired, target.sm_count)
    warps = 8 if paired or bn == 256 else 4
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=64, GROUP_M=8, warps=warps, stages=4)


def weight_parts(graph, nid: int) -> list[int]:
    """The weights (parameters, or transposes of parameters) whose column concatenation B is
    (a load-time concat_cols tree), or [B]."""
    node = graph[nid]
    if node.op == "concat_cols" and all(_is_weight(graph, i) or graph[i].op == "concat_cols"
                                        for i in node.inputs):
        return [p for i in node.inputs for p in weight_parts(graph, i)]
    return [nid]


def _is_weight(graph, nid: int) -> bool:
    n = graph[nid]
    return n.op == "parameter" or (n.op == "transpose" and graph[n.inputs[0]].op == "parameter")


def storage(graph, nid: int) -> tuple[int, bool]:
    """The node whose tensor holds B's part, and whether it holds it transposed ([N, K])."""
    n = graph[nid]
    if n.op == "transpose" and graph[n.inputs[0]].op == "parameter":
        return n.inputs[0], True
    return nid, False


def parts_fit(graph, parts: list[int], paired: bool, n: int, block_n: int) -> bool:
    """Parts can be read in place: G and U for a paired product; else column tiles that
    never straddle two parts (every part but the last a multiple of the tile width); and
    every part stored the same way."""
    widths = [graph[p].shape[1] for p in parts]
    if len({storage(graph, p)[1] for p in parts}) > 1:
        return False
    if paired:
        return len(parts) == 1 or widths == [n, n]
    return all(w % block_n == 0 for w in widths[:-1])


def _b_reads(graph, a_id: int, b_id: int, paired: bool, n: int, block_n: int
             ) -> tuple[list[int], bool]:
    """Where B's tiles come from: the weights it concatenates (read in place) or B itself;
    and whether through tensor descriptors (A and every tensor read with 16-byte rows)."""
    if not _aligned(graph, a_id):
        return [b_id], False
    parts = weight_parts(graph, b_id)
    if len(parts) > 1 and all(_aligned(graph, storage(graph, p)[0]) for p in parts) and parts_fit(
            graph, parts, paired, n, block_n):
        # a paired product reads G and U in its one K loop; other products run one K loop
        # per part in independent ifs (exactly one runs per tile), which Triton 3.6 compiles
        # to one set of stage buffers (if/elif gave each loop its own: 4b's q | k | v at 4
        # stages asked 262 KiB; the ifs ask the one loop's 128 KiB, tools/compile_check.py).
        # That sharing is the compiler's: test_compile_check holds it for the Triton in use.
        return parts, True
    return [b_id], _aligned(graph, storage(graph, b_id)[0])


def _aligned(graph, nid: int) -> bool:
    """Rows of the node's tensor start on 16 bytes (what a tensor descriptor needs), for
    2-byte elements and so for 4-byte ones: its width, or a view's parent width and offset."""
    node = graph[nid]
    if node.op == "slice_cols":
        parent = graph[node.inputs[0]]
        return parent.shape[1] % 8 == 0 and node.attrs["start"] % 8 == 0 and _aligned(
            graph, parent.id)
    return node.shape[1] % 8 == 0


def build(node, graph, target: Target) -> KernelSpec:
    k = node_kernel(node)
    why = unrunnable(k)
    if why:
        raise MeganeuraError(f"{graph.label(node.id)}: {why}")
    a, b = graph[node.inputs[0]], graph[node.inputs[1]]
    (m, kk), n = a.shape, node.shape[1]
    # a row's RMSNorm in the epilogue waits on the row's last column tile: the
    # matrix-vector kernel's (the cost model offers it only at one row; a graph built with
    # it runs)
    row_norm = any(OPS[st.op].locality == "row" for st in k.epilogue)
    if m <= matvec.ROWS or row_norm:
        return _matvec(node, graph, target, k, row_norm)
    if m <= matvec.FEW_ROWS and not (k.prologue and (k.paired or n >= 65536)):
        # a batched decode step, a short chunk: bound by reading B. (A norm prologue's
        # gate | up and lm_head stay tiled: 43 against 47 us for e4b's gate | up at 8 rows on
        # the H100, and the few-row lm_head took 1568 us against 443 in K steps of 256.)
        return _matvec(node, graph, target, k, False, few=True)
    norm = bool(k.prologue)  # the RMSNorm of A's rows, the prologue a product takes
    epi = element_stages(k.epilogue, node, graph, Names({"eps"} if norm else ()), node.shape)
    paired = k.paired
    name = variant(k.prologue, k.epilogue) or "plain"
    cfg = tiles(m, n, kk, paired, bool(epi.tiles), target)
    warps, stages = cfg.pop("warps"), cfg.pop("stages")
    elem = 4 if target.dtype == torch.float32 else 2
    a_elem = 4 if holds_fp32(graph, a.id) else elem  # the fp32 residual stream
    parts, tma = _b_reads(graph, a.id, b.id, paired, n, cfg["BLOCK_N"])
    if len(parts) == 1 and cfg["BLOCK_N"] == 256 and len(weight_parts(graph, b.id)) > 1:
        # 256-wide tiles would straddle the weights (12b's q | k | v: 3840 | 1920 | 1920):
        # 128-wide ones that read them in place, rather than a load-time concatenation
        # (2.6 GB over 12b's 48 layers) for a tile a few percent faster
        narrow, narrow_tma = _b_reads(graph, a.id, b.id, paired, n, 128)
        if len(narrow) > 1:
            parts, tma = narrow, narrow_tma
            cfg["BLOCK_N"], warps = 128, 8 if paired else 4
    per_stage = cfg["BLOCK_K"] * (a_elem * cfg["BLOCK_M"] + elem * cfg["BLOCK_N"] * (2 if paired else 1))
    stored = [storage(graph, p) for p in parts]
    b_trans = stored[0][1]
    split = len(parts) > 1 and not paired
    stages = fit_stages(per_stage, 0, stages)
    bm, bk, bn = cfg["BLOCK_M"], cfg["BLOCK_K"], cfg["BLOCK_N"]
    # the last wave's tiles in halves of at least 64 rows on the GPU (a warp group's
    # matrix-unit height), 16 on the interpreter
    halves = bm >= (32 if target.interpreted else 128) and halve_last_wave(
        m, n, bm, bn, target.sm_count)
    tiles_mn = cdiv(m, bm) * cdiv(n, bn)
    full = tiles_mn - tiles_mn % target.sm_count if halves else tiles_mn
    if tma:
        args = [("desc", (a.id, (bm, bk)))] + ([("desc", (a.id, (bm // 2, bk)))] if halves else [])
        args += [("desc", (sid, (bn, bk) if b_trans else (bk, bn))) for sid, _ in stored]
    else:
        args = [("node", a.id), ("node", stored[0][0])]
    args += [("node", node.id)]
    args += [("node", node.inputs[t.input]) for t in epi.tiles]
    args += [("node", node.inputs[k.prologue[0].operands[0]])] if norm else []
    args += [("node", node.inputs[x.input]) for x in epi.scalars]
    args += [("value", m), ("value", n), ("value", kk)]
    if not tma:  # B's strides along K and along N
        b_strides = [("value", 1), ("stride", stored[0][0])] if b_trans else \
            [("stride", stored[0][0]), ("value", 1)]
        args += [("stride", a.id)] + b_strides
    args += [("stride", node.id)]
    if split:
        ends = list(itertools.accumulate(graph[p].shape[1] for p in parts))[:-1]
        args += [("value", e) for e in ends]
    args += [("stride", node.inputs[t.input]) for t in epi.tiles]
    args += [("value", k.prologue[0].attr["eps"])] if norm else []
    args += [("value", v) for _, v in epi.values]
    args += [("value", full)] if halves else []
    grid = (full + 2 * (tiles_mn - full) if halves else tiles_mn,)
    name += "+tma" if tma else ""
    name += "+B-transposed" if b_trans else ""
    name += f"+{len(parts)}-part-B" if len(parts) > 1 else ""
    name += "+halved-last-wave" if halves else ""
    return KernelSpec("matmul", name, emit(epi, norm, target.dot_precision, tma, len(parts),
                                           b_trans, halves),
                      "matmul_kernel", grid, args, cfg, num_warps=warps, num_stages=stages)


def _matvec(node, graph, target: Target, k, row_norm: bool, few: bool = False) -> KernelSpec:
    """One row (few: up to matvec.FEW_ROWS rows, each program taking them all): the
    matrix-vector kernel, B's weights read in place where its column tiles fit the parts
    (else the load-time concatenation)."""
    kk, n = graph[node.inputs[0]].shape[1], node.shape[1]
    parts = weight_parts(graph, node.inputs[1])
    splits = not row_norm  # a row's post-norm counts whole column tiles

    def tiles_for(b_trans: bool) -> dict:
        if few:
            return matvec.few_tiles(n, kk, k.paired, target, bool(k.prologue))
        return matvec.tiles(n, kk, k.paired, b_trans, target, splits)
    cfg = tiles_for(storage(graph, parts[0])[1])
    if len(parts) > 1 and not parts_fit(graph, parts, k.paired, n, cfg["BLOCK_N"]):
        parts = [node.inputs[1]]
        cfg = tiles_for(storage(graph, parts[0])[1])
    return matvec.build(node, graph, target, [storage(graph, p) for p in parts], cfg, k)
