"""Graph IR <-> egglog terms.

`Tensor` is the e-graph language: one constructor per op of the vocabulary
(`compiler/ops.py`), generated from its declaration and named exactly as the op, so a
serialized e-node decodes straight back into a Graph node. Tensor operands become
`Tensor` arguments and literal attributes `f64` / `i64` / `String` ones, in the declared
order; leaves are `Tensor.input(slot)` and `Tensor.parameter(slot)`. A block of the graph
is encoded with its parameters as `parameter(slot)` and everything computed outside it as
`input(slot)`; every tensor the block hands out is marked by `root(i)`.

A fused kernel is an archetype constructor (`Tensor.product(a, b, prologue, epilogue)`,
`Tensor.rows(x, epilogue)`, ...) whose stages are a list (`Stages.none().then(stage)...`)
of `Stage` terms: one constructor per op that may run inside another kernel and per operand
its running value may be (`Stage.add_0(r)`: running + r; `Stage.cache_write_1(cache, pos)`:
the running rows written into the cache), and `Stage.glu_pair(act)` for a binary op of a
product's two column halves. Rules build these terms (rewrites/epilogue.py); the decoder
turns them back into `kernels.Stage` data.

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

from egglog import (EGraph, Expr, StringLike, f64Like, function, i64, i64Like, method, set_,
                    union)

from .graph import Graph
from .kernels import ARCHETYPES, STRUCTURED, Stage as StageData
from .ops import OPS

_LITERAL = {float: f64Like, int: i64Like, str: StringLike}


def _ctor(egg_fn: str, doc: str, params: list[tuple[str, str, object]], returns: str,
          first_self: bool):
    """An egglog constructor: params (name, type name, default or empty) after self (an
    operand) or cls (a classmethod of literals and operands)."""
    def ctor(*args):  # a declaration only: egglog builds the term
        ...

    names = [("self" if first_self else "cls", None, inspect.Parameter.empty)] + params
    ctor.__name__ = ctor.__qualname__ = egg_fn
    ctor.__doc__ = doc
    ctor.__signature__ = inspect.Signature(
        [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=d)
         for n, _, d in names])
    ctor.__annotations__ = {n: t for n, t, _ in params} | {"return": returns}
    return method(egg_fn=egg_fn)(ctor if first_self else classmethod(ctor))


def _attr_params(spec) -> list[tuple[str, object, object]]:
    """Literal parameters of an op's attributes; constant defaults may be omitted by rules."""
    constant = {n: v for n, v in spec.defaults.items() if not callable(v)}
    return [(n, _LITERAL[kind], constant.get(n, inspect.Parameter.empty)) for n, kind in spec.attrs]


def _op_constructor(spec):
    """The Tensor constructor of one op: self is the first operand, then the others, then
    attrs (an op without operands, a constant, is a classmethod of its attrs); an archetype
    op takes its stage lists after its own operands."""
    params = [(n, "Tensor", inspect.Parameter.empty) for n in spec.inputs[1:]]
    if spec.variadic:
        arch = ARCHETYPES[spec.name]
        lists = (["prologue"] if arch.prologue else []) + ["epilogue"]
        params += [(n, "Stages", inspect.Parameter.empty) for n in lists]
    else:
        params += _attr_params(spec)
    return _ctor(spec.name, spec.doc, params, "Tensor", bool(spec.inputs))


def _leaf(name: str, doc: str):
    return _ctor(name, doc, [("slot", i64Like, inspect.Parameter.empty)], "Tensor", False)


def _language():
    ns = {"__module__": __name__, "__qualname__": "Tensor", "__doc__": "A tensor-valued term of the IR."}
    for name, spec in OPS.items():
        ns[name] = _leaf(name, spec.doc) if spec.kind == "leaf" else _op_constructor(spec)
    return type("Tensor", (Expr,), ns)


# stage constructor name -> (op, running operand position or "pair")
STAGE_FORMS: dict[str, tuple[str, int | str]] = {}


def _stage_language():
    ns = {"__module__": __name__, "__qualname__": "Stage",
          "__doc__": "An op applied to a kernel's running value (its other operands given)."}
    for name, spec in OPS.items():
        if spec.locality is None:
            continue
        for k in spec.through:
            others = [(n, "Tensor", inspect.Parameter.empty)
                      for j, n in enumerate(spec.inputs) if j != k]
            fn = f"stage_{name}_{k}"
            ns[f"{name}_{k}"] = _ctor(fn, f"{spec.doc} (the running value as {spec.inputs[k]})",
                                      others + _attr_params(spec), "Stage", False)
            STAGE_FORMS[fn] = (name, k)
        if spec.pairs:
            fn = f"stage_{name}_pair"
            ns[f"{name}_pair"] = _ctor(fn, f"{spec.doc} (of a product's two column halves)",
                                       _attr_params(spec), "Stage", False)
            STAGE_FORMS[fn] = (name, "pair")
    return type("Stage", (Expr,), ns)


class Stages(Expr):
    """A kernel's prologue or epilogue: stages in the order they run."""

    @method(egg_fn="stages_none")
    @classmethod
    def none(cls) -> Stages:
        """No stage."""

    @method(egg_fn="stages_then")
    def then(self, stage: Stage) -> Stages:
        """These stages, then one more."""


Tensor = _language()
Stage = _stage_language()


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
        spec = OPS[n.op]
        if spec.variadic:
            ins = [terms[i] for i in n.inputs]
            arch = ARCHETYPES[n.op]
            args = ins[:len(arch.main)] + [stages_term(n.attrs[where], ins) for where in
                                           (("prologue",) if arch.prologue else ()) + ("epilogue",)]
        else:
            args = [terms[i] for i in n.inputs] + [n.attrs[a] for a in spec.attr_names]
        ctor = getattr(args[0], n.op) if n.inputs else getattr(Tensor, n.op)
        terms[nid] = egraph.let(f"n{nid}", ctor(*(args[1:] if n.inputs else args)))
    for nid, term in terms.items():  # the analysis starts from every encoded tensor's width
        egraph.register(set_(cols(term)).to(i64(graph[nid].shape[-1])))
    for slot, nid in enumerate(block.outputs):
        egraph.register(union(root(slot)).with_(terms[nid]))


def stages_term(stages: tuple, inputs: list):
    """The Stages term of a tuple of kernels.Stage over the node's input terms."""
    out = Stages.none()
    for st in stages:
        attrs = [v for _, v in st.attrs]
        if st.pair:
            out = out.then(getattr(Stage, f"{st.op}_pair")(*attrs))
        else:
            ctor = getattr(Stage, f"{st.op}_{st.at}")
            out = out.then(ctor(*[inputs[i] for i in st.operands], *attrs))
    return out


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
    """Serializes the e-graph and keeps the Tensor classes (attrs decoded from literals, a
    fused kernel's stage lists decoded into kernels.Stage data)."""
    raw = egraph._egraph.serialize([], max_functions=None, max_calls_per_function=None,
                                   include_temporary_functions=False)
    data = json.loads(raw.to_json())["nodes"]
    class_ids: dict[str, int] = {}
    sort = {k: v["eclass"].rsplit("-", 1)[0] for k, v in data.items()}
    tensor_type = sort[next(k for k, v in data.items() if v["op"] == "root")]
    lists: dict[str, list[str]] = {}  # a Stage or Stages class -> its e-nodes
    for k, v in data.items():
        if v["op"] in STAGE_FORMS or v["op"] in ("stages_none", "stages_then"):
            lists.setdefault(v["eclass"], []).append(k)

    def cid(eclass: str) -> int:
        return class_ids.setdefault(eclass, len(class_ids))

    def only(eclass: str) -> dict:
        nodes = lists[eclass]
        if len(nodes) != 1:  # no rule unions stages: each list is one term
            raise AssertionError(f"stage class {eclass} holds {len(nodes)} e-nodes")
        return data[nodes[0]]

    def stage_list(eclass: str) -> list:
        """(op, tensor child classes, attrs, at, pair) per stage, first to last."""
        out = []
        node = only(eclass)
        while node["op"] == "stages_then":
            prev, st = node["children"]
            op, form = STAGE_FORMS[data[st]["op"]]
            kids = data[st]["children"]
            spec = OPS[op]
            n_tensor = 0 if form == "pair" else spec.arity - 1
            attrs = tuple((a, _literal(kind, data[x]["op"]))
                          for (a, kind), x in zip(spec.attrs, kids[n_tensor:]))
            out.append((op, [cid(data[x]["eclass"]) for x in kids[:n_tensor]], attrs,
                        0 if form == "pair" else form, form == "pair"))
            node = only(data[prev]["eclass"])
        return out[::-1]

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
        tensor_kids = [k for k in kids if sort[k] == tensor_type]
        literals = [data[k]["op"] for k in kids[len(tensor_kids):]]
        if v["op"] in LEAVES:
            node = ENode(v["op"], (), {}, int(literals[0]))
        elif v["op"] in STRUCTURED:
            node = _kernel_node(v["op"], [cid(data[k]["eclass"]) for k in tensor_kids],
                                [stage_list(data[k]["eclass"]) for k in kids[len(tensor_kids):]])
        else:
            attrs = {a: _literal(kind, x) for (a, kind), x in zip(spec.attrs, literals)}
            node = ENode(v["op"], tuple(cid(data[k]["eclass"]) for k in tensor_kids), attrs)
        nodes.setdefault(cid(v["eclass"]), []).append(node)
    return EClasses(nodes, roots)


def _kernel_node(op: str, main: list[int], lists: list[list]) -> ENode:
    """An archetype e-node: its own operand classes, then each stage operand class once (in
    the order the stages read them); the stages refer to them by position."""
    children = list(main)
    extra: list[int] = []
    decoded = []
    for stages in lists:
        out = []
        for name, classes, attrs, at, pair in stages:
            for c in classes:
                if c not in extra:
                    extra.append(c)
            pos = tuple(len(main) + extra.index(c) for c in classes)
            if OPS[name].commutative:  # r + a and a + r: one stage
                at = 0
            out.append(StageData(name, pos, attrs, at, pair))
        decoded.append(tuple(out))
    prologue, epilogue = (decoded if len(decoded) == 2 else [(), decoded[0]])
    return ENode(op, tuple(children + extra), {"prologue": prologue, "epilogue": epilogue})


def _literal(kind: type, text: str):
    """A serialized egglog literal as the attribute's Python type."""
    if kind is str:
        return json.loads(text)
    return int(text) if kind is int else float(text)
