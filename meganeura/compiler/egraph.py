"""Graph IR <-> egglog terms.

`Tensor` is the e-graph language: one constructor per op of the vocabulary
(`compiler/ops.py`), generated from its declaration and named exactly as the op, so a
serialized e-node decodes straight back into a Graph node. Tensor operands become
`Tensor` arguments and literal attributes `f64` / `i64` / `String` ones, in the declared
order; leaves are `Tensor.input(slot)` and `Tensor.parameter(slot)`. A block of the graph
is encoded with its parameters as `parameter(slot)` and everything computed outside it as
`input(slot)`; every tensor the block hands out is marked by `root(i)`.

After saturation the e-graph is serialized and read into `EClasses`, a plain
Python structure (class -> e-nodes with child classes and literal attributes)
that the cost model and the extractor work on: egglog's own extractor sums
costs as a tree, which is wrong (and overflows) once residual connections share
subterms.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass, field

from egglog import EGraph, Expr, StringLike, f64Like, function, i64, i64Like, method, set_, union

from .graph import Graph
from .ops import OPS

_LITERAL = {float: f64Like, int: i64Like, str: StringLike}


def _constructor(spec):
    """The egglog method of one op: self is the first operand, then the others, then attrs
    (an op without operands, a constant, is a classmethod of its attrs)."""
    first = "self" if spec.inputs else "cls"
    names = [first] + list(spec.inputs[1:]) + list(spec.attr_names)

    def ctor(*args):  # a declaration only: egglog builds the term
        ...

    ann = {n: "Tensor" for n in spec.inputs[1:]}
    ann.update({n: _LITERAL[kind] for n, kind in spec.attrs})
    ann["return"] = "Tensor"
    ctor.__name__ = ctor.__qualname__ = spec.name
    ctor.__doc__ = spec.doc
    constant = {n: v for n, v in spec.defaults.items() if not callable(v)}  # rules may omit them
    ctor.__signature__ = inspect.Signature(
        [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                           default=constant.get(n, inspect.Parameter.empty)) for n in names])
    ctor.__annotations__ = ann
    if not spec.inputs:
        return method(egg_fn=spec.name)(classmethod(ctor))
    return method(egg_fn=spec.name)(ctor)


def _leaf(name: str, doc: str):
    def leaf(cls, slot: i64Like) -> Tensor:  # noqa: F821 (resolved when the class exists)
        ...

    leaf.__name__ = leaf.__qualname__ = name
    leaf.__doc__ = doc
    return method(egg_fn=name)(classmethod(leaf))


def _language():
    ns = {"__module__": __name__, "__qualname__": "Tensor", "__doc__": "A tensor-valued term of the IR."}
    for name, spec in OPS.items():
        ns[name] = _leaf(name, spec.doc) if spec.kind == "leaf" else _constructor(spec)
    return type("Tensor", (Expr,), ns)


Tensor = _language()


@function(egg_fn="cols")
def cols(t: Tensor) -> i64:
    """Analysis: the column count of a tensor."""


@function(egg_fn="wslot")
def wslot(t: Tensor) -> i64:
    """Analysis: the parameter slot of a weight read as stored or transposed."""


@function(egg_fn="root")
def root(slot: i64Like) -> Tensor:
    """Marks the block's output `slot`; never extracted."""


LEAVES = ("input", "parameter")


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
    for slot, nid in enumerate(block.params):
        terms[nid] = egraph.let(f"p{slot}", Tensor.parameter(slot))
    for nid in block.nodes:
        n = graph[nid]
        if nid in terms:
            continue
        args = [terms[i] for i in n.inputs] + [n.attrs[a] for a in OPS[n.op].attr_names]
        ctor = getattr(args[0], n.op) if n.inputs else getattr(Tensor, n.op)
        terms[nid] = egraph.let(f"n{nid}", ctor(*(args[1:] if n.inputs else args)))
    for nid, term in terms.items():  # the analysis starts from every encoded tensor's width
        egraph.register(set_(cols(term)).to(i64(graph[nid].shape[-1])))
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
            attrs = {a: _literal(kind, x) for (a, kind), x in zip(spec.attrs, literals)}
            node = ENode(v["op"], tuple(cid(data[k]["eclass"]) for k in tensor_kids), attrs)
        nodes.setdefault(cid(v["eclass"]), []).append(node)
    return EClasses(nodes, roots)


def _literal(kind: type, text: str):
    """A serialized egglog literal as the attribute's Python type."""
    if kind is str:
        return json.loads(text)
    return int(text) if kind is int else float(text)
