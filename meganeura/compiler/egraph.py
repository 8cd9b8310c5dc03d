"""Graph IR <-> egglog terms.

`Tensor` is the e-graph language: one constructor per IR op (the seed's ops, the
layout ops and the fused kernels), named exactly as the op, so a serialized
e-node decodes straight back into a Graph node. A block of the graph is encoded
with its parameters as `parameter(slot)` and everything computed outside it as
`input(slot)`; every tensor the block hands out is marked by `root(i)`.

After saturation the e-graph is serialized and read into `EClasses`, a plain
Python structure (class -> e-nodes with child classes and literal attributes)
that the cost model and the extractor work on: egglog's own extractor sums
costs as a tree, which is wrong (and overflows) once residual connections share
subterms.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from egglog import EGraph, Expr, f64Like, function, i64, i64Like, method, set_, union

from .graph import Graph
from .ops import OPS


class Tensor(Expr):
    """A tensor-valued term of the IR."""

    @method(egg_fn="input")
    @classmethod
    def input(cls, slot: i64Like) -> Tensor:
        """A run-time input, or a tensor computed outside this block."""

    @method(egg_fn="parameter")
    @classmethod
    def parameter(cls, slot: i64Like) -> Tensor:
        """A weight of this block, by slot."""

    @method(egg_fn="embedding")
    def embedding(self, table: Tensor) -> Tensor:
        """Rows of `table` gathered by the token ids in self."""

    @method(egg_fn="matmul")
    def matmul(self, b: Tensor) -> Tensor:
        """self @ b."""

    @method(egg_fn="rms_norm")
    def rms_norm(self, w: Tensor, eps: f64Like) -> Tensor:
        """self * rsqrt(mean(self^2) + eps) * w, per row."""

    @method(egg_fn="rope")
    def rope(self, theta: f64Like, head_dim: i64Like) -> Tensor:
        """Half-split rotary embedding of each head."""

    @method(egg_fn="causal_attention")
    def causal_attention(self, k: Tensor, v: Tensor, num_heads: i64Like, num_kv_heads: i64Like,
                         head_dim: i64Like) -> Tensor:
        """Causal GQA attention with self as queries."""

    @method(egg_fn="sliding_window_attention")
    def sliding_window_attention(self, k: Tensor, v: Tensor, num_heads: i64Like,
                                 num_kv_heads: i64Like, head_dim: i64Like,
                                 window: i64Like) -> Tensor:
        """Causal GQA attention to the last `window` keys."""

    @method(egg_fn="add")
    def add(self, b: Tensor) -> Tensor:
        """self + b."""

    @method(egg_fn="swiglu")
    def swiglu(self, up: Tensor) -> Tensor:
        """silu(self) * up."""

    @method(egg_fn="concat_cols")
    def concat_cols(self, b: Tensor) -> Tensor:
        """[self | b] along columns (weights only: evaluated at load time)."""

    @method(egg_fn="scale_rows")
    def scale_rows(self, v: Tensor) -> Tensor:
        """self * v[:, None]: a norm weight folded into a weight matrix at load time."""

    @method(egg_fn="slice_cols")
    def slice_cols(self, start: i64Like, width: i64Like) -> Tensor:
        """self[:, start:start+width], a view."""

    @method(egg_fn="norm_matmul")
    def norm_matmul(self, b: Tensor, eps: f64Like) -> Tensor:
        """rsqrt(mean(self^2) + eps) * (self @ b): RMSNorm as the matmul's prologue."""

    @method(egg_fn="matmul_add")
    def matmul_add(self, b: Tensor, r: Tensor) -> Tensor:
        """self @ b + r: the residual add as the matmul's epilogue."""

    @method(egg_fn="matmul_swiglu")
    def matmul_swiglu(self, b: Tensor) -> Tensor:
        """silu(self @ b[:, :n]) * (self @ b[:, n:]): paired gate/up tiles."""

    @method(egg_fn="norm_matmul_swiglu")
    def norm_matmul_swiglu(self, b: Tensor, eps: f64Like) -> Tensor:
        """matmul_swiglu with the RMSNorm prologue."""

    @method(egg_fn="norm_rope")
    def norm_rope(self, w: Tensor, eps: f64Like, theta: f64Like, head_dim: i64Like) -> Tensor:
        """rope(rms_norm(self, w)) in one row-wise pass."""


@function(egg_fn="cols")
def cols(t: Tensor) -> i64:
    """Analysis: the column count of a tensor."""


@function(egg_fn="root")
def root(slot: i64Like) -> Tensor:
    """Marks the block's output `slot`; never extracted."""


LEAVES = ("input", "parameter")
_FLOAT_ATTRS = {"eps", "theta"}


@dataclass
class Block:
    """A piece of the graph to optimize: its nodes, the tensors it reads and hands out."""

    nodes: list[int]
    inputs: list[int]  # node ids computed outside (or graph inputs), by input slot
    params: list[int]  # parameter node ids, by parameter slot
    outputs: list[int]  # node ids read outside (or graph outputs), by root slot


def encode(graph: Graph, block: Block, egraph: EGraph) -> None:
    """Adds the block's terms to `egraph`, one let-binding per node (shared, never re-expanded)."""
    terms: dict[int, Tensor] = {}
    for slot, nid in enumerate(block.inputs):
        terms[nid] = egraph.let(f"i{slot}", Tensor.input(slot))
        egraph.register(set_(cols(terms[nid])).to(i64(graph[nid].shape[-1])))
    for slot, nid in enumerate(block.params):
        terms[nid] = egraph.let(f"p{slot}", Tensor.parameter(slot))
        egraph.register(set_(cols(terms[nid])).to(i64(graph[nid].shape[-1])))
    for nid in block.nodes:
        n = graph[nid]
        if nid in terms:
            continue
        args = [terms[i] for i in n.inputs] + [n.attrs[a] for a in OPS[n.op].attrs]
        term = getattr(Tensor, n.op)(*args) if n.op in LEAVES else getattr(args[0], n.op)(*args[1:])
        terms[nid] = egraph.let(f"n{nid}", term)
    for slot, nid in enumerate(block.outputs):
        egraph.register(union(root(slot)).with_(terms[nid]))


@dataclass
class ENode:
    op: str
    children: tuple[int, ...]  # e-class ids
    attrs: dict = field(default_factory=dict)  # literal arguments (eps, head_dim, ...)
    leaf_slot: int | None = None  # for input / parameter


@dataclass
class EClasses:
    """The saturated e-graph as plain data: class id -> e-nodes; roots by output slot."""

    nodes: dict[int, list[ENode]]
    roots: list[int]

    def num_nodes(self) -> int:
        return sum(len(v) for v in self.nodes.values())


def read_eclasses(egraph: EGraph, num_roots: int) -> EClasses:
    """Serializes the e-graph and keeps the Tensor classes (attrs decoded from literals)."""
    raw = egraph._egraph.serialize([], max_functions=None, max_calls_per_function=None,
                                   include_temporary_functions=False)
    data = json.loads(raw.to_json())["nodes"]
    class_ids: dict[str, int] = {}
    tensor_class = data[next(k for k, v in data.items() if v["op"] == "root")]["eclass"]
    tensor_type = tensor_class.rsplit("-", 1)[0]

    def cid(eclass: str) -> int:
        return class_ids.setdefault(eclass, len(class_ids))

    nodes: dict[int, list[ENode]] = {}
    roots = [None] * num_roots
    for v in data.values():
        if v["eclass"].rsplit("-", 1)[0] != tensor_type:
            continue
        kids = v["children"]
        if v["op"] == "root":
            roots[int(data[kids[0]]["op"])] = cid(v["eclass"])
            continue
        spec = OPS[v["op"]]
        tensor_kids = [k for k in kids if data[k]["eclass"].rsplit("-", 1)[0] == tensor_type]
        literals = [data[k]["op"] for k in kids[len(tensor_kids):]]
        if v["op"] in LEAVES:
            node = ENode(v["op"], (), {}, int(literals[0]))
        else:
            attrs = {a: float(x) if a in _FLOAT_ATTRS else int(x)
                     for a, x in zip(spec.attrs, literals)}
            node = ENode(v["op"], tuple(cid(data[k]["eclass"]) for k in tensor_kids), attrs)
        nodes.setdefault(cid(v["eclass"]), []).append(node)
    return EClasses(nodes, roots)
