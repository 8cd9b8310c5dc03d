"""Kernel archetypes: templates that emit Triton source text from plan nodes.

One file per archetype. `kernel_for` picks the archetype of a plan node; the
archetype decides the variant (prologue, epilogue, mask kind) from the fused op
and emits its source.
"""

from __future__ import annotations

from ..errors import MeganeuraError
from . import attention, decode_attention, embedding, kv_cache, matmul, pointwise, rowwise
from .common import KernelSpec, Target, dependent_launch

ARCHETYPES = {op: mod for mod in (matmul, rowwise, attention, decode_attention, embedding,
                                  pointwise, kv_cache)
              for op in mod.OPS}


def kernel_for(node, graph, target: Target) -> KernelSpec:
    if node.op not in ARCHETYPES:
        raise MeganeuraError(f"no kernel archetype runs {node.op} at run time ({graph.label(node.id)})")
    spec = ARCHETYPES[node.op].build(node, graph, target)
    return dependent_launch(spec) if target.pdl and not target.interpreted else spec


__all__ = ["ARCHETYPES", "KernelSpec", "Target", "kernel_for"]
