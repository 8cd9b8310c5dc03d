"""Graph IR: a list of nodes (op, inputs, shape, dtype, attrs) in topological order.

Builder methods carry the seed's names (`input_u32`, `parameter`, `embedding`,
`matmul`, `rms_norm`, `rope`, `causal_attention`, `sliding_window_attention`,
`add`, `swiglu`, `set_outputs`). The fused ops that the e-graph introduces
(`norm_matmul`, `matmul_add`, ...) are ops of the same vocabulary: an extracted
plan is again a Graph, which the reference executor can run op by op.

Every builder infers the output shape and raises GraphError naming the node and
the mismatch; `Graph.validate()` re-checks a whole graph (dangling inputs,
cycles, unknown ops) before it reaches the optimizer.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterator

from ..errors import GraphError

Shape = tuple[int, ...]
FLOAT, U32 = "f32", "u32"


@dataclass(frozen=True)
class Node:
    id: int
    op: str
    inputs: tuple[int, ...]
    shape: Shape
    dtype: str
    attrs: dict = field(default_factory=dict, compare=False)
    name: str | None = None  # inputs and parameters only
    block: str | None = None  # repeated-structure label, e.g. "layer.3"


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


class Graph:
    """A computation graph built op by op; node ids are positions in `nodes`."""

    def __init__(self, nodes: list[Node] | None = None, outputs: list[int] | None = None):
        self.nodes: list[Node] = list(nodes or [])
        self.outputs: list[int] = list(outputs or [])
        self._block: str | None = None
        self._names = {n.name: n.id for n in self.nodes if n.name is not None}

    # ---- leaves -------------------------------------------------------------------------

    def input_u32(self, name: str, shape: Shape) -> int:
        return self._leaf("input", name, shape, U32)

    def input_f32(self, name: str, shape: Shape) -> int:
        """A floating-point run-time input (e.g. hidden states fed from outside)."""
        return self._leaf("input", name, shape, FLOAT)

    def parameter(self, name: str, shape: Shape) -> int:
        return self._leaf("parameter", name, shape, FLOAT)

    # ---- the seed's ops -----------------------------------------------------------------

    def embedding(self, ids: int, table: int) -> int:
        return self._node("embedding", (ids, table))

    def matmul(self, a: int, b: int) -> int:
        return self._node("matmul", (a, b))

    def rms_norm(self, x: int, w: int, eps: float) -> int:
        return self._node("rms_norm", (x, w), eps=float(eps))

    def rope(self, x: int, theta: float, head_dim: int) -> int:
        return self._node("rope", (x,), theta=float(theta), head_dim=int(head_dim))

    def causal_attention(self, q: int, k: int, v: int, num_heads: int, num_kv_heads: int,
                         head_dim: int) -> int:
        return self._node("causal_attention", (q, k, v), num_heads=int(num_heads),
                          num_kv_heads=int(num_kv_heads), head_dim=int(head_dim))

    def sliding_window_attention(self, q: int, k: int, v: int, num_heads: int,
                                 num_kv_heads: int, head_dim: int, window: int) -> int:
        return self._node("sliding_window_attention", (q, k, v), num_heads=int(num_heads),
                          num_kv_heads=int(num_kv_heads), head_dim=int(head_dim),
                          window=int(window))

    def add(self, a: int, b: int) -> int:
        return self._node("add", (a, b))

    def swiglu(self, gate: int, up: int) -> int:
        return self._node("swiglu", (gate, up))

    def set_outputs(self, outputs: list[int]) -> None:
        for o in outputs:
            if not (0 <= o < len(self.nodes)):
                raise GraphError(f"set_outputs: node %{o} does not exist")
        self.outputs = list(outputs)

    # ---- layout and fused ops (built by the e-graph decoder) ----------------------------

    def concat_cols(self, a: int, b: int) -> int:
        return self._node("concat_cols", (a, b))

    def scale_rows(self, w: int, v: int) -> int:
        return self._node("scale_rows", (w, v))

    def slice_cols(self, x: int, start: int, width: int) -> int:
        return self._node("slice_cols", (x,), start=int(start), width=int(width))

    def norm_matmul(self, x: int, b: int, eps: float) -> int:
        return self._node("norm_matmul", (x, b), eps=float(eps))

    def matmul_add(self, a: int, b: int, r: int) -> int:
        return self._node("matmul_add", (a, b, r))

    def matmul_swiglu(self, a: int, b: int) -> int:
        return self._node("matmul_swiglu", (a, b))

    def norm_matmul_swiglu(self, x: int, b: int, eps: float) -> int:
        return self._node("norm_matmul_swiglu", (x, b), eps=float(eps))

    def norm_rope(self, x: int, w: int, eps: float, theta: float, head_dim: int) -> int:
        return self._node("norm_rope", (x, w), eps=float(eps), theta=float(theta),
                          head_dim=int(head_dim))

    def op(self, op: str, inputs: tuple[int, ...], **attrs) -> int:
        """Adds a node of any non-leaf op by name (the e-graph decoder uses this)."""
        if op not in OPS or OPS[op].rule is None:
            raise GraphError(f"unknown op {op!r}")
        return self._node(op, tuple(inputs), **attrs)

    # ---- structure ----------------------------------------------------------------------

    @contextlib.contextmanager
    def block(self, label: str) -> Iterator[None]:
        """Nodes built inside carry `label`: repeated blocks (layers) are optimized once."""
        outer, self._block = self._block, label
        try:
            yield
        finally:
            self._block = outer

    def __len__(self) -> int:
        return len(self.nodes)

    def __getitem__(self, i: int) -> Node:
        return self.nodes[i]

    def users(self) -> list[list[int]]:
        users: list[list[int]] = [[] for _ in self.nodes]
        for n in self.nodes:
            for i in n.inputs:
                users[i].append(n.id)
        return users

    def parameters(self) -> list[Node]:
        return [n for n in self.nodes if n.op == "parameter"]

    def inputs(self) -> list[Node]:
        return [n for n in self.nodes if n.op == "input"]

    def op_counts(self) -> Counter:
        return Counter(n.op for n in self.nodes)

    def label(self, i: int) -> str:
        n = self.nodes[i]
        return f"%{i} {n.op}" + (f" '{n.name}'" if n.name else "")

    def validate(self) -> None:
        """Re-checks the whole graph: ids, ops, arity, acyclicity, shapes, outputs."""
        for pos, n in enumerate(self.nodes):
            if n.id != pos:
                raise GraphError(f"node at position {pos} has id %{n.id}")
            if n.op not in OPS:
                raise GraphError(f"%{pos}: unknown op {n.op!r}")
            for i in n.inputs:
                if not (0 <= i < len(self.nodes)):
                    raise GraphError(f"{self.label(pos)}: input %{i} does not exist (dangling)")
        self._check_acyclic()
        for n in self.nodes:
            spec = OPS[n.op]
            if spec.rule is None:
                if n.inputs or not n.name:
                    raise GraphError(f"{self.label(n.id)}: a leaf needs a name and no inputs")
                continue
            try:
                shape = self._infer(n.op, n.inputs, n.attrs)
            except GraphError as e:
                raise GraphError(f"{self.label(n.id)}: {e}") from None
            if shape != n.shape:
                raise GraphError(f"{self.label(n.id)}: recorded shape {list(n.shape)} but inputs "
                                 f"give {list(shape)}")
        if not self.outputs:
            raise GraphError("graph has no outputs (call set_outputs)")
        for o in self.outputs:
            if not (0 <= o < len(self.nodes)):
                raise GraphError(f"output %{o} does not exist")

    # ---- internals ----------------------------------------------------------------------

    def _check_acyclic(self) -> None:
        state = [0] * len(self.nodes)  # 0 new, 1 on stack, 2 done
        for root in range(len(self.nodes)):
            if state[root]:
                continue
            stack = [(root, iter(self.nodes[root].inputs))]
            state[root] = 1
            while stack:
                nid, it = stack[-1]
                nxt = next(it, None)
                if nxt is None:
                    state[nid] = 2
                    stack.pop()
                elif state[nxt] == 1:
                    raise GraphError(f"cycle through {self.label(nxt)} and {self.label(nid)}")
                elif state[nxt] == 0:
                    state[nxt] = 1
                    stack.append((nxt, iter(self.nodes[nxt].inputs)))

    def _leaf(self, op: str, name: str, shape: Shape, dtype: str) -> int:
        shape = tuple(int(s) for s in shape)
        if not isinstance(name, str) or not name:
            raise GraphError(f"{op}: name must be a non-empty string, got {name!r}")
        if name in self._names:
            raise GraphError(f"{op} '{name}': name already used by {self.label(self._names[name])}")
        if not shape or any(s <= 0 for s in shape):
            raise GraphError(f"{op} '{name}': every dimension must be > 0, got {list(shape)}")
        nid = len(self.nodes)
        self.nodes.append(Node(nid, op, (), shape, dtype, {}, name, self._block))
        self._names[name] = nid
        return nid

    def _infer(self, op: str, inputs: tuple[int, ...], attrs: dict) -> Shape:
        spec = OPS[op]
        if len(inputs) != spec.arity:
            raise GraphError(f"{op} takes {spec.arity} inputs, got {len(inputs)}")
        missing = set(spec.attrs) - set(attrs) - ({"window"} if op == "causal_attention" else set())
        extra = set(attrs) - set(spec.attrs)
        if missing or extra:
            raise GraphError(f"{op}: attributes {sorted(missing)} missing, {sorted(extra)} unknown")
        for i in inputs:
            if not isinstance(i, int) or not (0 <= i < len(self.nodes)):
                raise GraphError(f"{op}: input %{i} does not exist")
        shapes = [self.nodes[i].shape for i in inputs]
        dtypes = [self.nodes[i].dtype for i in inputs]
        if op != "embedding" and U32 in dtypes:
            raise GraphError(f"{op}: u32 input {self.label(inputs[dtypes.index(U32)])} is only "
                             f"valid as embedding ids")
        try:
            return tuple(spec.rule(shapes, dtypes, attrs))
        except _Mismatch as e:
            args = ", ".join(self.label(i) for i in inputs)
            raise GraphError(f"{op}({args}): {e}") from None

    def _node(self, op: str, inputs: tuple[int, ...], **attrs) -> int:
        shape = self._infer(op, inputs, attrs)
        nid = len(self.nodes)
        self.nodes.append(Node(nid, op, tuple(inputs), shape, FLOAT, attrs, None, self._block))
        return nid
