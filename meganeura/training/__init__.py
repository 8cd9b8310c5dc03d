"""Training: `Trainer` (trainer.py: gradients through the IR's autodiff, AdamW steps, LoRA),
the optimizer (optim.py) and the fused causal-LM loss (loss.py)."""

from .loss import LinearCrossEntropy, shift_labels
from .optim import AdamW
from .trainer import LoRA, Trainer

__all__ = ["AdamW", "LinearCrossEntropy", "LoRA", "Trainer", "shift_labels"]
