"""Training: the optimizer (optim.py) and the fused causal-LM loss (loss.py); autodiff on the
IR and `Trainer` build on them."""

from .loss import LinearCrossEntropy, shift_labels
from .optim import AdamW

__all__ = ["AdamW", "LinearCrossEntropy", "shift_labels"]
