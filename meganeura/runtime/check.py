"""One comparison rule and one tolerance table for every numerical check.

relative error = ||out - ref|| / ||ref|| over the whole tensor, in float64; and, so that one
wrong row of thousands cannot hide in the whole, the worst row's relative error
||out[r] - ref[r]|| / ||ref[r]|| (a row of zeros in ref compares absolutely) within
ROW_TOLERANCE.
"""

from __future__ import annotations

import torch

TOLERANCE = {
    "fp32-exact": 1e-5,   # fp32 against fp32 with the same formulas (reference, rewrites)
    "fp32": 1e-4,         # generated kernels in fp32 against the fp32 reference
    "bf16": 2e-2,         # bf16 on the GPU against the fp32 reference
}
# the worst single row: rows are short, so their error scatters more than the whole's
ROW_TOLERANCE = {"fp32-exact": 1e-4, "fp32": 1e-3, "bf16": 6e-2}


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    if out.shape != ref.shape:
        raise ValueError(f"shapes differ: {list(out.shape)} vs {list(ref.shape)}")
    out64, ref64 = out.detach().double().cpu(), ref.detach().double().cpu()
    if not torch.isfinite(out64).all():
        return float("inf")
    den = ref64.norm().item()
    num = (out64 - ref64).norm().item()
    return num / den if den > 0 else num


def row_relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """The worst row's relative error (rows: the leading dimension; 1-D tensors are one row)."""
    if out.shape != ref.shape:
        raise ValueError(f"shapes differ: {list(out.shape)} vs {list(ref.shape)}")
    out64 = out.detach().double().cpu().reshape(out.shape[0] if out.dim() > 1 else 1, -1)
    ref64 = ref.detach().double().cpu().reshape(out64.shape)
    if not torch.isfinite(out64).all():
        return float("inf")
    num = (out64 - ref64).norm(dim=1)
    den = ref64.norm(dim=1)
    err = torch.where(den > 0, num / den.clamp_min(1e-300), num)
    return float(err.max()) if err.numel() else 0.0
