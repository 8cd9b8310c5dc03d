"""The optimizer's kernels: a sum of squares (the gradients' global norm) and the AdamW step,
each one launch over every tensor it updates.

    sq_sum:  partial[pid] = sum(g[i]^2) over the program's block, in fp32
    adamw:   g *= coef[0];  w = master or p;  w *= 1 - lr * weight_decay
             m = m + (1 - beta1) (g - m);  v = beta2 v + (1 - beta2) g^2
             w -= step_size * m / (sqrt(v) / sqrt(1 - beta2^t) + eps);  p = w (and master = w)

`torch.optim.AdamW`'s update (decoupled weight decay, bias correction: step_size is
lr / (1 - beta1^t)), computed in fp32 whatever the weights' dtype; the moments (and, as an
option, master weights) are fp32 tensors of their own. `coef` is read from memory, so that a
clipping coefficient computed on the device reaches the step without a host round trip.
Square roots and divisions are rounded as torch's are (sqrt_rn, div_rn), not the GPU's fast
approximations.

One launch covers many tensors of different sizes: a table holds each tensor's addresses
(one int64 row: weight, gradient, first and second moment, master weights) and a second
table gives each program its tensor and the first element of its block. The tables are
built by the host (training/optim.py); the element types are baked into the source.

bytes: sq_sum reads g once; adamw reads and writes p, m, v (and the master) and reads g
"""

from __future__ import annotations

from .common import HEADER, indent

ENTRY_SQ_SUM, ENTRY_ADAMW = "sq_sum_kernel", "adamw_kernel"
# columns of a tensor's row in the address table
P, G, M, V, W = range(5)

_TL = {"torch.float32": "tl.float32", "torch.bfloat16": "tl.bfloat16",
       "torch.float16": "tl.float16", "torch.float64": "tl.float64"}


def _ty(dtype) -> str:
    return _TL[str(dtype)]


def _locate(aligned: bool) -> str:
    """The program's tensor, its elements and their mask. `aligned`: every address of the
    table is a multiple of 16 bytes and every element count of 8 (the host checks both), so
    the mask is constant over runs of 8 elements and loads and stores take 16 bytes."""
    n = "tl.multiple_of(tl.load(numel_ptr + t), 8)" if aligned else "tl.load(numel_ptr + t)"
    return f"""
pid = tl.program_id(0)
t = tl.load(prog_tensor_ptr + pid).to(tl.int64)
offs = tl.multiple_of(tl.load(prog_start_ptr + pid), BLOCK) + tl.arange(0, BLOCK)
mask = offs < {n}
row = table_ptr + t * COLS
"""


def _address(col: int, dtype, aligned: bool) -> str:
    """A tensor's address from the table; `aligned`: every address of the table is a
    multiple of 16 bytes (the host checks it), which the compiler is told."""
    at = f"tl.load(row + {col}).to(tl.pointer_type({_ty(dtype)}))"
    return f"tl.multiple_of({at}, 16)" if aligned else at


def sq_sum_source(g_dtype, aligned: bool = False) -> str:
    body = _locate(aligned) + f"""
g = tl.load({_address(G, g_dtype, aligned)} + offs, mask=mask, other=0.0).to(tl.float32)
tl.store(out_ptr + pid, tl.sum(g * g, axis=0))
"""
    return (HEADER + f"def {ENTRY_SQ_SUM}(table_ptr, numel_ptr, prog_tensor_ptr, prog_start_ptr, "
            f"out_ptr, COLS: tl.constexpr, BLOCK: tl.constexpr):\n" + indent(body, 4) + "\n")


def adamw_source(p_dtype, g_dtype, master: bool, aligned: bool = False) -> str:
    """The step's kernel for weights of `p_dtype` and gradients of `g_dtype`; with `master`,
    the fp32 master weights are read and written and the weights are their rounding."""
    read = ("w = tl.load(w_ptr + offs, mask=mask, other=0.0)" if master else
            "w = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)")
    body = f"""
p_ptr = {_address(P, p_dtype, aligned)}
m_ptr = {_address(M, "torch.float32", aligned)}
v_ptr = {_address(V, "torch.float32", aligned)}
{"w_ptr = " + _address(W, "torch.float32", aligned) if master else ""}
g = tl.load({_address(G, g_dtype, aligned)} + offs, mask=mask, other=0.0).to(tl.float32)
g = g * tl.load(coef_ptr)
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
    body = _locate(aligned) + body
    params = ["table_ptr", "numel_ptr", "prog_tensor_ptr", "prog_start_ptr", "coef_ptr",
              "decay", "lerp", "beta2", "step_size", "bc2_sqrt", "eps",
              "COLS: tl.constexpr", "BLOCK: tl.constexpr"]
    return HEADER + f"def {ENTRY_ADAMW}({', '.join(params)}):\n" + indent(body, 4) + "\n"
