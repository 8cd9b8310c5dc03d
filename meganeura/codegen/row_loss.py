"""The cross-entropy of logits rows, and its gradient: a program per row, the vocabulary in
blocks.

    cross_entropy:       loss[t] = logsumexp(z[t]) - z[t, label[t]]     (0 where label = -100)
    cross_entropy_grad:  dz[t] = d[t] (softmax(z[t]) - onehot(label[t]))  (0 where -100)

The logsumexp is online (a running max and sum over the blocks), in fp32; the gradient
recomputes it in a first pass over the row, then writes the row in a second. (The training
graph's lm_head + soft-cap + loss is to lower to the fused kernels of training/loss.py,
which never hold the logits; these run the loss where the logits exist.)

Soft-capped (the node's `cap` > 0): each logit read is capped, cap * tanh(z / cap), and
the gradient written is times the cap's derivative 1 - (capped / cap)^2 in fp32, so the
capped logits are never stored (rewrites/fused_loss.py's capped_loss).

bytes: elem * T * V (loss), 3 * elem * T * V (gradient); FLOPs ~4 per logit
"""

from __future__ import annotations

from .common import HEADER, KernelSpec, Target, indent, next_pow2, softcap_lines

IGNORE = -100


def emit(op: str, capped: bool = False) -> str:
    """capped: the logits soft-capped as read (cap * tanh(z / cap)), the gradient times the
    cap's derivative as written."""
    params = ["z_ptr", "label_ptr"] + (["d_ptr"] if op == "cross_entropy_grad" else [])
    params += ["out_ptr", "V", "stride_z", "stride_out"] + (["cap"] if capped else [])
    params += ["BLOCK_V: tl.constexpr"]
    cap = [f"    {x}" for x in softcap_lines("z", "cap")] if capped else []
    lines = ["row = tl.program_id(0).to(tl.int64)",
             "label = tl.load(label_ptr + row).to(tl.int64)",
             "m = tl.full((BLOCK_V,), float('-inf'), dtype=tl.float32)",
             "s = tl.zeros((BLOCK_V,), dtype=tl.float32)",
             "for v0 in range(0, V, BLOCK_V):",
             "    v = v0 + tl.arange(0, BLOCK_V)",
             "    z = tl.load(z_ptr + row * stride_z + v, mask=v < V, other=float('-inf'))"
             ".to(tl.float32)"] + ([
             "    z = tl.where(v < V, z, 0.0)"] + cap + [
             "    z = tl.where(v < V, z, float('-inf'))"] if capped else []) + [
             "    new = tl.maximum(m, z)",
             "    s = s * tl.exp(tl.where(new == float('-inf'), 0.0, m - new)) + "
             "tl.where(v < V, tl.exp(z - tl.where(new == float('-inf'), 0.0, new)), 0.0)",
             "    m = new",
             "top = tl.max(m, axis=0)",
             "lse = top + tl.log(tl.sum(s * tl.exp(m - top), axis=0))",
             f"counted = label != {IGNORE}"]
    if op == "cross_entropy":
        lines += ["z = tl.load(z_ptr + row * stride_z + tl.where(counted, label, 0))"
                  ".to(tl.float32)"] + [x[4:] for x in cap]
        lines += ["tl.store(out_ptr + row, tl.where(counted, lse - z, 0.0))"]
    else:
        lines += ["scale = tl.where(counted, tl.load(d_ptr + row).to(tl.float32), 0.0)",
                  "for v0 in range(0, V, BLOCK_V):",
                  "    v = v0 + tl.arange(0, BLOCK_V)",
                  "    z = tl.load(z_ptr + row * stride_z + v, mask=v < V, other=0.0)"
                  ".to(tl.float32)"] + cap + [
                  "    g = (tl.exp(z - lse) - tl.where(v == label, 1.0, 0.0)) * scale"] + ([
                  "    g = g * (1.0 - (z / cap) * (z / cap))  # the cap's derivative"]
                  if capped else []) + [
                  "    tl.store(out_ptr + row * stride_out + v, "
                  "g.to(out_ptr.dtype.element_ty), mask=v < V)"]
    return HEADER + f"def row_loss_kernel({', '.join(params)}):\n" + \
        indent("\n".join(lines), 4) + "\n"


def build(node, graph, target: Target) -> KernelSpec:
    z = graph[node.inputs[0]]
    t, v = z.shape
    bv = min(next_pow2(v), 64 if target.interpreted else 2048)
    args = [("node", i) for i in node.inputs] + [("node", node.id), ("value", v),
                                                ("stride", z.id)]
    args += [("stride", node.id)] if node.op == "cross_entropy_grad" else [("value", 1)]
    cap = float(node.attrs.get("cap") or 0.0)
    args += [("value", cap)] if cap else []
    name = node.op + ("+softcap" if cap else "")
    return KernelSpec("row_loss", name, emit(node.op, bool(cap)), "row_loss_kernel", (t,), args,
                      dict(BLOCK_V=bv), num_warps=1 if target.interpreted else 8,
                      num_stages=1)
