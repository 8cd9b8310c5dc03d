"""`meganeura.compile`: Graph + weights -> a compiled callable that carries its report."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .codegen import Target
from .codegen.cache import KernelCache
from .compiler.cost import CPU_INTERPRETER, H200, PROFILES, CostModel, DeviceProfile
from .compiler.graph import Graph
from .compiler.plan import Plan
from .errors import MeganeuraError, WeightsError
from .optimize import OptimizeReport, optimize
from .runtime.compiled import CompiledModel

_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16"}


@dataclass
class CompileReport:
    optimize: OptimizeReport
    plan: Plan
    profile: DeviceProfile
    seconds: dict = field(default_factory=dict)
    kernels: list = field(default_factory=list)  # (node id, archetype, variant) per launch


def resolve(device=None, dtype=None, profile=None):
    """Fills in defaults: (torch.device, torch.dtype, DeviceProfile), checking each. A profile
    may be given by name ("h200", "h200-roofline", "cpu-interpreter")."""
    try:
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except (RuntimeError, TypeError):
        raise MeganeuraError(f"device must be cuda or cpu, got {device!r}") from None
    if device.type not in ("cuda", "cpu"):
        raise MeganeuraError(f"device must be cuda or cpu, got {device}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MeganeuraError("device cuda: CUDA is not available on this machine")
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if dtype not in _DTYPES:
        raise MeganeuraError(f"dtype must be torch.float32 or torch.bfloat16, got {dtype}")
    if device.type == "cpu" and dtype != torch.float32:
        # Triton's interpreter computes bf16 dot products wrong (near-uniform logits, no error)
        raise MeganeuraError("bf16 runs on CUDA only: on the CPU, Triton's interpreter computes "
                             "bf16 matrix products wrong; use fp32 there (the default)")
    if isinstance(profile, str):
        if profile not in PROFILES:
            raise MeganeuraError(f"unknown profile {profile!r} (known: {', '.join(PROFILES)})")
        profile = PROFILES[profile]
    if profile is not None and not isinstance(profile, DeviceProfile):
        raise MeganeuraError(f"profile must be a DeviceProfile or one of {', '.join(PROFILES)}, "
                             f"got {type(profile).__name__}")
    profile = profile or (H200 if device.type == "cuda" else CPU_INTERPRETER)
    return device, dtype, profile


def check_weights_dict(weights) -> None:
    """weights: a dict of name -> torch.Tensor (graph layout)."""
    if not isinstance(weights, dict):
        raise WeightsError(f"weights must be a dict of parameter name -> torch.Tensor, got "
                           f"{type(weights).__name__}")


def compile(graph: Graph, weights: dict, device=None, dtype=None, profile=None,
            cache_dir: str | Path | None = None, cuda_graph: bool = True) -> CompiledModel:
    """Optimizes `graph`, generates its kernels and binds them to `weights` on `device`.

    weights: parameter name -> tensor in graph layout ([in, out] for linear weights).
    device: "cuda" or "cpu" (default: cuda when available); on the CPU the kernels run
        through Triton's interpreter (TRITON_INTERPRET=1 must be set before triton loads).
    dtype: torch.bfloat16 or torch.float32 (default: bf16 on cuda, fp32 on cpu).
    profile: the DeviceProfile the extractor prices kernels with (default: H200 on cuda,
        the CPU interpreter's on cpu).
    cache_dir: where kernel sources are cached (default: ~/.cache/meganeura/kernels).
    The result `fn(token_ids)` returns logits and has `fn.report`.
    """
    t0 = time.perf_counter()
    device, dtype, profile = resolve(device, dtype, profile)
    check_weights_dict(weights)
    if not isinstance(graph, Graph):
        raise MeganeuraError(f"graph must be a meganeura Graph, got {type(graph).__name__}")
    plan, opt_report = optimize(graph, CostModel(profile, _DTYPES[dtype]))
    return bind(plan, opt_report, profile, weights, device, dtype, cache_dir, cuda_graph,
                time.perf_counter() - t0)


def bind(plan: Plan, opt_report: OptimizeReport, profile: DeviceProfile, weights: dict, device,
         dtype, cache_dir=None, cuda_graph: bool = True, optimize_s: float = 0.0,
         state: dict | None = None, dependent_launches: bool = False) -> CompiledModel:
    """Generates the plan's kernels and binds them to weights, state (KV caches) and buffers
    on `device`. dependent_launches: on a Hopper (or later) GPU, each kernel is launched
    while the one before it finishes (see codegen.common.dependent_launch)."""
    t1 = time.perf_counter()
    cache = KernelCache(cache_dir)
    cache.check_writable()
    device = torch.device(device)
    pdl = dependent_launches and device.type == "cuda" and \
        torch.cuda.get_device_capability(device)[0] >= 9
    model = CompiledModel(plan, weights, Target(device, dtype, pdl=pdl), cache, cuda_graph, state)
    t2 = time.perf_counter()
    model.report = CompileReport(
        opt_report, plan, profile,
        {"optimize": optimize_s, "load+codegen": t2 - t1, **model.seconds},
        [(launch.node, launch.spec.archetype, launch.spec.variant) for launch in model.launches])
    return model


def kernel_sources(plan: Plan, device, dtype) -> list[str]:
    """The source of every kernel the plan launches, without touching weights."""
    from .codegen import kernel_for

    target = Target(torch.device(device), dtype)
    return [k.source for i in plan.launches for k in kernel_for(plan.graph[i], plan.graph,
                                                                 target).chain()]
