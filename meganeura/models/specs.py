"""How a model family's parameters sit in a checkpoint."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class WeightSpec:
    shape: tuple[int, ...]  # as the graph's parameter node declares it
    transposed: bool  # the checkpoint stores it transposed (the seed's linear weights)

    @property
    def stored_shape(self) -> tuple[int, ...]:
        return self.shape[::-1] if self.transposed else self.shape
