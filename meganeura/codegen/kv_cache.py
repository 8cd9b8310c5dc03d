"""KV-cache write: the new keys (or values) into their slots. One program per (row, column block).

    cache[pos[i] % slots, :] = x[i, :]   for the rows a ring of `slots` rows keeps:
                                         pos[i] > pos[S-1] - slots
    cache[i * slots + pos[i] % slots, :] = x[i, :]   a batched step: row i is sequence i's

A full-attention layer's cache has a slot per position (`slots` = capacity, the modulo
never wraps); a sliding-window layer's is a ring of `window + reach - 1` slots (models/kv.py). Rows older than the
ring's reach are skipped, so no two programs write one slot. The cache is persistent
state: the kernel updates it in place, and the plan node stands for the updated cache.

bytes: 2 * elem * S * width (rows read and written); no FLOPs
"""

from __future__ import annotations

from .common import HEADER, KernelSpec, Target, cdiv, indent, next_pow2


def emit(sequences: int) -> str:
    if sequences == 1:
        where = """last = tl.load(pos_ptr + S - 1).to(tl.int64)
mask = (cols < D) & (p + 0 * cols > last - SLOTS)  # a row the ring still holds
slot = p % SLOTS"""
    else:  # row i is sequence i's: its block of SLOTS rows
        where = """mask = cols < D
slot = row.to(tl.int64) * SLOTS + p % SLOTS"""
    return HEADER + "def cache_write_kernel(x_ptr, pos_ptr, cache_ptr, S, SLOTS, D, stride_x, " \
        "stride_c, BLOCK_D: tl.constexpr):\n" + indent(f"""
row = tl.program_id(0)
cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
p = tl.load(pos_ptr + row).to(tl.int64)
{where}
x = tl.load(x_ptr + row.to(tl.int64) * stride_x + cols, mask=mask, other=0.0)
tl.store(cache_ptr + slot * stride_c + cols, x.to(cache_ptr.dtype.element_ty), mask=mask)
""", 4) + "\n"


def build(node, graph, target: Target) -> KernelSpec:
    cache, x, pos = (graph[i] for i in node.inputs)
    s, d = x.shape
    b = node.attrs.get("sequences", 1)
    bd = min(next_pow2(d), 128 if target.interpreted else 1024)
    args = [("node", x.id), ("node", pos.id), ("node", cache.id), ("value", s),
            ("value", cache.shape[0] // b), ("value", d), ("stride", x.id), ("stride", cache.id)]
    return KernelSpec("kv_cache", "write" if b == 1 else "write-batch", emit(b),
                      "cache_write_kernel", (s, cdiv(d, bd)), args, dict(BLOCK_D=bd),
                      num_warps=4, num_stages=1)
