"""The op vocabulary: every op's arity, attributes and shape rule.

A shape rule takes the input shapes, input dtypes and attributes and returns the output
shape, or raises _Mismatch with what is wrong; Graph turns that into a GraphError that
names the node. The e-graph extractor runs the same rules over e-classes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

FLOAT, U32 = "f32", "u32"
Shape = tuple[int, ...]


class _Mismatch(Exception):
    """Raised by shape rules; `Graph._node` turns it into a GraphError naming the node."""


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise _Mismatch(msg)


def _rank(s: Shape, r: int, what: str) -> None:
    _need(len(s) == r, f"{what} must have rank {r}, got shape {list(s)}")


# ---- shape rules: (input shapes, input dtypes, attrs) -> output shape ---------------------


def _embedding(s, d, a):
    ids, table = s
    _rank(ids, 1, "token ids")
    _rank(table, 2, "embedding table")
    _need(d[0] == U32, f"token ids must be u32, got {d[0]}")
    return (ids[0], table[1])


def _matmul(s, d, a):
    x, w = s
    _rank(x, 2, "left operand")
    _rank(w, 2, "right operand")
    _need(x[1] == w[0], f"inner dims differ: left is {list(x)}, right is {list(w)}")
    return (x[0], w[1])


def _same(s, d, a):
    _need(s[0] == s[1], f"shapes differ: {list(s[0])} vs {list(s[1])}")
    return s[0]


def _rms_norm(s, d, a):
    x, w = s
    _rank(x, 2, "normalized input")
    _need(w == (x[1],), f"norm weight must be [{x[1]}] to match input {list(x)}, got {list(w)}")
    _need(a["eps"] > 0, f"eps must be > 0, got {a['eps']}")
    return x


def _rope(s, d, a):
    (x,) = s
    _rank(x, 2, "rotated input")
    hd = a["head_dim"]
    _need(hd > 0 and hd % 2 == 0, f"head_dim must be even and > 0, got {hd}")
    _need(x[1] % hd == 0, f"width {x[1]} is not a multiple of head_dim {hd}")
    _need(a["theta"] > 0, f"theta must be > 0, got {a['theta']}")
    return x


def _attention(s, d, a):
    q, k, v = s
    for t, what in ((q, "q"), (k, "k"), (v, "v")):
        _rank(t, 2, what)
    h, kvh, hd = a["num_heads"], a["num_kv_heads"], a["head_dim"]
    _need(h > 0 and kvh > 0 and hd > 0, f"heads {h}, kv heads {kvh}, head_dim {hd} must be > 0")
    _need(h % kvh == 0, f"num_heads {h} is not a multiple of num_kv_heads {kvh}")
    _need(q[1] == h * hd, f"q is {list(q)}, expected width num_heads*head_dim = {h * hd}")
    _need(k[1] == kvh * hd, f"k is {list(k)}, expected width num_kv_heads*head_dim = {kvh * hd}")
    _need(v == k, f"v is {list(v)}, k is {list(k)}: they must match")
    _need(q[0] == k[0], f"q has {q[0]} rows, k has {k[0]}")
    _need(a.get("window", 1) > 0, f"window must be > 0, got {a.get('window')}")
    return q


def _concat_cols(s, d, a):
    x, y = s
    _rank(x, 2, "left block")
    _rank(y, 2, "right block")
    _need(x[0] == y[0], f"row counts differ: {list(x)} vs {list(y)}")
    return (x[0], x[1] + y[1])


def _scale_rows(s, d, a):
    w, v = s
    _rank(w, 2, "scaled matrix")
    _need(v == (w[0],), f"row scale must be [{w[0]}] for matrix {list(w)}, got {list(v)}")
    return w


def _slice_cols(s, d, a):
    (x,) = s
    _rank(x, 2, "sliced input")
    start, width = a["start"], a["width"]
    _need(start >= 0 and width > 0 and start + width <= x[1],
          f"columns [{start}, {start + width}) out of range for {list(x)}")
    return (x[0], width)


def _norm_matmul(s, d, a):
    _need(a["eps"] > 0, f"eps must be > 0, got {a['eps']}")
    return _matmul(s, d, a)


def _matmul_add(s, d, a):
    out = _matmul(s[:2], d, a)
    _need(s[2] == out, f"residual is {list(s[2])}, product is {list(out)}")
    return out


def _matmul_swiglu(s, d, a):
    m, n2 = _matmul(s, d, a)
    _need(n2 % 2 == 0, f"paired gate/up weight must have an even width, got {n2}")
    return (m, n2 // 2)


def _norm_matmul_swiglu(s, d, a):
    _need(a["eps"] > 0, f"eps must be > 0, got {a['eps']}")
    return _matmul_swiglu(s, d, a)


def _norm_rope(s, d, a):
    _rms_norm(s, d, a)
    return _rope(s[:1], d, a)


@dataclass(frozen=True)
class OpSpec:
    arity: int
    attrs: tuple[str, ...]
    rule: Callable
    doc: str


OPS: dict[str, OpSpec] = {
    # leaves
    "input": OpSpec(0, (), None, "a run-time input tensor (token ids)"),
    "parameter": OpSpec(0, (), None, "a named weight tensor"),
    # the seed's ops
    "embedding": OpSpec(2, (), _embedding, "rows of table gathered by token id"),
    "matmul": OpSpec(2, (), _matmul, "a @ b"),
    "rms_norm": OpSpec(2, ("eps",), _rms_norm, "x * rsqrt(mean(x^2) + eps) * w, in fp32"),
    "rope": OpSpec(1, ("theta", "head_dim"), _rope, "half-split rotary embedding per head"),
    "causal_attention": OpSpec(3, ("num_heads", "num_kv_heads", "head_dim"), _attention,
                               "softmax(q k^T / sqrt(d)) v, causal, GQA"),
    "sliding_window_attention": OpSpec(3, ("num_heads", "num_kv_heads", "head_dim", "window"),
                                       _attention, "causal attention to the last `window` keys"),
    "add": OpSpec(2, (), _same, "a + b"),
    "swiglu": OpSpec(2, (), _same, "silu(gate) * up"),
    # layout ops the rewrites introduce
    "concat_cols": OpSpec(2, (), _concat_cols, "[a | b] along columns"),
    "scale_rows": OpSpec(2, (), _scale_rows, "w * v[:, None]: a norm weight folded into a matrix"),
    "slice_cols": OpSpec(1, ("start", "width"), _slice_cols, "x[:, start:start+width], a view"),
    # fused kernels the rewrites introduce
    "norm_matmul": OpSpec(2, ("eps",), _norm_matmul, "rsqrt(mean(x^2) + eps) * (x @ b)"),
    "matmul_add": OpSpec(3, (), _matmul_add, "a @ b + r"),
    "matmul_swiglu": OpSpec(2, (), _matmul_swiglu, "silu(a @ b[:, :n]) * (a @ b[:, n:])"),
    "norm_matmul_swiglu": OpSpec(2, ("eps",), _norm_matmul_swiglu,
                                 "matmul_swiglu of the row-normalized x"),
    "norm_rope": OpSpec(2, ("eps", "theta", "head_dim"), _norm_rope, "rope(rms_norm(x, w))"),
}
