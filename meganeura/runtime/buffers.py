"""Buffer liveness and reuse for the plan's run-time tensors.

Every launch writes one output. A view (column slice) shares its base's storage,
so a base stays live until the last reader of any of its views. Outputs of the
graph live to the end. Buffers are allocated once, at load, and a buffer whose
tensor is dead is handed to the next launch that needs the same number of
elements.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..compiler.plan import Plan


@dataclass
class BufferPlan:
    slot_of: dict[int, int]  # launch node -> buffer slot
    sizes: list[int]  # elements per slot
    fp32: list[bool]  # slot holds fp32 (the residual stream) rather than the plan dtype

    def allocate(self, dtype, device) -> list[torch.Tensor]:
        return [torch.empty(n, dtype=torch.float32 if wide else dtype, device=device)
                for n, wide in zip(self.sizes, self.fp32)]

    def nbytes(self, dtype) -> int:
        item = torch.finfo(dtype).bits // 8
        return sum(n * (4 if wide else item) for n, wide in zip(self.sizes, self.fp32))


def plan_buffers(plan: Plan) -> BufferPlan:
    g = plan.graph
    order = {nid: k for k, nid in enumerate(plan.launches)}
    base = {}  # run-time node -> the launch that owns its storage
    for nid in sorted(plan.launches + plan.views):
        n = g[nid]
        # a view of an input (or of a weight) owns no buffer
        base[nid] = base.get(n.inputs[0]) if nid in plan.views else nid
    last = {nid: order[nid] for nid in plan.launches}
    for nid in plan.launches:
        for i in g[nid].inputs:
            if base.get(i) is not None:
                last[base[i]] = max(last[base[i]], order[nid])
    for o in g.outputs:
        if base.get(o) is not None:
            last[base[o]] = math.inf
    wide = plan.fp32_stream
    free: dict[tuple[int, bool], list[int]] = {}
    sizes: list[int] = []
    fp32: list[bool] = []
    slot_of: dict[int, int] = {}
    dying: dict[int, list[int]] = {}  # launch position -> slots free after it
    for k, nid in enumerate(plan.launches):
        key = (math.prod(g[nid].shape), nid in wide)
        pool = free.get(key)
        if pool:
            slot = pool.pop()
        else:
            slot = len(sizes)
            sizes.append(key[0])
            fp32.append(key[1])
        slot_of[nid] = slot
        if last[nid] != math.inf:
            # readers at the same position still need it: release only after `last`
            dying.setdefault(last[nid], []).append(slot)
        for s in dying.pop(k, []):
            free.setdefault((sizes[s], fp32[s]), []).append(s)
    return BufferPlan(slot_of, sizes, fp32)
