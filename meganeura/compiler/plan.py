"""The plan: the extracted program as a Graph, split into what runs when.

- load-time nodes: computed from parameters alone (weight concatenation, norm weights
  folded into matrices); evaluated once when the weights load;
- views: column and row slices of run-time tensors; no kernel, a strided view;
- launches: every other node, one kernel each, in order (a cache write updates its state
  buffer in place and stands for it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..errors import GraphError
from .cost import CostModel, stored_transposed
from .graph import Graph
from .kernels import ARCHETYPES, STRUCTURED, holds_stream, summary, updated_input
from .ops import OPS


def holds_fp32(graph: Graph, nid: int) -> bool:
    """The residual stream (the embedding and every residual add, declared `stream` in OPS;
    a kernel ending in one) is kept in fp32 even in bf16 plans: 34+ layers of bf16 rounding
    on the running sum cost more accuracy than the matmuls do, and the stream is a small
    share of the bytes moved. A view holds what its base holds; an input, what it was
    declared to hold (Graph.input_f32)."""
    nid = _base(graph, nid)
    if graph[nid].op == "input":
        return bool(graph[nid].attrs.get("fp32"))
    if nid in getattr(graph, "wide", ()):
        return True
    return holds_stream(graph[nid].op, graph[nid].attrs) and nid not in product_sums(graph)


def _base(graph: Graph, nid: int) -> int:
    while OPS[graph[nid].op].kind == "view":
        nid = graph[nid].inputs[0]
    return nid


def seeded(graph: Graph) -> set[int]:
    """A training plan's backward: its fp32 inputs (the gradient seed) and every node that
    depends on them."""
    backward = {n.id for n in graph.inputs() if n.attrs.get("fp32")}
    for n in graph.nodes:
        if any(i in backward for i in n.inputs):
            backward.add(n.id)
    return backward


def product_sums(graph: Graph) -> frozenset[int]:
    """The forward sums of two products' outputs (a LoRA adapter's (s x A^T) B^T added to
    its base product, as an add or as a product's add epilogue): held in the plan's type,
    as the products themselves are. A residual add keeps fp32 (one operand is the stream),
    and so does every sum in the backward (nodes that depend on the gradient seed, the
    plan's fp32 input): gradients accumulate in fp32. Made once a graph (cached on it)."""
    cached = getattr(graph, "_product_sums", None)
    if cached is not None and cached[0] == len(graph.nodes):
        return cached[1]

    def product(i: int) -> bool:
        n = graph[_base(graph, i)]
        if n.op in STRUCTURED:
            return n.op == "product" and not holds_stream(n.op, n.attrs)
        return OPS[n.op].archetype == "product" and not OPS[n.op].stream

    backward = seeded(graph)
    sums = []
    for n in graph.nodes:
        if n.id in backward:
            continue
        if n.op == "add":
            if all(product(i) for i in n.inputs):
                sums.append(n.id)
        elif n.op == "product" and [st.op for st in n.attrs["epilogue"]] == ["add"]:
            (st,) = n.attrs["epilogue"]
            if all(product(n.inputs[k]) for k in st.operands):
                sums.append(n.id)
    out = frozenset(sums)
    graph._product_sums = (len(graph.nodes), out)
    return out


# kernels that read a tensor row by row or element by element, in fp32 whatever it is stored
# in (norms, RoPE, GeGLU, the loss and their gradients; a fused kernel's prologue and
# epilogue operands): what a product may hand them in fp32
ROW_READERS = frozenset({"rows", "pointwise", "norm_grad", "row_loss", "stage"})


def wide_products(graph: Graph, launches: list[int]) -> frozenset[int]:
    """The forward products (nodes that do not depend on the gradient seed, the plan's
    fp32 input) whose every reader, through views, is a row or pointwise kernel (a norm,
    RoPE, GeGLU or the loss, forward or backward) or a fused kernel's stage. A training
    plan holds them in fp32 (CostModel.fp32_products). A product that a product's main
    operand or attention reads stays in the plan dtype: tensor cores read it as bf16."""
    users = graph.users()
    backward = seeded(graph)

    def readers(nid):
        """How each kernel reads nid: its archetype, or "stage" where nid is only an
        operand of a fused kernel's prologue or epilogue (read element by element)."""
        for u in users[nid]:
            n = graph[u]
            if OPS[n.op].kind == "view":
                yield from readers(u)
                continue
            kind = n.op if n.op in STRUCTURED else OPS[n.op].archetype
            main = len(ARCHETYPES[n.op].main) if n.op in STRUCTURED else len(n.inputs)
            at = [k for k, i in enumerate(n.inputs) if i == nid]
            yield "stage" if all(k >= main for k in at) else kind

    wide = []
    for i in launches:
        n = graph[i]
        if (n.op == "product" or OPS[n.op].archetype == "product") and i not in backward \
                and not holds_stream(n.op, n.attrs):
            kinds = set(readers(i))
            if kinds and kinds <= ROW_READERS:
                wide.append(i)
    return frozenset(wide)


@dataclass
class Plan:
    graph: Graph
    load_time: list[int]
    views: list[int]
    launches: list[int]
    estimate: dict[int, float] = field(default_factory=dict)  # seconds per launch

    @property
    def fp32_stream(self) -> set[int]:
        """Launches and inputs held in fp32 whatever the plan dtype."""
        ins = [n.id for n in self.graph.inputs()]
        return {i for i in self.launches + ins if holds_fp32(self.graph, i)}

    @property
    def estimated_time(self) -> float:
        return sum(self.estimate.values())

    def kernel_counts(self) -> dict[str, int]:
        """Launches by kernel: the op, or archetype[prologue | epilogue] (kernels.summary)."""
        counts: dict[str, int] = {}
        for i in self.launches:
            name = summary(self.graph[i].op, self.graph[i].attrs)
            counts[name] = counts.get(name, 0) + 1
        return counts


def memory_order(graph: Graph, launches: list[int], views: set[int]) -> list[int]:
    """The launches in an order that frees memory as soon as it can: the graph's own order,
    except that a launch that frees more than it makes (the last reader of tensors larger
    than its output) runs as soon as its inputs exist. A training graph's weight gradients
    are outputs reached after the whole backward by the graph's order; run that way, each
    layer's output gradients stay alive until its weight gradients at the end (e2b at 2048
    tokens: 7 of the 11.5 GiB live at the peak were such gradients). Plans that update a
    buffer in place (a cache write) keep the graph's order."""
    if any(updated_input(graph[i]) is not None for i in launches):
        return launches
    pos = {nid: k for k, nid in enumerate(launches)}

    def owner(i: int) -> int | None:  # the launch whose buffer a tensor lies in
        while i in views:
            i = graph[i].inputs[0]
        return i if i in pos else None

    reads = {nid: {o for o in map(owner, graph[nid].inputs) if o is not None} for nid in launches}
    readers = {nid: 0 for nid in launches}
    waiting = {nid: len(r) for nid, r in reads.items()}
    after: dict[int, list[int]] = {nid: [] for nid in launches}
    for nid, r in reads.items():
        for o in r:
            readers[o] += 1
            after[o].append(nid)
    kept = {o for o in map(owner, graph.roots) if o is not None}
    size = {nid: max(1, math.prod(graph[nid].shape)) for nid in launches}

    def freed(nid: int) -> int:
        return sum(size[o] for o in reads[nid] if readers[o] == 1 and o not in kept)

    ready = {nid for nid, w in waiting.items() if w == 0}
    order = []
    while ready:
        freeing = [nid for nid in ready if freed(nid) > size[nid]]
        nid = min(freeing or ready, key=pos.__getitem__)
        ready.remove(nid)
        order.append(nid)
        for o in reads[nid]:
            readers[o] -= 1
        for r in after[nid]:
            waiting[r] -= 1
            if waiting[r] == 0:
                ready.add(r)
    assert len(order) == len(launches), "the launches' reads form a cycle"
    return order


def make_plan(graph: Graph, cost: CostModel) -> Plan:
    """Classifies the nodes of an extracted graph and prices every launch."""
    load_time: set[int] = set()
    views, launches = [], []
    for n in graph.nodes:
        if n.op == "parameter":
            load_time.add(n.id)
        elif n.op in ("input", "state"):
            continue
        elif all(i in load_time for i in n.inputs):
            load_time.add(n.id)
        elif OPS[n.op].kind == "view":
            views.append(n.id)
        elif OPS[n.op].kind == "layout":  # the builder and the rewrites never make one
            raise GraphError(f"{graph.label(n.id)}: {n.op} of a run-time tensor has no kernel")
        else:
            launches.append(n.id)
    launches = memory_order(graph, launches, set(views))
    estimate = {i: cost.time(graph[i].op, graph[i].attrs,
                             [graph[j].shape for j in graph[i].inputs], graph[i].shape,
                             stored_transposed(graph, graph[i]))
                for i in launches}
    graph.wide = wide_products(graph, launches) if cost.fp32_products else frozenset()
    computed = sorted(i for i in load_time if graph[i].op != "parameter")
    return Plan(graph, computed, views, launches, estimate)
