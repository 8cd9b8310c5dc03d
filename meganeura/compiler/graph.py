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
from typing import Iterator

from ..errors import GraphError
from .ops import FLOAT, OPS, U32, Shape, _Mismatch  # noqa: F401 (re-exported)


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
        edge = find_cycle(range(len(self.nodes)), lambda i: self.nodes[i].inputs)
        if edge:
            raise GraphError(f"cycle through {self.label(edge[1])} and {self.label(edge[0])}")

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


def find_cycle(roots, children) -> tuple | None:
    """An edge (parent, child) that closes a cycle reachable from `roots`, or None.

    Iterative depth-first search: graphs of thousands of nodes stay off Python's stack.
    """
    state: dict = {}  # 1 on the stack, 2 done
    for root in roots:
        if root in state:
            continue
        stack = [(root, iter(children(root)))]
        state[root] = 1
        while stack:
            node, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                state[node] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return node, nxt
            elif nxt not in state:
                state[nxt] = 1
                stack.append((nxt, iter(children(nxt))))
    return None
