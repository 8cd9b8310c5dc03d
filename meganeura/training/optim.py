"""AdamW over a model's weights, as `torch.optim.AdamW` defines it, in generated kernels
(equal to torch's up to fp32 rounding: torch's CPU kernels fuse multiply-adds).

    opt = AdamW(weights, lr=1e-4, weight_decay=0.0)   # weights: name -> tensor, in place
    norm = opt.step(grads, max_norm=1.0)              # grads: name -> tensor, same shapes

The update is torch.optim.AdamW's (decoupled weight decay, bias correction; no amsgrad),
computed in fp32 by one launch over every weight (codegen/optimizer.py; one launch per
gradient dtype when the gradients' dtypes differ). The moments are fp32
whatever the weights' dtype (torch keeps them in the weights' dtype: bf16 moments lose the
small updates); `master_weights=True` also keeps an fp32 copy of bf16 weights, which the
steps update and the weights are rounded from. `max_norm` clips the gradients by their
global norm as `torch.nn.utils.clip_grad_norm_` does (coefficient max_norm / (norm + 1e-6)
when below 1; the kernel reads it from memory). The norm is always computed, and read by
the host: a step whose gradients hold NaN or inf is refused before anything changes.
"""

from __future__ import annotations

import contextlib
import math

import torch

from ..codegen.optimizer import ENTRY_ADAMW, ENTRY_SQ_SUM, adamw_source, sq_sum_source
from ..errors import InputError
from ..pipeline import setup

GRAD_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
BLOCK_GPU, BLOCK_CPU = 4096, 2048  # elements per program (few programs on the interpreter)


def _number(name: str, v, low: float, high: float = math.inf, open_high: bool = False) -> float:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and \
        low <= v and (v < high if open_high else v <= high)
    if not ok:
        right = ")" if open_high else "]"
        raise InputError(f"{name} must be a number in [{low:g}, {high:g}{right}, got {v!r}")
    return float(v)


def on_device(device: torch.device):
    """Launches go to the weights' GPU (Triton launches on the current device)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


class AdamW:
    def __init__(self, weights: dict, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, master_weights: bool = False, cache_dir=None):
        if not isinstance(weights, dict) or not weights:
            raise InputError("weights must be a non-empty dict of name -> torch.Tensor")
        bad = [n for n, w in weights.items() if not isinstance(w, torch.Tensor)
               or not w.is_floating_point() or not w.is_contiguous()]
        if bad:
            raise InputError(f"weight {bad[0]!r} must be a contiguous floating-point tensor")
        devices = {w.device for w in weights.values()}
        dtypes = {w.dtype for w in weights.values()}
        if len(devices) > 1 or len(dtypes) > 1:
            raise InputError(f"weights must share one device and dtype, got "
                             f"{sorted(map(str, devices))} and {sorted(map(str, dtypes))}")
        self.lr = _number("lr", lr, 0.0)
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise InputError(f"betas must be two numbers in [0, 1), got {betas!r}")
        self.betas = tuple(_number("betas[%d]" % i, b, 0.0, 1.0, open_high=True)
                           for i, b in enumerate(betas))
        self.eps = _number("eps", eps, 0.0)
        if self.eps == 0:
            raise InputError("eps must be > 0, got 0")
        self.weight_decay = _number("weight_decay", weight_decay, 0.0)
        self.weights = weights
        (device,), (dtype,) = devices, dtypes
        self.setup = setup(device, dtype, cache_dir=cache_dir)
        self.cache = self.setup.kernel_cache()
        self.interpreted = device.type == "cpu"
        self.block = BLOCK_CPU if self.interpreted else BLOCK_GPU
        self.master = bool(master_weights) and dtype != torch.float32
        f32 = dict(dtype=torch.float32, device=device)
        self.exp_avg = {n: torch.zeros(w.shape, **f32) for n, w in weights.items()}
        self.exp_avg_sq = {n: torch.zeros(w.shape, **f32) for n, w in weights.items()}
        self.master_weights = {n: w.float().clone() for n, w in weights.items()} \
            if self.master else {}
        self.steps = 0
        self._coef = torch.ones(1, **f32)
        self._groups: dict = {}  # (gradient dtype, names) -> _Group

    def _kernel(self, source: str, entry: str):
        return self.cache.load(source, entry, self.interpreted)

    def _group(self, grads: dict) -> list:
        """The weights split by their gradients' dtype, each with its launch tables (the
        addresses rebuilt only when a gradient's buffer moved)."""
        by_dtype: dict = {}
        for n in self.weights:
            by_dtype.setdefault(grads[n].dtype, []).append(n)
        out = []
        for dtype, names in by_dtype.items():
            key = (dtype, tuple(names))
            if key not in self._groups:
                self._groups[key] = _Group(names, [self.weights[n] for n in names], self.block)
            group = self._groups[key]
            group.bind(self, [grads[n] for n in names])
            out.append((dtype, group))
        return out

    def grad_norm(self, grads: dict) -> torch.Tensor:
        """The global L2 norm of the gradients, a 0-d fp32 tensor on the device."""
        total = []
        for dtype, group in self._group(grads):
            fn = self._kernel(sq_sum_source(dtype, group.aligned), ENTRY_SQ_SUM)
            fn[(group.programs,)](group.table, group.numel, group.prog_tensor, group.prog_start,
                                  group.partials, COLS=COLS, BLOCK=self.block, num_warps=4)
            total.append(group.partials.sum())
        return torch.stack(total).sum().sqrt()

    def check_grads(self, grads) -> None:
        if not isinstance(grads, dict):
            raise InputError(f"grads must be a dict of name -> torch.Tensor, got "
                             f"{type(grads).__name__}")
        missing = [n for n in self.weights if n not in grads]
        extra = [n for n in grads if n not in self.weights]
        if missing or extra:
            raise InputError("grads must name exactly the weights: "
                             + (f"{missing[0]!r} is missing" if missing else
                                f"{extra[0]!r} is not a trained weight"))
        for n, w in self.weights.items():
            g = grads[n]
            if not isinstance(g, torch.Tensor) or g.shape != w.shape or g.device != w.device \
                    or g.dtype not in GRAD_DTYPES or not g.is_contiguous():
                what = (f"shape {list(g.shape)} {g.dtype} on {g.device}"
                        if isinstance(g, torch.Tensor) else type(g).__name__)
                raise InputError(f"gradient {n!r} must be a contiguous fp32, bf16, fp16 or fp64 "
                                 f"tensor of shape {list(w.shape)} on {w.device}, got {what}")

    def step(self, grads: dict, max_norm: float | None = None) -> float:
        """One update of every weight from `grads` (name -> tensor); returns the gradients'
        global norm before clipping. NaN or inf in them: InputError, nothing changed."""
        self.check_grads(grads)
        if max_norm is not None:
            max_norm = _number("max_norm", max_norm, 0.0)
        with on_device(self.setup.device):
            total = float(self.grad_norm(grads))
        if not math.isfinite(total):
            raise InputError(f"the gradients hold NaN or inf (global norm {total}): the step was "
                             f"not taken, the weights and the optimizer state are unchanged")
        coef = 1.0 if max_norm is None else min(1.0, max_norm / (total + 1e-6))
        self._coef.fill_(coef)
        self.steps += 1
        beta1, beta2 = self.betas
        step_size = self.lr / (1 - beta1 ** self.steps)
        bc2_sqrt = math.sqrt(1 - beta2 ** self.steps)
        with on_device(self.setup.device):
            self._launch(grads, step_size, bc2_sqrt)
        return total

    def _launch(self, grads: dict, step_size: float, bc2_sqrt: float) -> None:
        beta1, beta2 = self.betas
        p_dtype = next(iter(self.weights.values())).dtype
        for dtype, group in self._group(grads):
            fn = self._kernel(adamw_source(p_dtype, dtype, self.master, group.aligned),
                              ENTRY_ADAMW)
            fn[(group.programs,)](group.table, group.numel, group.prog_tensor, group.prog_start,
                                  self._coef, 1.0 - self.lr * self.weight_decay, 1.0 - beta1,
                                  beta2, step_size, bc2_sqrt, self.eps, COLS=COLS,
                                  BLOCK=self.block, num_warps=8 if not self.interpreted else 4)


COLS = 5  # a tensor's row of addresses: weight, gradient, moments, master (codegen/optimizer.py)


class _Group:
    """Launch tables for a set of weights: each program's tensor and first element, each
    tensor's element count and (per step) its row of addresses."""

    def __init__(self, names: list, weights: list, block: int):
        device = weights[0].device
        self.names = names
        self.sizes = sizes = [w.numel() for w in weights]
        counts = torch.tensor([-(-n // block) for n in sizes])
        self.programs = int(counts.sum())
        tensor = torch.repeat_interleave(torch.arange(len(sizes)), counts)
        first = torch.cumsum(counts, 0) - counts
        start = (torch.arange(self.programs) - first[tensor]) * block
        self.prog_tensor = tensor.to(torch.int32).to(device)
        self.prog_start = start.to(torch.int64).to(device)
        self.numel = torch.tensor(sizes, dtype=torch.int64, device=device)
        self.partials = torch.zeros(self.programs, dtype=torch.float32, device=device)
        self.table = None
        self._bound = None
        self.aligned = False  # addresses of 16 bytes, counts of 8 elements: wide loads, stores

    def bind(self, opt: "AdamW", grads: list) -> None:
        rows = tuple((opt.weights[n].data_ptr(), g.data_ptr(), opt.exp_avg[n].data_ptr(),
                      opt.exp_avg_sq[n].data_ptr(),
                      opt.master_weights[n].data_ptr() if opt.master else 0)
                     for n, g in zip(self.names, grads))
        if rows != self._bound:
            self.table = torch.tensor(rows, dtype=torch.int64).to(opt.setup.device)
            self._bound = rows
            self.aligned = all(a % 16 == 0 for row in rows for a in row) and \
                all(n % 8 == 0 for n in self.sizes)
