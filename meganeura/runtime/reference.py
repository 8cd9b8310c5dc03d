"""Plain-PyTorch interpreter of the Graph IR: the oracle for every numerical test.

Each op runs the formula its declaration names (`compiler/ops.py`, `compiler/formulas.py`);
a fused kernel runs its stages' formulas around its archetype's own (compiler/kernels.py),
so an extracted plan (a Graph of fused kernels) runs here too and must agree with the
unoptimized graph. Norms, RoPE and softmax run in
fp32 and cast back to the run's dtype; matmuls run in the run's dtype.
"""

from __future__ import annotations

import torch

from ..compiler.graph import Graph, Node
from ..compiler.kernels import input_bounds
from ..compiler.ops import OPS
from ..errors import InputError, WeightsError


def evaluate(node: Node, *args: torch.Tensor) -> torch.Tensor:
    """The node's formula on its operands."""
    return OPS[node.op].reference(node.attrs, *args)


def check_token_ids(node: Node, ids, vocab: int | None) -> None:
    """Token ids must be an integer tensor of the input's shape with values in [0, vocab)."""
    if not isinstance(ids, torch.Tensor):
        raise InputError(f"input '{node.name}' must be a torch.Tensor, got {type(ids).__name__}")
    if ids.dtype not in (torch.int32, torch.int64, torch.uint8, torch.int16):
        raise InputError(f"input '{node.name}' must hold integers (int32 or int64), got {ids.dtype}")
    if tuple(ids.shape) != node.shape:
        raise InputError(f"input '{node.name}' must have shape {list(node.shape)}, "
                         f"got {list(ids.shape)}")
    if vocab is not None and ids.numel():
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= vocab:
            bad = lo if lo < 0 else hi
            raise InputError(f"input '{node.name}' holds token id {bad}, outside [0, {vocab})")


def check_float_input(node: Node, x) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise InputError(f"input '{node.name}' must be a floating-point torch.Tensor")
    if tuple(x.shape) != node.shape:
        raise InputError(f"input '{node.name}' must have shape {list(node.shape)}, "
                         f"got {list(x.shape)}")


def run_reference(graph: Graph, weights: dict, inputs: dict, dtype=torch.float32,
                  device=None) -> list[torch.Tensor]:
    """Evaluates `graph` with plain torch; returns its outputs in the run's dtype. `inputs`
    holds the run-time inputs and the state leaves (KV caches) by name; a cache write
    returns the updated cache and leaves the given one as it was."""
    device = torch.device(device) if device is not None else None
    users = graph.users()
    remaining = [len(u) for u in users]
    for o in graph.outputs:
        remaining[o] += 1
    vals: dict[int, torch.Tensor] = {}
    for n in graph.nodes:
        if n.op == "parameter":
            vals[n.id] = _parameter(n, weights, dtype, device)
        elif n.op == "input":
            vals[n.id] = _input(graph, n, inputs, device)
        elif n.op == "state":
            if n.name not in inputs:
                raise InputError(f"state '{n.name}' is missing")
            check_float_input(n, inputs[n.name])
            vals[n.id] = inputs[n.name].to(device=device or inputs[n.name].device, dtype=dtype)
        else:
            args = [vals[i] for i in n.inputs]
            vals[n.id] = evaluate(n, *args)
            if not n.inputs and device is not None:  # a constant, made on the CPU
                vals[n.id] = vals[n.id].to(device)
            for i in set(n.inputs):  # free what no later node reads
                remaining[i] -= n.inputs.count(i)
                if remaining[i] == 0:
                    del vals[i]
    return [vals[o] for o in graph.outputs]


def _parameter(n: Node, weights: dict, dtype, device) -> torch.Tensor:
    if n.name not in weights:
        raise WeightsError(f"weight '{n.name}' is missing")
    w = weights[n.name]
    if tuple(w.shape) != n.shape:
        raise WeightsError(f"weight '{n.name}' has shape {list(w.shape)}, expected {list(n.shape)}")
    return w.to(device=device or w.device, dtype=dtype)


def _input(graph: Graph, n: Node, inputs: dict, device) -> torch.Tensor:
    if n.name not in inputs:
        raise InputError(f"input '{n.name}' is missing")
    ids = inputs[n.name]
    if n.dtype != "u32":
        check_float_input(n, ids)
        return ids.to(device=device or ids.device)
    vocab = None
    for u in graph.users()[n.id]:
        for pos, (bound, what) in input_bounds(graph, graph[u]).items():
            if what == "token id" and graph[u].inputs[pos] == n.id:
                vocab = bound
    check_token_ids(n, ids, vocab)
    return ids.to(device=device or ids.device)
