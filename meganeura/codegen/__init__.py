"""Kernel archetypes: templates that emit Triton source text from plan nodes.

One file per archetype, named by the op table's `archetype` of the node (a fused kernel's
is its op: product, rows, pointwise, gather). The archetype reads the node's kernel
(compiler/kernels.py: its own operands, its prologue and epilogue stages) and emits its
source; element stages come from codegen/elementwise.py.
"""

from __future__ import annotations

from ..compiler.ops import OPS
from ..errors import MeganeuraError
from . import (attention, attention_grad, decode_attention, embedding, embedding_grad, experts,
               kv_cache, linear_loss, matmul, norm_grad, place, pointwise, product_tn, row_loss,
               rowwise)
from .common import KernelSpec, Target, dependent_launch

ARCHETYPES = {"product": matmul, "rows": rowwise, "pointwise": pointwise, "gather": embedding,
              "attention": attention, "decode_attention": decode_attention, "kv_cache": kv_cache,
              "product_tn": product_tn, "norm_grad": norm_grad, "place": place,
              "row_loss": row_loss, "embedding_grad": embedding_grad,
              "attention_grad": attention_grad, "linear_loss": linear_loss,
              "moe_route": experts, "experts": experts}


def kernel_for(node, graph, target: Target) -> KernelSpec:
    module = ARCHETYPES.get(OPS[node.op].archetype)
    if module is None:
        raise MeganeuraError(f"no kernel archetype runs {node.op} at run time ({graph.label(node.id)})")
    spec = module.build(node, graph, target)
    return dependent_launch(spec) if target.pdl and not target.interpreted else spec


__all__ = ["ARCHETYPES", "KernelSpec", "Target", "kernel_for"]
