"""Checks on saturated e-graphs themselves: every e-node of a class computes the same tensor
(the rules' soundness, not only the extracted plan's), and the extractor's DAG cost equals
the optimum found by exhaustive search."""

import math

import torch

from meganeura.compiler.egraph import LEAVES
from meganeura.compiler.graph import find_cycle
from meganeura.compiler.ops import OPS, U32
from meganeura.compiler.optimize import leaf_node
from numerics import assert_close


def _leaf_value(graph, nid, gen):
    """A fresh random value for a block's leaf: floats in fp64, integer ids below every table
    they index, positions in order (a prefill's) or below the model's position bound."""
    n = graph[nid]
    if n.dtype != U32:
        return torch.randn(n.shape, generator=gen, dtype=torch.float64)
    bound, positions = None, False
    for u in graph.users()[nid]:
        un = graph[u]
        if OPS[un.op].work == "gather" and un.inputs[0] == nid:
            b = graph[un.inputs[1]].shape[0]
        elif "limit" in un.attrs or un.op in ("cache_write", "cache_attention"):
            positions, b = True, un.attrs.get("limit", 1 << 20)
        else:
            continue
        bound = b if bound is None else min(bound, b)
    if positions and n.shape[0] > 1:
        return torch.arange(n.shape[0])
    return torch.randint(0, bound or 2, n.shape, generator=gen)


def assert_classes_agree(graph, report, seed: int = 0) -> int:
    """Evaluates every e-node of every e-class of each template (fp64 leaves): all e-nodes of
    a class must agree. Returns the number of e-nodes evaluated."""
    gen = torch.Generator().manual_seed(seed)
    evaluated = 0
    for t in report.templates:
        ec, block = t.saturated, t.block
        leaves = {}
        values: dict[int, torch.Tensor] = {}
        done: set[int] = set()
        progress = True
        while progress:
            progress = False
            for c, nodes in ec.nodes.items():
                for n in nodes:
                    if id(n) in done or any(ch not in values for ch in n.children):
                        continue
                    if n.op in LEAVES:
                        key = leaf_node(block, n)
                        if key not in leaves:
                            leaves[key] = _leaf_value(graph, key, gen)
                        v = leaves[key]
                    else:
                        v = OPS[n.op].reference(n.attrs, *(values[ch] for ch in n.children))
                    done.add(id(n))
                    evaluated += 1
                    progress = True
                    if c in values:
                        if v.is_floating_point():
                            assert_close(v, values[c], "fp32-exact")
                        else:
                            assert torch.equal(v, values[c]), (c, n.op)
                    else:
                        values[c] = v
        missing = [n.op for nodes in ec.nodes.values() for n in nodes if id(n) not in done]
        assert not missing, f"e-nodes never evaluated: {missing[:5]}"
    return evaluated


def brute_force_cost(ec, price) -> float:
    """The least DAG cost over every acyclic choice of one e-node per needed class
    (branch and bound: own costs are positive, a partial cost is a lower bound)."""
    own = {id(n): (max(price(c, n), 1e-12) if n.op not in LEAVES else 1e-12)
           for c, nodes in ec.nodes.items() for n in nodes}
    best = [math.inf]

    def dfs(todo: list[int], chosen: dict, cost: float) -> None:
        if cost >= best[0] * (1 - 1e-12):
            return
        todo = [c for c in todo if c not in chosen]
        if not todo:
            if find_cycle(ec.roots, lambda c: chosen[c].children) is None:
                best[0] = cost
            return
        c, rest = todo[0], todo[1:]
        for n in sorted(ec.nodes[c], key=lambda n: own[id(n)]):
            chosen[c] = n
            dfs(rest + [ch for ch in n.children if ch not in chosen], chosen, cost + own[id(n)])
            del chosen[c]

    dfs(list(dict.fromkeys(ec.roots)), {}, 0.0)
    return best[0]
