"""How a model family's parameters sit in a checkpoint, and random ones in that layout."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class WeightSpec:
    shape: tuple[int, ...]  # as the graph's parameter node declares it
    transposed: bool  # the checkpoint stores it transposed (the seed's linear weights)
    trained: bool = True  # a weight training updates (False: a buffer, e.g. a layer scalar)

    @property
    def stored_shape(self) -> tuple[int, ...]:
        return self.shape[::-1] if self.transposed else self.shape


def random_stored_weights(specs: dict[str, WeightSpec], seed: int = 0, dtype=torch.float32,
                          device="cpu", norm_scale: Callable[[str, int], float] | None = None
                          ) -> dict[str, torch.Tensor]:
    """Deterministic random weights of parameters stored [out, in] (the same seed and device
    give the same values; each tensor seeded by its place in `specs`).

    A matrix [out, in] ~ N(0, 1/in) (an embedding [vocab, width] ~ N(0, 1/width); stacked
    experts [experts, out, in] alike); a vector
    (norm weights, layer scalars) ~ 1 + N(0, 0.1^2), times norm_scale(name, length) if given;
    so activations stay O(1) through any depth.
    """
    out = {}
    for i, (name, spec) in enumerate(specs.items()):
        gen = torch.Generator(device=device).manual_seed(seed * 1_000_003 + i)
        t = torch.randn(spec.shape, generator=gen, device=device, dtype=torch.float32)
        if len(spec.shape) == 1:
            t = (1.0 + 0.1 * t) * (norm_scale(name, spec.shape[0]) if norm_scale else 1.0)
        else:
            t = t / spec.shape[-1] ** 0.5
        out[name] = t.to(dtype)
    return out
