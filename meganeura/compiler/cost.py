"""Shape-aware roofline cost of every candidate kernel.

    time = max(bytes / bandwidth, matmul_flops / matmul_peak + vector_flops / vector_peak)
           + launch_overhead

bytes: each input read once and the output written once, at the plan's element size
(an embedding reads only the rows it gathers; a slice input only its columns).
matmul_flops run on the tensor cores; vector_flops (norm statistics, rotations,
exponentials, epilogues) on the ordinary units. A fused kernel is costed from its
own reads, writes and FLOPs: no hand-set discount. A norm prologue is recomputed by
every column tile of its matmul, so it costs vector FLOPs that grow with N: that is
what can make a shared, materialized norm win over recomputing it in many matmuls.
Views (slice_cols) and parameter-only subterms (evaluated once at load time) cost
nothing at run time. A profile may carry efficiencies measured on the device (how much
of the ceiling the generated matmul, norm-prologue matmul and attention kernels reach),
which divide the compute time: the extractor then decides with what the kernels do,
not with what the datasheet promises.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from .kernels import Kernel, holds_stream, kernel_of, unrunnable
from .ops import OPS


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    bandwidth: float  # bytes/s, device memory (copy: read + write)
    matmul_flops: float  # FLOP/s on the matrix units at the plan dtype
    vector_flops: float  # FLOP/s of elementwise work
    launch: float  # s per kernel launch (inside a CUDA graph on GPUs)
    tile_n: int = 128  # output columns per matmul program: a prologue is recomputed per tile
    # output columns per program of a one-row product, where a norm prologue is recomputed
    # per program; 0: as the GPU's matrix-vector kernel picks them (row_columns)
    row_tile_n: int = 0
    # Calibration from measured kernels (1.0 = the roofline ceiling is reached):
    matmul_efficiency: float = 1.0  # share of matmul_flops the generated matmuls reach
    prologue_efficiency: float = 1.0  # rate of a norm-prologue matmul relative to a plain one
    attention_efficiency: float = 1.0  # share of matmul_flops the attention kernel reaches
    # Wave model: the SMs that run matmul tiles (0: none, every tile slot counts as busy).
    # A last wave that fills few SMs leaves the rest idle: compute / wave_fill.
    sms: int = 0
    # Attention time outside the key loop (q loads, output, per-row softmax state), in
    # seconds per query element (rows x heads x padded head width) over the whole device.
    attention_row_time: float = 0.0
    # share of matmul_flops the fused lm_head + loss kernels (codegen/cross_entropy.py)
    # reach over the SMs their programs fill
    loss_efficiency: float = 1.0
    # seconds a program costs on its own (the interpreter runs each in Python; a GPU's are
    # in the roofline); priced where a kernel reports its programs (the expert kernels,
    # whose forms differ most in how many programs they run)
    program_time: float = 0.0


# Ceilings measured on one H200 (docs/design.md, the cost model): ~4.3 TB/s copy, ~790 TFLOP/s
# bf16 matmul.
H200_ROOFLINE = DeviceProfile("h200-roofline", bandwidth=4.3e12, matmul_flops=790e12,
                              vector_flops=60e12, launch=3e-6, tile_n=256)
# The same ceilings with what the generated kernels reached on the H200 (Triton 3.6,
# benchmarks/results/prefill.csv and kernel-sweep-*.log, 2026-11-30, bf16):
# - matmuls ~86% of peak over the tiles' waves (4b SwiGLU 728 TFLOP/s at fill 0.97,
#   lm_head 689, 12b SwiGLU 662), times the wave fill of the tile the kernel uses (4b's
#   N=2560 products: 320 tiles of 128x128 on 132 SMs, fill 0.81);
# - a norm-prologue matmul whose A operand is the fp32 residual stream: 238 TFLOP/s
#   against ~690 for a plain one (A goes through registers to be squared and cast),
#   0.30 of a plain matmul's rate;
# - attention: 57.5% of peak in the key loop plus 2.6 ps per query element (fits 4b
#   causal 2048 and 8192, sliding 8192 within 1%; 12b's 256-wide heads within 10%).
# - the fused lm_head + loss kernels: 20.6 TFLOP/s for e2b's statistics at 2048 tokens
#   (2 T V H = 1.65e12 FLOPs in 80.0 ms, 32 programs of 64 rows: a fill of 0.24), 15.6 for
#   its d(hidden) (two logits passes, 212 ms), measured on an H100 (2026-12-06, benchmarks/
#   train.py --breakdown at 8fd3a78): 0.10 of the ceiling at the SMs they fill.
H200 = dataclasses.replace(H200_ROOFLINE, name="h200", matmul_efficiency=0.86,
                           prologue_efficiency=0.30, attention_efficiency=0.575, sms=132,
                           attention_row_time=2.6e-12, loss_efficiency=0.10)
# Triton's interpreter runs each program in Python with numpy: launches dominate.
# A program of the expert kernels took about 30 ms there (a 16-row prefill chunk of a
# 3-layer MoE checkpoint: 48 one-pair programs a layer, 1.5 s).
CPU_INTERPRETER = DeviceProfile("cpu-interpreter", bandwidth=2e9, matmul_flops=2e10,
                                vector_flops=1e9, launch=1e-3, tile_n=32, row_tile_n=8,
                                program_time=0.03)
PROFILES = {p.name: p for p in (H200, H200_ROOFLINE, CPU_INTERPRETER)}

ELEMENT_BYTES = {"fp32": 4, "bf16": 2}

# The training plans' exchange rate of memory for time: 3.5 ms of step per GiB of
# activations stored, what transformers + Liger trades on gemma4-e2b's full fine-tuning
# (measured on an H100: 43.6 ms more a step for 12.4 GiB less, docs/design.md). At that rate
# the fused lm_head + loss kernels, as measured (loss_efficiency), still lose to storing the
# [tokens, vocab] logits and their gradient at Gemma-4's sizes (tests/test_autodiff.py).
MEMORY_PRICE = 3.5e-3 / 2**30
ID_BYTES = 8  # token ids arrive as int64
# the logits of a chunk of rows that linear_cross_entropy_dh's kernels hold at once, at most
# (a vocabulary of 262144 in bf16: 512 rows; codegen/linear_loss.py)
LOGITS_BYTES = 1 << 28


@dataclass(frozen=True)
class Work:
    bytes: float
    matmul_flops: float = 0.0
    vector_flops: float = 0.0
    efficiency: str | None = None  # which calibration factor applies to the compute time
    fill: float = 1.0  # share of the SMs' tile slots busy over the matmul's waves
    fixed: float = 0.0  # seconds outside the FLOP loop (attention's per-row work)
    serial_flops: float = 0.0  # vector FLOPs that do not hide under the memory stream
    programs: float = 0.0  # programs the kernel runs, where the profile prices each


def _numel(shape) -> int:
    return math.prod(shape)


def attention_pairs(s: int, window: int | None) -> int:
    """(query, key) pairs a causal (or sliding-window) mask allows: sum_i min(i + 1, window)."""
    if window is None or window >= s:
        return s * (s + 1) // 2
    return window * (window + 1) // 2 + (s - window) * window


def head_dim_chunks(hd: int) -> tuple[int, ...]:
    """Power-of-two column chunks the attention kernel splits a head into.

    Up to 256: two chunks when hd is the sum of two powers of two (the second at least 16
    wide for the matrix units): 144 -> (128, 16), 160 -> (128, 32); otherwise one chunk of
    next_pow2(hd), its padding masked: 128 -> (128,), 132 -> (256,), 240 -> (256,). A partly
    used second chunk (132 = 128 + 4 of 16) computed wrong values on the H200 (Triton 3.6)
    though right in the interpreter, so it is not used. Wider heads (the published model's
    512) split into exact 256-wide chunks where they divide, else one padded chunk.
    """
    one = max(16, 1 << (hd - 1).bit_length())
    if hd > 256 and hd % 256 == 0:
        return (256,) * (hd // 256)
    d0 = 1 << (hd.bit_length() - 1)
    rest = hd - d0
    if hd <= 256 and rest >= 16 and rest & (rest - 1) == 0:
        return d0, rest
    return (one,)


# A half-height tile's time against a whole tile's (the same B tile streamed for half the
# rows), by tile width: what the last wave costs when its tiles run as twice as many halves.
# Measured on the H200 with every tile of a product halved (benchmarks/kernel_sweep.py
# --only halves, results/kernel-sweep-2026-12-01-h200-d799623-halves.log): 0.72-0.86 for
# 128x128 tiles (K 256 to 18432), 0.55-0.60 for 128x256.
HALF_TILE_TIME = {128: 0.8, 256: 0.6}


def wave_fill(m: int, n: int, bm: int, bn: int, sms: int, halves: bool = False) -> float:
    """Share of the SMs' tile slots over the waves that does useful work: 1.0 when the last
    wave is full and the tiles divide M x N; edge tiles count for their useful part.

    halves: the tiles past the last full wave run as half-height tiles, two per tile, each
    taking HALF_TILE_TIME of a whole tile's time."""
    if sms <= 0:
        return 1.0
    tiles = -(-m // bm) * -(-n // bn)
    if halves:
        rest = tiles % sms
        waves = (tiles - rest) / sms + -(-2 * rest // sms) * HALF_TILE_TIME.get(bn, 0.8)
    else:
        waves = -(-tiles // sms)
    return m * n / (bm * bn * waves * sms)


def tn_tiles(t: int, m: int, n: int, sms: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, shares of T) of the reduction product C [m, n] = A^T B on a GPU:
    128x128 tiles, a thin side (a LoRA adapter's rank) as narrow as the matrix units take
    (16, 32, 64); where the tiles leave SMs idle, T split so that about two programs an SM
    run, each share 8 K steps of 64 rows at least."""
    bm = 128 if m > 64 else max(16, 1 << (m - 1).bit_length())
    bn = 128 if n > 64 else max(16, 1 << (n - 1).bit_length())
    tiles = -(-m // bm) * -(-n // bn)
    if not sms or tiles >= sms:
        return bm, bn, 1
    return bm, bn, max(1, min(-(-2 * sms // tiles), t // 512))


def matmul_tile(m: int, n: int, paired: bool, sms: int) -> tuple[int, int]:
    """Output tile of the generated matmul on a GPU (M > 64, 2-byte operands): 128x128
    for paired gate/up products (two accumulators); else 128x256 unless its waves leave
    the last one mostly empty (fill < 0.85), then 128x128. A thin product (N <= 32: a LoRA
    adapter's rank) takes tiles of 64 rows and its own width, twice as many programs
    streaming A as 128-row tiles would run, none of them computing padding columns."""
    if not paired and n <= 32:
        return 64, max(16, 1 << (n - 1).bit_length())
    if paired or wave_fill(m, n, 128, 256, sms) < 0.85:
        return 128, 128
    return 128, 256


def row_columns(n: int, k: int, paired: bool, b_trans: bool, elem: int = 2) -> int:
    """Output columns a program of the one-row product owns on a GPU, as codegen/matvec.py's
    tiles picks them in the main (from its sweeps): over [N, K] weights 8 (paired: at most
    96 KB of G and U a program), 16 for rows of 4096 and more, 4 for the widest products,
    fewer where a program would read more than 40 KB; over [K, N] weights 16 to 64."""
    if not b_trans:
        return 32 if paired else 64 if n >= 65536 else 16
    if paired:
        cols, budget = 8, 96 * 1024 // 2
    elif k >= 4096 and n < 65536:
        return 16
    else:
        cols, budget = (4 if n >= 65536 else 8), 40 * 1024
    while cols > 1 and cols * elem * k > budget:
        cols //= 2
    return cols


def halve_last_wave(m: int, n: int, bm: int, bn: int, sms: int) -> bool:
    """Whether the product runs the tiles of its last, partial wave as half-height tiles
    (twice as many, on SMs that would idle): priced against whole tiles by the wave model.
    (Like matmul_tile, this prices the 2-byte tiles; an fp32 plan's 64-row tiles are not
    halved, and its products are priced as if they were.)"""
    return wave_fill(m, n, bm, bn, sms, True) > wave_fill(m, n, bm, bn, sms)


# What ending a one-row product with its row's post-norm adds to the product, measured on
# the H200 (Triton 3.6, e4b's decode step, results/decode-2026-12-01-h200-529bb5d-e4b-post-norm.log):
# every column tile stores its values and counts itself (a fenced atomic at L2, two levels),
# and the last one's pass over the row is a chain of dependent L2 round trips. The o
# projection went from 3.13 to 6.34 us, the per-layer-input projection from 1.30 to 4.52,
# the down projection (1280 tiles) from 13.5 to 20.0, against 1.5 us for the row kernel
# they replace: the fused form loses there, and the extractor keeps the row kernel. Where
# launches cost more than that (the interpreter), it wins.
ROW_NORM_TAIL = 5e-6


def work(op: str, attrs: dict, ins: list[tuple], out: tuple, elem: int) -> Work | None:
    """Bytes and FLOPs of one kernel computing `op` (a base op or a structured kernel); None
    for ops that launch nothing."""
    spec = OPS[op]
    if spec.kind != "compute":
        return None  # leaves, views, and layout ops (read in place or made at load time)
    k = kernel_of(op, attrs, len(ins))
    if k is not None and unrunnable(k):
        return Work(math.inf)  # no kernel runs these stages together (kernels.unrunnable)
    arch = k.archetype if k is not None else spec.archetype
    io = elem * (sum(_numel(s) for s in ins) + _numel(out))
    if arch == "kv_cache":  # a cache write: its rows read and written, the cache untouched
        return Work(2 * elem * _numel(ins[1]))
    if arch == "decode_attention":  # each row against its reach of cached keys, at most
        b, rows, heads = attrs.get("sequences", 1), ins[0][0], attrs["num_heads"]
        slots = ins[1][0] // b
        keys = min(attrs.get("window") or slots, slots)
        width = ins[1][1]
        # K and V of its keys for each row of a decode step; a chunk's tiles of about 16
        # rows read their keys once
        reads = rows if b > 1 or rows == 1 else -(-rows // 16)
        io = elem * (2 * _numel(ins[0]) + 2 * width * (keys + rows) * reads)
        return Work(io, 0.0, 4 * heads * attrs["head_dim"] * keys * rows)
    if arch == "attention":
        s = ins[0][0]
        pairs = attention_pairs(s, attrs.get("window"))
        heads = attrs["num_heads"]
        width = sum(head_dim_chunks(attrs["head_dim"]))  # the padded width the kernel runs
        fixed = s * heads * width * attrs.get("_row_time", 0.0)
        return Work(io, 4 * heads * width * pairs, 6 * heads * pairs, "attention", fixed=fixed)
    if arch == "product":
        return _product(k, attrs, ins, out, io)
    if arch == "norm_grad":  # d x a few rows a program; d w spans of rows added by atomics
        return Work(io, 0.0, spec.vector_flops * _numel(ins[1]))
    if arch == "attention_grad":  # the forward's products five times over (stats 2, dq 3,
        # dk | dv 5 a block pair, codegen/attention_grad.py); 8 bytes a row and column of each
        # head's dk | dv share in groups of several heads, written and read once
        s = ins[0][0]
        pairs = attention_pairs(s, attrs.get("window") or None)
        heads, width = attrs["num_heads"], sum(head_dim_chunks(attrs["head_dim"]))
        shares = 16 * heads * s * attrs["head_dim"] if heads > attrs["num_kv_heads"] else 0
        return Work(4 * io + shares, 20 * heads * width * pairs, 24 * heads * pairs,
                    "attention")
    if arch == "linear_loss" and op == "linear_cross_entropy_dh":
        # chunk by chunk (codegen/linear_loss.py): the logits' product, its rows read twice
        # and written once, d h's product; the weight read per chunk of
        # LOGITS_BYTES // (elem * v) rows, d h's shares written and read in fp32
        (t, h), v = ins[0], ins[1][0]
        chunks = -(-t * elem * v // LOGITS_BYTES)
        sms = attrs.get("_sms", 0)
        fill = wave_fill(min(t, -(-t // chunks)), v, 128, 128, sms)
        return Work(elem * (4 * t * v + 2 * chunks * v * h + 2 * t * h) + 16 * t * h,
                    4 * t * v * h, 16 * t * v, "matmul", fill)
    if arch == "linear_loss":  # the logits recomputed by each kernel, then a gradient's product
        (t, h), v = ins[0], ins[1][0]
        passes = 2 if op in ("linear_cross_entropy_grad_h", "linear_cross_entropy_grad_w") else 1
        # a program per 64 rows (per 64 vocabulary ids for d w): few programs at short lengths
        programs = -(-(v if op == "linear_cross_entropy_grad_w" else t) // 64)
        sms = attrs.get("_sms", 0)
        fill = min(1.0, programs / sms) if sms else 1.0
        return Work(elem * passes * (t * h + v * h * -(-t // 64)), passes * 2 * t * v * h,
                    8 * t * v * passes, "loss", fill)
    if arch == "embedding_grad":  # the table's gradient zeroed, the rows added by atomics
        return Work(4 * _numel(out) + (elem + 8) * _numel(ins[1]), 0.0, _numel(ins[1]))
    if arch in ("row_loss", "place"):  # rows of logits (twice more for the gradient); a copy
        reads = 3 if op == "cross_entropy_grad" else 1
        return Work(elem * (reads * _numel(ins[0]) + _numel(out)), 0.0, 4 * _numel(ins[0]))
    if arch == "product_tn":  # A^T B: A and B streamed once per tile row / column, C fp32
        # (its shares' sums written and read in fp32 where T is split)
        (t, m), n, sms = ins[0], ins[1][1], attrs.get("_sms", 0)
        bm, bn, split = tn_tiles(t, m, n, sms)
        reads = elem * t * (m * -(-n // bn) + n * -(-m // bm))
        programs = -(-m // bm) * -(-n // bn) * split
        return Work(reads + 4 * m * n * (1 + 2 * (split > 1)), 2 * m * n * t, 0.0, "matmul",
                    min(1.0, programs / sms) if sms else 1.0)
    if arch == "moe_route":  # a row of logits in, k weights and indices out
        return Work(elem * _numel(ins[0]) + 4 * (_numel(ins[1]) + _numel(out)), 0.0,
                    spec.vector_flops * _numel(ins[0]), programs=-(-ins[0][0] // 16))
    if arch == "experts":
        return _experts(op, attrs, ins, out, elem)
    vec = sum(OPS[st.op].vector_flops for st in k.epilogue)
    operands = _stage_operands(k, ins)
    if arch == "gather":  # only the rows it gathers are read
        return Work(ID_BYTES * _numel(ins[0]) + 2 * elem * _numel(out) + elem * operands, 0.0,
                    vec * _numel(out))
    if k.updates() is not None:  # rows written into their cache slots
        rows = _numel(ins[k.main[0]])
        return Work(2 * elem * rows + elem * operands, 0.0, vec * rows)
    return Work(io, 0.0, vec * _numel(out))


# The sort of the pairs by expert that a grouped expert product launches first
# (codegen/experts.py): two short launches over the routes, a program per chunk of pairs.
EXPERT_SORT = 5e-6


def _experts(op: str, attrs: dict, ins: list[tuple], out: tuple, elem: int) -> Work:
    """Expert products read each chosen expert's weights: one token's k pairs each stream
    their expert (the one-token path, and the fused combine at every token count); more
    tokens sort their pairs by expert, and each tile of one expert's pairs streams its
    weights once, the pairs' rows once (L2 serves a row tile's other column tiles)."""
    routed = op.endswith("_routed")  # each program routes its token from the logits
    if routed:
        logits = ins[-3]
        tokens, k = logits[0], attrs["top_k"]
        route_bytes = elem * (_numel(logits) + logits[1])
    else:
        tokens, k = ins[1][0], ins[1][1] // 2
        route_bytes = 4 * _numel(ins[1])
    pairs = tokens * k
    # programs as the interpreter's tiles run them (only a profile with a program_time
    # prices them): 32 columns, 16 rows
    cols = -(-out[1] // 32)
    if op == "expert_combine":
        return Work(elem * (_numel(ins[0]) + _numel(out)) + route_bytes, 0.0,
                    2 * _numel(ins[0]), programs=-(-tokens // 16) * -(-out[1] // 128))
    (experts, n_w, kdim), x = ins[-1], ins[0]
    flops = 2 * pairs * n_w * kdim
    if routed or op == "expert_matmul_combine" or tokens == 1:
        reads = elem * (pairs * n_w * kdim + _numel(x) + _numel(out)) + route_bytes
        vec = 2 * _numel(out) + (3 * _numel(x) if op == "expert_glu_routed" else 0)
        per_pair = not op.startswith("expert_matmul_combine")
        return Work(reads, flops, vec, "matmul", programs=(pairs if per_pair else tokens) * cols)
    from ..codegen.experts import grouped_tiles  # the tiles codegen runs
    glu = op == "expert_glu"
    bm, bn, _, _ = grouped_tiles(pairs, experts, glu, False)
    tiles = max(min(experts, pairs), -(-pairs // bm))
    col_tiles = -(-out[1] // bn)
    # the pairs' rows once: a row tile's other column tiles find them in L2 (at 2048 tokens
    # the tile widths that re-read them most ran fastest, benchmarks/moe_sweep.py)
    reads = elem * (tiles * n_w * kdim + pairs * kdim + _numel(out)) + route_bytes
    sms = attrs.get("_sms", 0)
    fill = min(1.0, pairs / (tiles * bm)) * (min(1.0, tiles * col_tiles / sms) if sms else 1.0)
    programs = 1 + (-(-pairs // 16) + min(experts, pairs)) * cols
    return Work(reads, flops, 2 * _numel(out), "matmul", fill, fixed=EXPERT_SORT,
                programs=programs)


def _stage_operands(k: Kernel, ins: list[tuple]) -> int:
    """Elements of the stages' operands the kernel reads (weights, residuals), not counting
    the state it writes in place or integer indices (positions)."""
    read = set()
    for st in k.stages:
        spec = OPS[st.op]
        roles = [r for j, r in enumerate(spec.inputs) if j != st.at]
        for pos, role in zip(st.operands, roles):
            if role not in spec.indices and not (spec.inplace and role == spec.inputs[0]):
                read.add(pos)
    return sum(_numel(ins[i]) for i in read)


def _product(k: Kernel, attrs: dict, ins: list[tuple], out: tuple, io: float) -> Work:
    """A product with its prologue and epilogue: tiles over the SMs' waves."""
    (m, kk), n = ins[0], ins[1][1]
    vec = 2 * _numel(out)  # epilogue: cast, add, activation * up, or soft-cap
    sms = attrs.get("_sms", 0)
    fill = 1.0
    if m > 64:
        bm, bn = matmul_tile(m, n, k.paired, sms)
        # whole tiles, or the last wave halved where that fills more (halve_last_wave; the
        # codegen halves tiles of 128 rows only)
        fill = max(wave_fill(m, n, bm, bn, sms),
                   wave_fill(m, n, bm, bn, sms, True) if bm >= 128 else 0.0)
    if any(OPS[st.op].locality == "row" for st in k.epilogue):
        # the row's norm waits on the row's every column tile: only a one-row product
        # (whose last tile to finish normalizes it) runs it
        if m > 1:
            return Work(math.inf)
        # the product's values to the workspace and back (L2), 5 FLOPs an element of the row
        return Work(io + 8 * n, 2 * m * n * kk, 7 * n, "matmul", fixed=ROW_NORM_TAIL)
    if k.prologue and m == 1:  # every program sums the row's squares and scales it again:
        # measured on the H100 (benchmarks/fusion_ab.py at 8c31ae9), the 31b lm_head with the
        # norm as prologue took 942.8 us against 915.5 for a norm kernel and the product: that
        # recomputation (131072 programs over 5376 values) does not hide under the weights
        out_n = n // 2 if k.paired else n
        cols = attrs["_row_tile_n"] or row_columns(out_n, kk, k.paired, attrs.get("_b_trans", True))
        serial = 3 * kk * math.ceil(out_n / cols)
        return Work(io, 2 * m * n * kk, vec + m * n, "matmul", fill, serial_flops=serial)
    if k.prologue:  # sum(x^2) and x * w over the A tiles, per column tile
        vec += 3 * m * kk * math.ceil(n / attrs["_tile_n"]) + m * n
        return Work(io, 2 * m * n * kk, vec, "prologue", fill)
    return Work(io, 2 * m * n * kk, vec, "matmul", fill)


def kernel_time(profile: DeviceProfile, w: Work) -> float:
    compute = w.matmul_flops / profile.matmul_flops + w.vector_flops / profile.vector_flops
    if w.efficiency == "matmul":
        compute /= profile.matmul_efficiency * w.fill
    elif w.efficiency == "prologue":
        compute /= profile.matmul_efficiency * profile.prologue_efficiency * w.fill
    elif w.efficiency == "attention":
        compute /= profile.attention_efficiency
    elif w.efficiency == "loss":
        compute /= profile.loss_efficiency * w.fill
    serial = w.serial_flops / profile.vector_flops
    return (max(w.bytes / profile.bandwidth, compute) + serial + w.fixed + profile.launch +
            w.programs * profile.program_time)


@dataclass(frozen=True)
class CostModel:
    """Prices e-nodes and graph nodes for one device and plan dtype."""

    profile: DeviceProfile
    dtype: str = "bf16"
    # seconds per byte a kernel's output holds: 0 prices time alone (inference, where a
    # plan's tensors live a layer); a training plan holds activations from the forward to
    # the backward, and the price makes keeping versus recomputing a trade the extractor
    # weighs (see MEMORY_PRICE)
    memory_price: float = 0.0
    # a training plan holds in fp32 the forward products' outputs that only row and
    # pointwise kernels or fused stages read (norms, RoPE, GeGLU, the loss, residual adds):
    # a bf16 rounding there moves the gradients, where a product's operand is rounded
    # anyway (plan.wide_products)
    fp32_products: bool = False

    def stored(self, op: str, attrs: dict, out: tuple) -> float:
        """The memory price of a kernel's output (views store nothing; the residual stream
        and the fp32 outputs are held in fp32, plan.holds_fp32)."""
        if not self.memory_price or OPS[op].kind in ("view", "leaf"):
            return 0.0
        elem = 4 if holds_stream(op, attrs) else ELEMENT_BYTES[self.dtype]
        return self.memory_price * _numel(out) * elem

    def time(self, op: str, attrs: dict, ins: list[tuple], out: tuple,
             b_trans: bool = True) -> float:
        """Seconds of one kernel. b_trans: a product's B is stored [N, K] (a checkpoint's
        linear weight), which decides how a one-row product's columns are shared out."""
        attrs = {**attrs, "_tile_n": self.profile.tile_n, "_row_tile_n": self.profile.row_tile_n,
                 "_sms": self.profile.sms, "_b_trans": b_trans,
                 "_row_time": self.profile.attention_row_time}
        w = work(op, attrs, ins, out, ELEMENT_BYTES[self.dtype])
        return 0.0 if w is None else kernel_time(self.profile, w)

    def graph_time(self, graph) -> float:
        """Estimated time of running every run-time node of `graph` as its own kernel."""
        memo: dict = {}
        return sum(self.time(n.op, n.attrs, [graph[i].shape for i in n.inputs], n.shape,
                             stored_transposed(graph, n))
                   for n in graph.nodes if not graph.load_time(n.id, memo))


def stored_transposed(graph, node) -> bool:
    """Whether the node's second operand (a product's B) is a weight stored [N, K]: a
    transpose, or a concatenation of transposes."""
    if len(node.inputs) < 2:
        return False
    stack, seen = [node.inputs[1]], False
    while stack:
        n = graph[stack.pop()]
        if n.op == "concat_cols":
            stack.extend(n.inputs)
        elif n.op == "transpose":
            seen = True
        else:
            return False
    return seen
