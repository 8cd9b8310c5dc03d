"""Graph IR: a list of nodes (op, inputs, shape, dtype, attrs) in topological order.

Every op of the vocabulary (`compiler/ops.py`) has a builder of its name, taking its
tensor operands then its attributes: `g.matmul(a, b)`, `g.rms_norm(x, w, eps)`,
`g.rope(x, theta, head_dim)`, `g.causal_attention(q, k, v, heads, kv_heads, head_dim)`;
attributes the declaration gives a default for may be left out. The seed's names
`swiglu` and the published model's `geglu` are the gated op with its activation. The
fused kernels the e-graph introduces are nodes of the archetype ops (`product`, `rows`,
`pointwise`, `gather`) with their stages as attributes (`compiler/kernels.py`), built with
`g.kernel("product", (x, b), prologue=[stage("rms_norm", w, eps=1e-6)])`: an extracted plan is
again a Graph, which the reference executor can run node by node.

Every builder infers the output shape and raises GraphError naming the node and
the mismatch; `Graph.validate()` re-checks a whole graph (dangling inputs,
cycles, unknown ops) before it reaches the optimizer.
"""

from __future__ import annotations

import contextlib
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator

from ..errors import GraphError
from .kernels import ARCHETYPES, Stage, StageSpec, index_inputs, updated_input
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

    def __init__(self, nodes: list[Node] | None = None, outputs: list[int] | None = None,
                 effects: list[int] | None = None):
        self.nodes: list[Node] = list(nodes or [])
        self.outputs: list[int] = list(outputs or [])
        self.effects: list[int] = list(effects or [])  # run for their state writes, not returned
        self._block: str | None = None
        self._names = {n.name: n.id for n in self.nodes if n.name is not None}
        self.wide: frozenset[int] = frozenset()  # a plan's nodes held in fp32 (plan.py)

    # ---- leaves -------------------------------------------------------------------------

    def input_u32(self, name: str, shape: Shape) -> int:
        return self._leaf("input", name, shape, U32)

    def input_f32(self, name: str, shape: Shape, fp32: bool = False) -> int:
        """A floating-point run-time input (e.g. hidden states fed from outside), held in the
        plan dtype; fp32=True holds it in fp32 whatever the plan dtype (a gradient's seed:
        1/255 rounded to bf16 would scale every gradient by 0.996)."""
        return self._leaf("input", name, shape, FLOAT, {"fp32": True} if fp32 else {})

    def input_like(self, n: Node) -> int:
        """An input of `n`'s name, shape and kind (another graph's input node)."""
        if n.dtype == U32:
            return self.input_u32(n.name, n.shape)
        return self.input_f32(n.name, n.shape, bool(n.attrs.get("fp32")))

    def parameter(self, name: str, shape: Shape) -> int:
        return self._leaf("parameter", name, shape, FLOAT)

    def state(self, name: str, shape: Shape) -> int:
        """Persistent run-time state (a KV cache): an external buffer that kernels update."""
        return self._leaf("state", name, shape, FLOAT)

    # ---- ops ----------------------------------------------------------------------------

    def __getattr__(self, op: str):
        """`g.<op>(*operands, *attrs, **attrs)`: a builder for every non-leaf op of OPS."""
        spec = OPS.get(op) if not op.startswith("_") else None
        if spec is None or spec.kind == "leaf":
            raise AttributeError(f"Graph has no builder {op!r}")
        if spec.variadic:
            return lambda main, prologue=(), epilogue=(): self.kernel(op, main, prologue, epilogue)

        def build(*args, **attrs) -> int:
            if len(args) < spec.arity or len(args) > spec.arity + len(spec.attrs):
                raise GraphError(f"{op} takes {spec.arity} operands ({', '.join(spec.inputs)}) "
                                 f"then attributes ({', '.join(spec.attr_names)}), got "
                                 f"{len(args)} positional arguments")
            for name, value in zip(spec.attr_names, args[spec.arity:]):
                if name in attrs:
                    raise GraphError(f"{op}: attribute {name} given twice")
                attrs[name] = value
            return self._node(op, tuple(args[:spec.arity]), **attrs)

        build.__doc__ = spec.doc
        return build

    def swiglu(self, gate: int, up: int) -> int:
        """silu(gate) * up: the seed's gated MLP."""
        return self.glu(gate, up, "silu")

    def geglu(self, gate: int, up: int) -> int:
        """gelu_tanh(gate) * up: the published Gemma-4's gated MLP."""
        return self.glu(gate, up, "gelu_tanh")

    def set_outputs(self, outputs: list[int], effects: list[int] = ()) -> None:
        """What a run returns, and the nodes it runs for their effect alone (cache writes)."""
        for o in list(outputs) + list(effects):
            if not (0 <= o < len(self.nodes)):
                raise GraphError(f"set_outputs: node %{o} does not exist")
        for e in effects:
            if updated_input(self.nodes[e]) is None:
                raise GraphError(f"set_outputs: {self.label(e)} has no effect to run for")
        self.outputs = list(outputs)
        self.effects = list(effects)

    @property
    def roots(self) -> list[int]:
        """Everything a run must compute: the outputs and the effects."""
        return self.outputs + self.effects

    def kernel(self, archetype: str, main, prologue=(), epilogue=()) -> int:
        """A fused kernel: the archetype's own operands (`main`), then its stages, each an op
        applied to the running value with its other operands (node ids) and attributes
        (kernels.stage(op, *operands, at=0, pair=False, **attrs)); attributes the op's
        declaration gives defaults for may be left out."""
        if archetype not in ARCHETYPES:
            raise GraphError(f"unknown archetype {archetype!r} (known: {', '.join(ARCHETYPES)})")
        inputs = list(main)
        extra: list[int] = []  # stage operands, each once, after the archetype's own

        def place(specs, where):
            out = []
            for st in specs:
                if not isinstance(st, StageSpec) or st.op not in OPS:
                    raise GraphError(f"{archetype} {where}: {st!r} is not a stage of a known op")
                attrs = _complete_attrs(OPS[st.op], dict(st.attrs))
                for i in st.operands:
                    if i not in extra:
                        extra.append(i)
                pos = tuple(len(inputs) + extra.index(i) for i in st.operands)
                out.append(Stage(st.op, pos, tuple(attrs.items()), st.at, st.pair))
            return tuple(out)

        pro, epi = place(prologue, "prologue"), place(epilogue, "epilogue")
        return self._node(archetype, tuple(inputs + extra), prologue=pro, epilogue=epi)

    def copy_node(self, n: Node, inputs: tuple[int, ...]) -> int:
        """A node like `n` (of another graph) on these inputs: a leaf by its name and shape,
        an op with its attributes (graph rewrites that rebuild a graph node by node)."""
        if n.op == "parameter":
            return self.parameter(n.name, n.shape)
        if n.op == "input":
            return self.input_like(n)
        if n.op == "state":
            return self.state(n.name, n.shape)
        return self.op(n.op, inputs, **n.attrs)

    def op(self, op: str, inputs: tuple[int, ...], **attrs) -> int:
        """Adds a node of any non-leaf op by name (the e-graph decoder uses this)."""
        if op not in OPS or OPS[op].kind == "leaf":
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

    def states(self) -> list[Node]:
        return [n for n in self.nodes if n.op == "state"]

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
            if OPS[n.op].kind == "leaf":
                if n.inputs or not n.name:
                    raise GraphError(f"{self.label(n.id)}: a leaf needs a name and no inputs")
                continue
            try:
                shape = self._infer(n.op, n.inputs, dict(n.attrs), n.id)
            except GraphError as e:
                raise GraphError(f"{self.label(n.id)}: {e}") from None
            if shape != n.shape:
                raise GraphError(f"{self.label(n.id)}: recorded shape {list(n.shape)} but inputs "
                                 f"give {list(shape)}")
        if not self.outputs:
            raise GraphError("graph has no outputs (call set_outputs)")
        for o in self.roots:
            if not (0 <= o < len(self.nodes)):
                raise GraphError(f"output %{o} does not exist")

    def load_time(self, i: int, _memo: dict | None = None) -> bool:
        """Whether node i is computable from parameters alone (no run-time input reaches it)."""
        memo = {} if _memo is None else _memo
        stack = [i]
        while stack:
            j = stack[-1]
            if j in memo:
                stack.pop()
                continue
            n = self.nodes[j]
            if n.op in ("parameter", "input", "state"):
                memo[j] = n.op == "parameter"
                stack.pop()
                continue
            todo = [k for k in n.inputs if k not in memo]
            if todo:
                stack.extend(todo)
                continue
            memo[j] = all(memo[k] for k in n.inputs)
            stack.pop()
        return memo[i]

    # ---- internals ----------------------------------------------------------------------

    def _check_acyclic(self) -> None:
        edge = find_cycle(range(len(self.nodes)), lambda i: self.nodes[i].inputs)
        if edge:
            raise GraphError(f"cycle through {self.label(edge[1])} and {self.label(edge[0])}")

    def _leaf(self, op: str, name: str, shape: Shape, dtype: str,
              attrs: dict | None = None) -> int:
        if not isinstance(name, str) or not name:
            raise GraphError(f"{op}: name must be a non-empty string, got {name!r}")
        if not isinstance(shape, (tuple, list)) or not all(
                isinstance(s, int) and not isinstance(s, bool) for s in shape):
            raise GraphError(f"{op} '{name}': shape must be a tuple of integers, got {shape!r}")
        shape = tuple(shape)
        if name in self._names:
            raise GraphError(f"{op} '{name}': name already used by {self.label(self._names[name])}")
        if not shape or any(s <= 0 for s in shape):
            raise GraphError(f"{op} '{name}': every dimension must be > 0, got {list(shape)}")
        nid = len(self.nodes)
        self.nodes.append(Node(nid, op, (), shape, dtype, dict(attrs or {}), name, self._block))
        self._names[name] = nid
        return nid

    def _infer(self, op: str, inputs: tuple[int, ...], attrs: dict, nid: int | None = None) -> Shape:
        """Checks operands and attributes (filling declared defaults into `attrs`) and returns
        the output shape."""
        spec = OPS[op]
        if len(inputs) != spec.arity and not (spec.variadic and len(inputs) >= spec.arity):
            raise GraphError(f"{op} takes {spec.arity} inputs, got {len(inputs)}")
        for i in inputs:
            if not isinstance(i, int) or isinstance(i, bool) or not (0 <= i < len(self.nodes)) \
                    or (nid is not None and i >= nid):
                raise GraphError(f"{op}: input %{i} does not exist")
        if spec.variadic:
            if set(attrs) != {"prologue", "epilogue"}:
                raise GraphError(f"{op}: attributes must be prologue and epilogue, got "
                                 f"{sorted(attrs)}")
        else:
            attrs.update(_complete_attrs(spec, attrs))
        shapes = [self.nodes[i].shape for i in inputs]
        dtypes = [self.nodes[i].dtype for i in inputs]
        try:
            shape = tuple(spec.shape(shapes, dtypes, attrs))
        except _Mismatch as e:
            args = ", ".join(self.label(i) for i in inputs)
            raise GraphError(f"{op}({args}): {e}") from None
        indices = index_inputs(op, attrs, len(inputs))
        for pos, (i, d) in enumerate(zip(inputs, dtypes)):
            if (d == U32) != (pos in indices):
                what = "only valid as token ids or positions" if d == U32 else \
                    "token ids or positions, which must be u32"
                raise GraphError(f"{op}: input {self.label(i)} is {d}: {what}")
        if spec.kind == "layout":
            memo: dict = {}
            for i in inputs:
                if not self.load_time(i, memo):
                    raise GraphError(f"{op}: operand {self.label(i)} depends on a run-time input; "
                                     f"{op} applies to weights only (it is evaluated at load time)")
        return shape

    def _node(self, op: str, inputs: tuple[int, ...], **attrs) -> int:
        shape = self._infer(op, inputs, attrs)
        nid = len(self.nodes)
        self.nodes.append(Node(nid, op, tuple(inputs), shape, OPS[op].out_dtype, attrs, None,
                               self._block))
        return nid


def _complete_attrs(spec, attrs: dict) -> dict:
    """The op's attributes in declared order, the declared defaults filled in and each
    coerced to its type; GraphError for a missing or unknown one."""
    attrs = dict(attrs)
    for name, fill in spec.defaults.items():
        if name not in attrs:
            try:
                attrs[name] = fill(attrs) if callable(fill) else fill
            except (KeyError, TypeError, ValueError, ZeroDivisionError):
                pass  # the missing attribute it depends on is reported below
    missing = set(spec.attr_names) - set(attrs)
    extra = set(attrs) - set(spec.attr_names)
    if missing or extra:
        raise GraphError(f"{spec.name}: attributes {sorted(missing)} missing, {sorted(extra)} "
                         f"unknown")
    return {name: _coerce(spec.name, name, kind, attrs[name]) for name, kind in spec.attrs}


def _coerce(op: str, name: str, kind: type, value):
    """An attribute as its declared type: float (finite), int or str; bools are refused."""
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        value = float(value)
        if math.isfinite(value):
            return value
    elif kind is int and isinstance(value, int) and not isinstance(value, bool):
        if -2 ** 63 <= value < 2 ** 63:
            return value
    elif kind is str and isinstance(value, str):
        return value
    want = {float: "a finite number", int: "a 64-bit integer", str: "a string"}[kind]
    raise GraphError(f"{op}: attribute {name} must be {want}, got {value!r}")


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
