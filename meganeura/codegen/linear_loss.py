"""The lm_head, its soft-cap and the cross-entropy as one op of the plan, its logits never
stored: the kernels of codegen/cross_entropy.py, bound to plan nodes.

    linear_cross_entropy(h, w, labels)          the forward kernel: each row's loss (and its
                                                logsumexp, into a scratch buffer)
    linear_cross_entropy_grad_h(h, w, labels, d)  the forward kernel for the logsumexp, then
                                                  the d h kernel (rows owned by programs)
    linear_cross_entropy_grad_w(h, w, labels, d)  the same, then the d w kernel (vocabulary
                                                  tiles owned by programs)

The gradients add tile after tile into their fp32 output, zeroed before the launch.
"""

from __future__ import annotations

from .common import KernelSpec, Target, cdiv
from .cross_entropy import (ENTRY_DH, ENTRY_DW, ENTRY_FORWARD, dh_source, dw_source,
                            forward_source)

BLOCKS_CPU, BLOCKS_GPU = (16, 32, 16), (64, 64, 64)  # (BLOCK_M, BLOCK_V, BLOCK_K)


def build(node, graph, target: Target) -> KernelSpec:
    h, w, labels = (graph[i] for i in node.inputs[:3])
    t, width = h.shape
    v = w.shape[0]
    bm, bv, bk = BLOCKS_CPU if target.interpreted else BLOCKS_GPU
    cap = node.attrs["cap"]
    const = dict(HAS_CAP=cap > 0, BLOCK_M=bm, BLOCK_V=bv, BLOCK_K=bk)
    prec = target.dot_precision
    lse = ("scratch", ("ce_lse", (t,), "fp32"))
    tail = [("value", t), ("value", v), ("value", width), ("stride", h.id), ("stride", w.id)]
    head = [("node", h.id), ("node", w.id), ("node", labels.id), lse]
    if node.op == "linear_cross_entropy":
        rows = ("node", node.id)
    else:
        rows = ("scratch", ("ce_rows", (t,), "fp32"))
    forward = KernelSpec("linear_loss", "forward", forward_source(prec), ENTRY_FORWARD,
                         (cdiv(t, bm),), head + [rows] + tail + [("value", cap or 1.0)], const,
                         num_warps=4, num_stages=1)
    if node.op == "linear_cross_entropy":
        return forward
    d = ("node", node.inputs[3])
    out = [("node", node.id), d] + tail + [("stride", node.id), ("value", cap or 1.0)]
    if node.op == "linear_cross_entropy_grad_h":
        grad = KernelSpec("linear_loss", "dh", dh_source(prec), ENTRY_DH, (cdiv(t, bm),),
                          head + out, const, num_warps=4, num_stages=1, zeroed=node.id)
    else:
        grad = KernelSpec("linear_loss", "dw", dw_source(prec), ENTRY_DW, (cdiv(v, bv),),
                          head + out, const, num_warps=4, num_stages=1, zeroed=node.id)
    forward.then = grad
    return forward
