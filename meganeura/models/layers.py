"""Pieces the decoder families build the same way (kv.py holds positions, attention and caches)."""

from __future__ import annotations

from ..compiler.graph import Graph


def linear(g: Graph, h: int, name: str, out: int, inp: int) -> int:
    """h @ W^T with W stored [out, in] as in the checkpoint: read in place through a transpose."""
    return g.matmul(h, g.transpose(g.parameter(name, (out, inp))))


def gated_mlp(g: Graph, h: int, prefix: str, hidden: int, ffn: int, act: str) -> int:
    """down(act(h @ Wg^T) * (h @ Wu^T)): SwiGLU (silu) or GeGLU (gelu_tanh). h: [S, hidden]."""
    gate = linear(g, h, f"{prefix}.gate_proj.weight", ffn, hidden)
    up = linear(g, h, f"{prefix}.up_proj.weight", ffn, hidden)
    return linear(g, g.glu(gate, up, act), f"{prefix}.down_proj.weight", hidden, ffn)
