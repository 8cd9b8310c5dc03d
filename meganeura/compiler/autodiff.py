"""Reverse-mode autodiff on the Graph IR: the backward of a graph is more of the same graph.

    joint = grad(graph, loss, ["model.layers.0.mlp.up_proj.weight", ...])
    loss, d_up, ... = run_reference(joint, weights, {..., "d_loss": seed})

`grad` copies the forward graph and appends, node by node in reverse order, each op's
vector-Jacobian product as declared in the op table (`OpSpec.grad`, compiler/ops.py):
products' gradients are products (dX = dY W, dW = dY^T X read as `matmul_tn`), a norm's are
`norm_grad` / `norm_wgrad`, attention's one `attention_grad` sliced into dq, dk, dv, and so
on. A node read by several others gets the sum of their contributions (`add`). The joint
graph returns the loss and the gradients of the requested weights, in order; its one new
input, `d_loss` (the loss's shape, held in fp32), is the seed: 1 gives d loss, 1 / count
a mean's.

Only the nodes a requested weight reaches get a gradient, so frozen weights, positions and
token ids cost nothing; a gradient node carries its forward node's block label with
".grad" added, so the optimizer sees each layer's backward as one repeated block. Every
forward activation the backward reads stays a node of the joint graph, kept by the plan
unless `recompute` names its op.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable

from ..errors import GraphError
from .graph import Graph
from .ops import OPS, _Mismatch

SEED = "d_loss"


def grad(graph: Graph, loss: int, wrt: Iterable, seed: str = SEED,
         padding: dict | None = None, recompute: Iterable[str] = (),
         recompute_nodes: Iterable[int] = ()) -> Graph:
    """The joint forward + backward graph: outputs [loss, d wrt_0, d wrt_1, ...].

    wrt: parameter names or node ids; each must be a node the loss depends on. The graph's
    other outputs and effects are dropped (a training graph writes no cache). padding:
    embedding table name -> the token id whose gathered rows add nothing to the table's
    gradient (transformers' nn.Embedding(padding_idx)). recompute: ops whose forward
    results a gradient reads are computed again in the backward, from the same inputs
    (a chain of them in order; in the backward's block, so the e-graph keeps them apart
    from the forward's; outside any block both are one term, and the forward's is held): a
    GLU's output is then not held from the forward to the backward,
    its gate and up are (the GLU's own gradient reads them). recompute_nodes: forward nodes
    computed again likewise, whatever their op (a GLU's gate and up products). A copy that
    no gradient reads is left dead (the plan keeps only what the outputs reach)."""
    if not (0 <= loss < len(graph.nodes)):
        raise GraphError(f"grad: the loss %{loss} is not a node of the graph")
    names = {n.name: n.id for n in graph.nodes if n.op == "parameter"}
    targets = []
    for w in wrt:
        if isinstance(w, str):
            if w not in names:
                raise GraphError(f"grad: no parameter named {w!r}")
            w = names[w]
        if not isinstance(w, int) or not (0 <= w < len(graph.nodes)):
            raise GraphError(f"grad: {w!r} is not a node of the graph")
        targets.append(w)
    if not targets:
        raise GraphError("grad: no weight to differentiate with respect to")
    if seed in {n.name for n in graph.nodes if n.op == "input"}:
        raise GraphError(f"grad: the graph already has an input named {seed!r}")

    # which nodes a target reaches (their gradients are needed)
    wanted = set(targets)
    for n in graph.nodes:
        if any(i in wanted for i in n.inputs):
            wanted.add(n.id)
    missing = [t for t in targets if not _reaches(graph, t, loss)]
    if missing:
        raise GraphError(f"grad: the loss does not depend on {graph.label(missing[0])}")

    g = Graph(graph.nodes)
    first = len(g.nodes)  # the backward's nodes from here on (never recomputed)
    recompute = set(recompute)
    recompute_nodes = set(recompute_nodes)
    g.padding = dict(padding or {})  # read by the gather's gradient (ops._vjp_embedding)
    d = {loss: g.input_f32(seed, graph[loss].shape, fp32=True)}
    for n in reversed(graph.nodes[:loss + 1]):
        if n.id not in d or OPS[n.op].kind == "leaf":
            continue
        ins = {i for i in n.inputs if i in wanted}
        if not ins:
            continue
        spec = OPS[n.op]
        if spec.grad is None:
            raise GraphError(f"grad: {graph.label(n.id)} ({n.op}) declares no gradient, and "
                             f"{graph.label(sorted(ins)[0])} leads to a trained weight")
        label = f"{n.block}.grad" if n.block else None
        try:
            with g.block(label):
                again: dict[int, int] = {}

                def redo(i: int) -> int:  # a chain of such ops computed again, in order
                    if (g[i].op not in recompute and i not in recompute_nodes) or i >= first:
                        return i
                    if i not in again:
                        again[i] = g.copy_node(g[i], tuple(redo(j) for j in g[i].inputs))
                    return again[i]

                for i in n.inputs:
                    redo(i)
                mark = len(g.nodes)
                pairs = spec.grad(g, n, d[n.id], ins)
                for k in range(mark, len(g.nodes)):  # the gradient's reads of them
                    node = g.nodes[k]
                    if any(i in again for i in node.inputs):
                        g.nodes[k] = dataclasses.replace(
                            node, inputs=tuple(again.get(i, i) for i in node.inputs))
                for i, di in pairs:
                    if i in d and g[di].op == "place_cols":  # a slice's gradient added into
                        # the sum where it lies (one sum alive, not a placed block a slice)
                        d[i] = g.place_add_cols(d[i], g[di].inputs[0],
                                                start=g[di].attrs["start"])
                    else:
                        d[i] = g.add(d[i], di) if i in d else di
        except _Mismatch as e:
            raise GraphError(f"grad: {graph.label(n.id)}: {e}") from None
    g.set_outputs([loss] + [d[t] for t in targets])
    return g


def _reaches(graph: Graph, source: int, sink: int) -> bool:
    """Whether `sink` depends on `source`."""
    reach = {source}
    for n in graph.nodes[source + 1:sink + 1]:
        if any(i in reach for i in n.inputs):
            reach.add(n.id)
    return sink in reach


def live(graph: Graph) -> Graph:
    """The graph without the nodes no output or effect reads (ids renumbered)."""
    keep = set(graph.roots)
    for n in reversed(graph.nodes):
        if n.id in keep:
            keep.update(n.inputs)
    g = Graph()
    new: dict[int, int] = {}
    for n in graph.nodes:
        if n.id not in keep:
            continue
        with g.block(n.block):
            new[n.id] = g.copy_node(n, tuple(new[i] for i in n.inputs))
    g.set_outputs([new[o] for o in graph.outputs], [new[e] for e in graph.effects])
    return g
