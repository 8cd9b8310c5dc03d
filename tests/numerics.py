"""The one comparison helper of the test suite (tolerances live in meganeura.runtime.check)."""

import torch

from meganeura.runtime.check import (ROW_TOLERANCE, TOLERANCE, relative_error,
                                     row_relative_error)


def assert_close(out: torch.Tensor, ref: torch.Tensor, kind: str) -> None:
    """Relative error ||out - ref|| / ||ref|| within TOLERANCE[kind], and the worst row's within
    ROW_TOLERANCE[kind]; NaN/inf never pass."""
    err = relative_error(out, ref)
    assert err <= TOLERANCE[kind], f"relative error {err:.3g} > {TOLERANCE[kind]} ({kind})"
    row = row_relative_error(out, ref)
    assert row <= ROW_TOLERANCE[kind], f"worst row's relative error {row:.3g} > " \
                                       f"{ROW_TOLERANCE[kind]} ({kind})"
