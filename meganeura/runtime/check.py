"""One comparison rule and one tolerance table for every numerical check.

relative error = ||out - ref|| / ||ref|| over the whole tensor, in float64.
"""

from __future__ import annotations

import torch

TOLERANCE = {
    "fp32-exact": 1e-5,   # fp32 against fp32 with the same formulas (reference, rewrites)
    "fp32": 1e-4,         # generated kernels in fp32 against the fp32 reference
    "bf16": 2e-2,         # bf16 on the GPU against the fp32 reference
}


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    if out.shape != ref.shape:
        raise ValueError(f"shapes differ: {list(out.shape)} vs {list(ref.shape)}")
    out64, ref64 = out.detach().double().cpu(), ref.detach().double().cpu()
    if not torch.isfinite(out64).all():
        return float("inf")
    den = ref64.norm().item()
    num = (out64 - ref64).norm().item()
    return num / den if den > 0 else num
