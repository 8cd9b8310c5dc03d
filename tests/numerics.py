"""The one comparison helper of the test suite (tolerances live in meganeura.runtime.check)."""

import torch

from meganeura.runtime.check import TOLERANCE, relative_error


def assert_close(out: torch.Tensor, ref: torch.Tensor, kind: str) -> None:
    """Relative error ||out - ref|| / ||ref|| within TOLERANCE[kind]; NaN/inf never pass."""
    err = relative_error(out, ref)
    assert err <= TOLERANCE[kind], f"relative error {err:.3g} > {TOLERANCE[kind]} ({kind})"
