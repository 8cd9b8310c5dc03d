"""The optimizer's kernels: a sum of squares (the gradients' global norm) and the AdamW step.

    sq_sum:  partial[pid] = sum(g[i]^2) over the program's block, in fp32
    adamw:   g *= coef[0];  w = master or p;  w *= 1 - lr * weight_decay
             m = m + (1 - beta1) (g - m);  v = beta2 v + (1 - beta2) g^2
             w -= step_size * m / (sqrt(v) / sqrt(1 - beta2^t) + eps);  p = w (and master = w)

`torch.optim.AdamW`'s update (decoupled weight decay, bias correction: step_size is
lr / (1 - beta1^t)), computed in fp32 whatever the weights' dtype; the moments (and, as an
option, master weights) are fp32 tensors of their own. `coef` is read from memory, so that a
clipping coefficient computed on the device reaches the step without a host round trip.
Square roots and divisions are rounded as torch's are (sqrt_rn, div_rn), not the GPU's fast
approximations. One program per block of elements of a flat tensor.

bytes: sq_sum reads g once; adamw reads and writes p, m, v (and the master) and reads g
"""

from __future__ import annotations

from .common import HEADER, indent

ENTRY_SQ_SUM, ENTRY_ADAMW = "sq_sum_kernel", "adamw_kernel"


def sq_sum_source() -> str:
    body = """
offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
g = tl.load(g_ptr + offs, mask=offs < N, other=0.0).to(tl.float32)
tl.store(out_ptr + tl.program_id(0), tl.sum(g * g, axis=0))
"""
    return (HEADER + f"def {ENTRY_SQ_SUM}(g_ptr, out_ptr, N, BLOCK: tl.constexpr):\n"
            + indent(body, 4) + "\n")


def adamw_source(master: bool) -> str:
    """The step's kernel; with `master`, the fp32 master weights are read and written and the
    weights are their rounding to the weights' dtype."""
    read = ("w = tl.load(w_ptr + offs, mask=mask, other=0.0)" if master else
            "w = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)")
    body = f"""
offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
mask = offs < N
g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32) * tl.load(coef_ptr)
{read}
m = tl.load(m_ptr + offs, mask=mask, other=0.0)
v = tl.load(v_ptr + offs, mask=mask, other=0.0)
w = w * decay
m = tl.where(lerp < 0.5, m + lerp * (g - m), g - (g - m) * (1.0 - lerp))  # torch's lerp_
v = beta2 * v + (1.0 - beta2) * (g * g)
w = w - step_size * tl.div_rn(m, tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps)
tl.store(m_ptr + offs, m, mask=mask)
tl.store(v_ptr + offs, v, mask=mask)
tl.store(p_ptr + offs, w.to(p_ptr.dtype.element_ty), mask=mask)
"""
    if master:
        body += "tl.store(w_ptr + offs, w, mask=mask)\n"
    params = ["p_ptr", "g_ptr", "m_ptr", "v_ptr"] + (["w_ptr"] if master else [])
    params += ["coef_ptr", "N", "decay", "lerp", "beta2", "step_size", "bc2_sqrt", "eps",
               "BLOCK: tl.constexpr"]
    return HEADER + f"def {ENTRY_ADAMW}({', '.join(params)}):\n" + indent(body, 4) + "\n"
