"""Plain-PyTorch interpreter of the Graph IR: the oracle for every numerical test.

Each op is a few lines of torch that follow its formula; fused ops are written as
their definitions, so an extracted plan (a Graph of fused ops) runs here too and
must agree with the unoptimized graph. Norms, RoPE and softmax run in fp32 and
cast back to the run's dtype; matmuls run in the run's dtype.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..compiler.graph import Graph, Node
from ..errors import InputError, WeightsError


def _rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    # rsqrt(mean(x^2) + eps) per row, fp32: [M, 1]
    x32 = x.float()
    return torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + eps)


def rms_norm(x, w, eps):
    return (x.float() * _rms(x, eps) * w.float()).to(x.dtype)


def rope(x, theta, head_dim):
    # x: [S, heads*head_dim]; pair d with d + head_dim/2 inside each head
    s, width = x.shape
    half = head_dim // 2
    inv_freq = theta ** (-2.0 * torch.arange(half, device=x.device, dtype=torch.float64) / head_dim)
    ang = torch.arange(s, device=x.device, dtype=torch.float64)[:, None] * inv_freq[None, :]
    cos, sin = ang.cos().float()[:, None, :], ang.sin().float()[:, None, :]
    xh = x.float().view(s, width // head_dim, head_dim)
    x1, x2 = xh[..., :half], xh[..., half:]
    out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return out.reshape(s, width).to(x.dtype)


def attention(q, k, v, num_heads, num_kv_heads, head_dim, window=None):
    # q: [S, H*hd], k/v: [S, KV*hd]; query head h reads kv head h // (H / KV)
    s = q.shape[0]
    group = num_heads // num_kv_heads
    qh = q.view(s, num_heads, head_dim).transpose(0, 1)  # [H, S, hd]
    kh = k.view(s, num_kv_heads, head_dim).transpose(0, 1)
    vh = v.view(s, num_kv_heads, head_dim).transpose(0, 1)
    i = torch.arange(s, device=q.device)[:, None]
    j = torch.arange(s, device=q.device)[None, :]
    allowed = j <= i
    if window is not None:
        allowed &= j > i - window
    out = torch.empty_like(qh)
    scale = 1.0 / math.sqrt(head_dim)
    for g in range(num_kv_heads):  # one kv head at a time bounds the [group, S, S] scores
        qg = qh[g * group:(g + 1) * group].float()
        scores = (qg @ kh[g].float().T) * scale
        p = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
        out[g * group:(g + 1) * group] = (p @ vh[g].float()).to(q.dtype)
    return out.transpose(0, 1).reshape(s, num_heads * head_dim)


def swiglu(gate, up):
    return (F.silu(gate.float()) * up.float()).to(gate.dtype)


def _halves(t):
    n = t.shape[1] // 2
    return t[:, :n], t[:, n:]


def _norm_rows(x, eps):
    return (x.float() * _rms(x, eps)).to(x.dtype)


REFERENCE_OPS = {
    "embedding": lambda n, ids, table: table[ids.long()],
    "matmul": lambda n, a, b: a @ b,
    "rms_norm": lambda n, x, w: rms_norm(x, w, n.attrs["eps"]),
    "rope": lambda n, x: rope(x, n.attrs["theta"], n.attrs["head_dim"]),
    "causal_attention": lambda n, q, k, v: attention(
        q, k, v, n.attrs["num_heads"], n.attrs["num_kv_heads"], n.attrs["head_dim"]),
    "sliding_window_attention": lambda n, q, k, v: attention(
        q, k, v, n.attrs["num_heads"], n.attrs["num_kv_heads"], n.attrs["head_dim"],
        n.attrs["window"]),
    "add": lambda n, a, b: a + b,
    "swiglu": lambda n, g, u: swiglu(g, u),
    "concat_cols": lambda n, a, b: torch.cat([a, b], dim=1),
    "scale_rows": lambda n, w, v: (w.float() * v.float()[:, None]).to(w.dtype),
    "slice_cols": lambda n, x: x[:, n.attrs["start"]:n.attrs["start"] + n.attrs["width"]],
    "norm_matmul": lambda n, x, b: _norm_rows(x, n.attrs["eps"]) @ b,
    "matmul_add": lambda n, a, b, r: a @ b + r,
    "matmul_swiglu": lambda n, a, b: swiglu(*_halves(a @ b)),
    "norm_matmul_swiglu": lambda n, x, b: swiglu(*_halves(_norm_rows(x, n.attrs["eps"]) @ b)),
    "norm_rope": lambda n, x, w: rope(rms_norm(x, w, n.attrs["eps"]), n.attrs["theta"],
                                      n.attrs["head_dim"]),
}


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
    """Evaluates `graph` with plain torch; returns its outputs in the run's dtype."""
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
        else:
            args = [vals[i] for i in n.inputs]
            vals[n.id] = REFERENCE_OPS[n.op](n, *args)
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
        if graph[u].op == "embedding":
            vocab = graph[graph[u].inputs[1]].shape[0]
    check_token_ids(n, ids, vocab)
    return ids.to(device=device or ids.device)
