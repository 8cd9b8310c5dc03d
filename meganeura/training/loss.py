"""The causal-LM loss as transformers computes it, fused with the lm_head product.

    ce = LinearCrossEntropy(device, softcap=30.0)
    loss, dh, dw = ce(hidden, weight, shift_labels(labels))    # mean loss and its gradients

transformers' causal-LM loss (`ForCausalLMLoss`): the logits h W^T (soft-capped by the
final logit soft-cap where the model has one) in fp32, the labels shifted by one (position t
predicts label t + 1; the last position predicts nothing), positions labelled -100 ignored,
the mean over the positions counted. The kernels (codegen/cross_entropy.py) never hold more
of the [tokens, vocab] logits than one tile per program: the loss, d(hidden) and d(weight)
of the mean come from three passes over the vocabulary.
"""

from __future__ import annotations

import math

import torch

from ..codegen.cross_entropy import (ENTRY_DH, ENTRY_DW, ENTRY_FORWARD, IGNORE, dh_source,
                                     dw_source, forward_source)
from ..errors import InputError
from ..pipeline import setup
from .optim import on_device

# (BLOCK_M, BLOCK_V, BLOCK_K): rows, vocabulary ids and hidden columns of a tile
BLOCKS_CPU, BLOCKS_GPU = (16, 32, 16), (64, 64, 64)


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """Labels [..., S] -> what each position predicts: label t + 1, and -100 (nothing) last."""
    return torch.cat([labels[..., 1:], torch.full_like(labels[..., :1], IGNORE)], dim=-1)


class LinearCrossEntropy:
    """loss, d(hidden), d(weight) of mean cross-entropy(softcap(hidden @ weight^T), labels)."""

    def __init__(self, device=None, softcap: float | None = None, cache_dir=None):
        if softcap is not None and (isinstance(softcap, bool) or not isinstance(
                softcap, (int, float)) or not math.isfinite(softcap) or softcap <= 0):
            raise InputError(f"softcap must be a number > 0 or None, got {softcap!r}")
        self.softcap = softcap
        self.setup = setup(device, cache_dir=cache_dir)
        self.cache = self.setup.kernel_cache()
        self.interpreted = self.setup.device.type == "cpu"

    def check(self, hidden, weight, labels) -> None:
        dev = self.setup.device
        for name, t in (("hidden", hidden), ("weight", weight)):
            if not isinstance(t, torch.Tensor) or t.dim() != 2 or not t.is_floating_point() \
                    or t.device.type != dev.type or t.stride(1) != 1:
                what = (f"shape {list(t.shape)} {t.dtype} on {t.device}"
                        if isinstance(t, torch.Tensor) else type(t).__name__)
                raise InputError(f"{name} must be a 2-D floating-point tensor with unit column "
                                 f"stride on {dev.type}, got {what}")
        if hidden.shape[1] != weight.shape[1] or hidden.dtype != weight.dtype:
            raise InputError(f"hidden {list(hidden.shape)} {hidden.dtype} and weight "
                             f"{list(weight.shape)} {weight.dtype} must share their width and "
                             f"dtype")
        if not isinstance(labels, torch.Tensor) or labels.shape != (hidden.shape[0],) or \
                labels.dtype != torch.int64:
            what = (f"shape {list(labels.shape)} {labels.dtype}" if isinstance(labels, torch.Tensor)
                    else type(labels).__name__)
            raise InputError(f"labels must be int64 of shape [{hidden.shape[0]}] (one per row of "
                             f"hidden), got {what}")
        counted = labels != IGNORE
        if not bool(counted.any()):
            raise InputError("every label is -100: no position to learn from")
        bad = labels[counted & ((labels < 0) | (labels >= weight.shape[0]))]
        if bad.numel():
            raise InputError(f"label {int(bad[0])} is outside the vocabulary [0, "
                             f"{weight.shape[0]}) (and not -100)")

    def __call__(self, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                 grads: bool = True):
        """(loss, d hidden, d weight): a 0-d fp32 loss and fp32 gradients of it (None, None
        without grads)."""
        self.check(hidden, weight, labels)
        labels = labels.to(hidden.device).contiguous()
        t, h = hidden.shape
        v = weight.shape[0]
        bm, bv, bk = BLOCKS_CPU if self.interpreted else BLOCKS_GPU
        precision = "ieee" if hidden.dtype == torch.float32 else "tf32"
        f32 = dict(dtype=torch.float32, device=hidden.device)
        lse, rows = torch.empty(t, **f32), torch.empty(t, **f32)
        cap = float(self.softcap or 1.0)
        const = dict(HAS_CAP=self.softcap is not None, BLOCK_M=bm, BLOCK_V=bv, BLOCK_K=bk,
                     num_warps=4)
        common = (t, v, h, hidden.stride(0), weight.stride(0))
        with on_device(hidden.device):
            fwd = self._load(forward_source(precision), ENTRY_FORWARD)
            fwd[(-(-t // bm),)](hidden, weight, labels, lse, rows, *common, 1, 1, cap, LSE_AT=0,
                                **const)
            counted = (labels != IGNORE).sum()
            loss = rows.sum() / counted
            if not grads:
                return loss, None, None
            scale = (1.0 / counted.float()).expand(t).contiguous()  # a row's weight
            dh = torch.zeros(t, h, **f32)
            dw = torch.zeros(v, h, **f32)
            self._load(dh_source(precision), ENTRY_DH)[(-(-t // bm),)](
                hidden, weight, labels, lse, dh, scale, *common, 1, dh.stride(0), cap, **const)
            self._load(dw_source(precision), ENTRY_DW)[(-(-v // bv),)](
                hidden, weight, labels, lse, dw, scale, *common, 1, dw.stride(0), cap, **const)
        return loss, dh, dw

    def _load(self, source: str, entry: str):
        return self.cache.load(source, entry, self.interpreted)
