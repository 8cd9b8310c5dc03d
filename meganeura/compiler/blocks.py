"""Repeated structure: the graph split into blocks, and blocks grouped into templates.

Layers of a decoder differ only by their parameters and their window kind. Each
`Graph.block` label becomes one Block; nodes outside any label form the top
block. Two blocks with the same signature (ops, attributes, wiring, parameter
and input shapes, outputs) are one template: it is saturated and extracted once,
and its plan is instantiated for every member, so optimization time grows with
the number of distinct layer kinds, not with depth.

No rewrite crosses a block boundary: a block's inputs and outputs are tensors
that any plan must hold in memory anyway (the residual stream).
"""

from __future__ import annotations

from collections import defaultdict

from .egraph import Block
from .graph import Graph


def split_blocks(graph: Graph) -> list[Block]:
    """One Block per block label (in order of first node), plus the unlabeled top block."""
    members: dict[str | None, list[int]] = defaultdict(list)
    for n in graph.nodes:
        if n.op not in ("input", "parameter", "state"):
            members[n.block].append(n.id)
    users = graph.users()
    outputs = set(graph.roots)
    blocks = []
    for nodes in members.values():
        inside = set(nodes)
        inputs, params = [], []
        for nid in nodes:
            for i in graph[nid].inputs:
                if i in inside:
                    continue
                bucket = params if graph[i].op == "parameter" else inputs
                if i not in bucket:
                    bucket.append(i)
        outs = [nid for nid in nodes if nid in outputs or any(u not in inside for u in users[nid])]
        blocks.append(Block(nodes, sorted(inputs), sorted(params), outs))
    return blocks


def signature(graph: Graph, block: Block) -> tuple:
    """Everything that decides a block's optimized plan, with names and ids abstracted away."""
    local = {nid: k for k, nid in enumerate(block.nodes)}
    pslot = {nid: k for k, nid in enumerate(block.params)}
    islot = {nid: k for k, nid in enumerate(block.inputs)}

    def ref(i: int) -> tuple:
        if i in local:
            return ("n", local[i])
        return ("p", pslot[i]) if i in pslot else ("i", islot[i])

    body = tuple((graph[nid].op, tuple(sorted(graph[nid].attrs.items())),
                  tuple(ref(i) for i in graph[nid].inputs)) for nid in block.nodes)
    return (body,
            tuple(graph[p].shape for p in block.params),
            tuple((graph[i].shape, graph[i].dtype) for i in block.inputs),
            tuple(local[o] for o in block.outputs))


def group_templates(graph: Graph, blocks: list[Block]) -> list[list[Block]]:
    """Blocks grouped by signature, in order of first appearance."""
    groups: dict[tuple, list[Block]] = {}
    for b in blocks:
        groups.setdefault(signature(graph, b), []).append(b)
    return list(groups.values())
