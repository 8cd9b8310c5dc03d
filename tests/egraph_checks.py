"""Checks on saturated e-graphs themselves: every e-node of a class computes the same tensor
(the rules' soundness, not only the extracted plan's), and the extractor's DAG cost equals
the optimum an exact integer program finds."""

import math

import torch

from meganeura.compiler.egraph import LEAVES
from meganeura.compiler.graph import find_cycle
from meganeura.compiler.kernels import index_inputs
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
        for pos, readers in index_inputs(un.op, un.attrs, len(un.inputs)).items():
            if un.inputs[pos] != nid:
                continue
            for spec, role, attrs in readers:
                if role == "ids":  # below the rows of the table gathered from
                    b = graph[un.inputs[pos + 1]].shape[0]
                else:  # positions: below a RoPE's limit (a cache takes any)
                    positions, b = True, attrs.get("limit", 1 << 20)
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


def optimum_cost(ec, price) -> float:
    """The least DAG cost over every acyclic choice of one e-node per needed class, by an
    exact integer program (HiGHS through scipy):

        min sum_n own(n) x_n    x_n in {0, 1}: e-node n chosen; t_c: class c's level
        sum_{n in r} x_n >= 1                     for every root class r
        x_n <= sum_{m in d} x_m                   for every e-node n and child class d
        t_c - t_d >= 1 - (C + 1) (1 - x_n)        for n in class c, child class d (no cycle)

    own(n) as the extractor prices it (leaves 1e-12, every cost at least 1e-12); the cost
    returned is the chosen e-nodes' own costs summed in Python, each reachable class once."""
    import numpy as np
    from scipy.optimize import Bounds, LinearConstraint, milp

    nodes = [(c, n) for c, ns in ec.nodes.items() for n in ns]
    own = [max(price(c, n), 1e-12) if n.op not in LEAVES else 1e-12 for c, n in nodes]
    classes = {c: k for k, c in enumerate(ec.nodes)}
    nx, nc = len(nodes), len(classes)
    members: dict[int, list[int]] = {}
    for k, (c, _) in enumerate(nodes):
        members.setdefault(c, []).append(k)
    rows, lo, hi = [], [], []

    def constraint(coefs: dict, low: float, high: float) -> None:
        row = np.zeros(nx + nc)
        for j, v in coefs.items():
            row[j] += v
        rows.append(row)
        lo.append(low)
        hi.append(high)

    for r in set(ec.roots):
        constraint({k: 1.0 for k in members[r]}, 1.0, np.inf)
    for k, (c, n) in enumerate(nodes):
        for d in set(n.children):
            constraint({k: 1.0, **{m: -1.0 for m in members[d] if m != k}}, -np.inf, 0.0)
            if d == c:
                constraint({k: 1.0}, 0.0, 0.0)
            else:  # t_c - t_d - (C + 1) x_n >= -C
                constraint({nx + classes[c]: 1.0, nx + classes[d]: -1.0, k: -(nc + 1.0)},
                           -float(nc), np.inf)
    scale = 1e6  # seconds to microseconds: costs of order one for the solver
    usable = [math.isfinite(v) for v in own]  # an infinite cost: a kernel that cannot run
    cost = np.array([v * scale if ok else 0.0 for v, ok in zip(own, usable)] + [0.0] * nc)
    res = milp(cost, constraints=LinearConstraint(np.array(rows), lo, hi),
               integrality=np.array([1] * nx + [0] * nc),
               bounds=Bounds([0] * (nx + nc), [float(ok) for ok in usable] + [nc] * nc),
               options={"mip_rel_gap": 1e-12})
    assert res.success, res.message
    chosen: dict[int, object] = {}
    for k in np.flatnonzero(res.x[:nx] > 0.5):  # the cheapest chosen e-node of each class
        c, n = nodes[k]
        if c not in chosen or own[k] < own[nodes.index((c, chosen[c]))]:
            chosen[c] = n
    reach, stack = {}, list(ec.roots)
    while stack:
        c = stack.pop()
        if c not in reach:
            reach[c] = chosen[c]
            stack.extend(chosen[c].children)
    assert find_cycle(ec.roots, lambda c: reach[c].children) is None
    index = {id(n): k for k, (_, n) in enumerate(nodes)}
    return sum(own[index[id(n)]] for n in reach.values())
