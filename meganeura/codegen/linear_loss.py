"""The lm_head, its soft-cap and the cross-entropy as ops of the plan, its logits never
stored: the kernels of codegen/cross_entropy.py, bound to plan nodes.

    linear_cross_entropy_stats(h, w, labels)      the forward kernel: [rows, 2], each row's
                                                  loss and its logsumexp
    linear_cross_entropy(h, w, labels)            the forward kernel: each row's loss (its
                                                  logsumexp into a scratch buffer)
    linear_cross_entropy_grad_h(h, w, labels, d, lse)   the d h kernel (rows owned by
                                                        programs), the forward's logsumexp read
    linear_cross_entropy_grad_w(h, w, labels, d, lse)   the d w kernel (vocabulary tiles
                                                        owned by programs)

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
    tail = [("value", t), ("value", v), ("value", width), ("stride", h.id), ("stride", w.id)]
    head = [("node", h.id), ("node", w.id), ("node", labels.id)]
    if node.op in ("linear_cross_entropy", "linear_cross_entropy_stats"):
        if node.op == "linear_cross_entropy":  # the loss alone: the logsumexp is scratch
            lse, at = ("scratch", ("ce_lse", (t,), "fp32")), 0
            strides = [("value", 1), ("stride", node.id)]
        else:  # column 0 the loss, column 1 the logsumexp
            lse, at = ("node", node.id), 1
            strides = [("stride", node.id), ("stride", node.id)]
        return KernelSpec("linear_loss", "forward", forward_source(prec), ENTRY_FORWARD,
                          (cdiv(t, bm),), head + [lse, ("node", node.id)] + tail + strides
                          + [("value", cap or 1.0)], {**const, "LSE_AT": at}, num_warps=4,
                          num_stages=1)
    d, lse = node.inputs[3], node.inputs[4]
    args = head + [("node", lse), ("node", node.id), ("node", d)] + tail + \
        [("stride", lse), ("stride", node.id), ("value", cap or 1.0)]
    if node.op == "linear_cross_entropy_grad_h":
        return KernelSpec("linear_loss", "dh", dh_source(prec), ENTRY_DH, (cdiv(t, bm),), args,
                          const, num_warps=4, num_stages=1, zeroed=node.id)
    return KernelSpec("linear_loss", "dw", dw_source(prec), ENTRY_DW, (cdiv(v, bv),), args,
                      const, num_warps=4, num_stages=1, zeroed=node.id)
