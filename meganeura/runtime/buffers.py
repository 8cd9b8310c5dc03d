"""Buffer liveness and placement for the plan's run-time tensors.

Every launch writes one output. A view (column slice) shares its base's storage,
so a base stays live until the last reader of any of its views. Outputs of the
graph live to the end. All buffers are carved out of one arena allocated at load:
each gets a byte offset such that two buffers overlap in memory only if their
lifetimes (first write to last read) do not overlap. The arena is as large as the
most memory live at once (plus fragmentation), so the logits of the last matmul
reuse the memory every layer's activations used before.

A plan without state (a forward) may keep its inputs there too: they are written before
the first launch (position -1) and live to their last reader, so the token ids sit in
memory the logits take only later. The caller copies them in before every run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..compiler.kernels import updated_input
from ..compiler.plan import Plan

ALIGN = 256  # bytes; every buffer starts on a multiple (tensor descriptors need 16)


@dataclass
class BufferPlan:
    offset: dict[int, int]  # owner (a launch, or an input placed here) -> byte offset
    nbytes_of: dict[int, int]  # owner -> bytes
    life: dict[int, tuple[int, float]]  # owner -> (position written, last position read)
    fp32: set[int]  # nodes that hold fp32 (the residual stream) rather than the plan dtype
    total: int  # arena bytes

    def allocate(self, device) -> torch.Tensor:
        return torch.empty(self.total, dtype=torch.uint8, device=device)

    def view(self, arena: torch.Tensor, nid: int, shape, dtype) -> torch.Tensor:
        o = self.offset[nid]
        flat = arena[o:o + self.nbytes_of[nid]].view(torch.float32 if nid in self.fp32 else dtype)
        return flat[:math.prod(shape)].view(shape)


def plan_buffers(plan: Plan, elem: int = 2, inputs: bool = False) -> BufferPlan:
    """elem: bytes per element of the plan dtype (fp32-stream buffers take 4, token ids 8).
    inputs: the graph's inputs are placed in the arena too (written at position -1)."""
    g = plan.graph
    order = {nid: k for k, nid in enumerate(plan.launches)}
    ins = [n.id for n in g.inputs()] if inputs else []
    order.update({nid: -1 for nid in ins})
    base = {nid: nid for nid in ins}  # run-time node -> the node that owns its storage
    for nid in sorted(plan.launches + plan.views):
        n = g[nid]
        # a view shares its base's buffer (none for a weight's, or an input's kept apart);
        # a cache write (its state) owns none
        if nid in plan.views:
            base[nid] = base.get(n.inputs[0])
        else:
            written = updated_input(n)
            base[nid] = nid if written is None else base.get(n.inputs[written])
    owners = ins + [nid for nid in plan.launches if base[nid] == nid]
    last = {nid: order[nid] for nid in owners}
    for nid in plan.launches:
        for i in g[nid].inputs:
            if base.get(i) is not None:
                last[base[i]] = max(last[base[i]], order[nid])
    for o in g.roots:
        if base.get(o) is not None:
            last[base[o]] = math.inf
    wide = plan.fp32_stream

    def size(nid: int) -> int:
        return 8 if g[nid].dtype == "u32" else 4 if nid in wide else elem

    nbytes = {nid: -(-math.prod(g[nid].shape) * size(nid) // ALIGN) * ALIGN for nid in owners}
    life = {nid: (order[nid], last[nid]) for nid in owners}
    # several placement orders, the smallest arena kept (offline dynamic storage allocation
    # has no cheap exact answer; which heuristic packs best depends on the plan)
    # (what lives to the end counts as longer lived than anything that dies)
    span = {nid: min(hi, 1 << 40) - lo + 1 for nid, (lo, hi) in life.items()}
    orders = [(sorted(owners, key=lambda i: (-nbytes[i], order[i])), False),
              (sorted(owners, key=lambda i: (-span[i], -nbytes[i], order[i])), True),
              (sorted(owners, key=lambda i: (-nbytes[i] * span[i], order[i])), True)]
    # (none packs below the most bytes live at once: the others are tried only where the
    # first is more than 1 % above it)
    floor = _most_live(nbytes, life)
    offset, total = _place(orders[0][0], nbytes, life, orders[0][1])
    for o, best in orders[1:]:
        if total <= floor * 1.01:
            break
        placed = _place(o, nbytes, life, best)
        if placed[1] < total:
            offset, total = placed
    return BufferPlan(offset, nbytes, life, set(wide) & set(owners), total)


def _most_live(nbytes: dict, life: dict) -> int:
    """The most bytes live at one position (a buffer is live from its write to its last
    read, both included)."""
    change: dict = {}
    for nid, (lo, hi) in life.items():
        change[lo] = change.get(lo, 0) + nbytes[nid]
        if hi != math.inf:
            change[hi + 1] = change.get(hi + 1, 0) - nbytes[nid]
    live = most = 0
    for at in sorted(change):
        live += change[at]
        most = max(most, live)
    return most


def _place(owners: list[int], nbytes: dict, life: dict, best_fit: bool) -> tuple[dict, int]:
    """Offsets of the buffers placed in this order, each clear of every placed buffer it lives
    with: at the lowest offset where it fits (first fit), or in the smallest gap it fits
    (best fit; past the end where none does); and the arena's size."""
    offset: dict[int, int] = {}
    placed: list[int] = []
    for nid in owners:
        lo, hi = life[nid]
        busy = sorted((offset[j], offset[j] + nbytes[j]) for j in placed
                      if life[j][0] <= hi and lo <= life[j][1])
        at, chosen, gap = 0, None, None
        for start, end in busy:
            room = start - at
            if room >= nbytes[nid]:
                if not best_fit:
                    chosen = at
                    break
                if gap is None or room < gap:
                    chosen, gap = at, room
            at = max(at, end)
        offset[nid] = at if chosen is None else chosen
        placed.append(nid)
    return offset, max((offset[i] + nbytes[i] for i in owners), default=0)
