"""Training: the optimizer (optim.py); autodiff on the IR, the loss and `Trainer` follow."""

from .optim import AdamW

__all__ = ["AdamW"]
