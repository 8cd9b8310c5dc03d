"""The optimizer: Graph -> blocks -> e-graph per template -> saturation -> extraction -> Plan.

What the extractor picks is exactly what the plan holds: every fused node of the
plan comes from an e-node that a rewrite put into the e-graph.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

from egglog import EGraph

from .blocks import group_templates, split_blocks
from .cost import CostModel
from .egraph import Block, EClasses, encode, read_eclasses
from .extract import (EPS, Extractor, Selection, class_shapes, classes_where,
                      load_time_classes)
from .graph import Graph
from .kernels import STRUCTURED, stage_count
from .plan import Plan, make_plan

STRUCTURE_TIE = 1e-15  # seconds per stage: decides ties only (own costs are >= 1e-12)


@dataclass
class TemplateReport:
    members: int
    nodes: int  # graph nodes of one member
    eclasses: int
    enodes: int
    rules: Counter  # rule name -> matches
    seconds: dict  # phase -> seconds
    cost: float  # DAG cost of the extracted block
    egglog: str | None = None  # the egglog program, when asked for
    block: Block | None = None  # the member it was built from
    saturated: EClasses | None = None  # the saturated e-graph, as extracted
    price: object = None  # (class, e-node) -> seconds, the own cost extraction used


@dataclass
class OptimizeReport:
    templates: list[TemplateReport]
    seconds: dict = field(default_factory=dict)
    cost_before: float = 0.0
    cost_after: float = 0.0

    def rules_fired(self) -> Counter:
        """Rule matches summed over every block the templates stand for."""
        total: Counter = Counter()
        for t in self.templates:
            for rule, n in t.rules.items():
                total[rule] += n * t.members
        return total


@dataclass
class _Extracted:
    template: list[Block]
    ec: EClasses
    selection: Selection


def optimize(graph: Graph, cost: CostModel, schedule, keep_egglog: bool = False,
             local_search: bool = True) -> tuple[Plan, OptimizeReport]:
    """Optimizes `graph` for the cost model's device, saturating each template's e-graph with
    `schedule` (an egglog schedule: `rewrites.schedule()`)."""
    t0 = time.perf_counter()
    graph.validate()
    blocks = split_blocks(graph)
    templates = group_templates(graph, blocks)
    extracted, reports = [], []
    for members in templates:
        ex, rep = _optimize_template(graph, members, schedule, cost, keep_egglog, local_search)
        extracted.append(ex)
        reports.append(rep)
    t1 = time.perf_counter()
    plan_graph = instantiate(graph, extracted)
    plan = make_plan(plan_graph, cost)
    t2 = time.perf_counter()
    report = OptimizeReport(reports, {"optimize": t1 - t0, "plan": t2 - t1},
                            cost.graph_time(graph), plan.estimated_time)
    return plan, report


def _optimize_template(graph, members, schedule, cost, keep_egglog, local_search):
    rep = members[0]
    times = {}
    t = time.perf_counter()
    egraph = EGraph(save_egglog_string=keep_egglog)
    encode(graph, rep, egraph)
    times["encode"] = time.perf_counter() - t
    t = time.perf_counter()
    run = egraph.run(schedule)
    times["saturate"] = time.perf_counter() - t
    t = time.perf_counter()
    ec = read_eclasses(egraph, len(rep.outputs))
    times["serialize"] = time.perf_counter() - t
    t = time.perf_counter()

    def leaf_type(n):
        leaf = graph[leaf_node(rep, n)]
        return leaf.shape, leaf.dtype

    shapes = class_shapes(ec, leaf_type)
    load_time = load_time_classes(ec)
    transposed = transposed_classes(ec)

    def own_cost(c, n):
        if n.children and all(ch in load_time for ch in n.children):
            base = 0.0  # evaluated once when the weights load
        else:
            b_trans = len(n.children) > 1 and n.children[1] in transposed
            base = cost.time(n.op, n.attrs, [shapes[ch] for ch in n.children], shapes[c],
                             b_trans) + cost.stored(n.op, n.attrs, shapes[c])
        # of two kernels that cost the same, the one with fewer stages (a base op before
        # the structured node that is the same kernel): far below any real difference
        return max(base, EPS) + STRUCTURE_TIE * ((n.op in STRUCTURED) + stage_count(n.op, n.attrs))

    selection = Extractor(ec, own_cost).extract(local_search)
    times["extract"] = time.perf_counter() - t
    rules = Counter()
    for decl, n in run.num_matches_per_rule.items():
        rules[getattr(decl, "name", None) or str(decl)] += n
    report = TemplateReport(len(members), len(rep.nodes), len(ec.nodes), ec.num_nodes(), rules,
                            times, selection.cost,
                            egraph.as_egglog_string if keep_egglog else None, rep, ec, own_cost)
    return _Extracted(members, ec, selection), report


def _depths(tops, deps) -> dict:
    """The longest chain of e-nodes below each (member, class) that `tops` reach."""
    depth: dict = {}
    stack = list(tops)
    while stack:
        key = stack[-1]
        if key in depth:
            stack.pop()
            continue
        need = deps(*key)[1]
        missing = [d for d in need if d not in depth]
        if missing:
            stack.extend(missing)
            continue
        stack.pop()
        depth[key] = 1 + max((depth[d] for d in need), default=0)
    return depth


def transposed_classes(ec: EClasses) -> set[int]:
    """Classes of weights stored [N, K]: a transpose, or a concatenation of such."""
    return classes_where(ec, lambda n, done: n.op == "transpose" or (
        n.op == "concat_cols" and all(ch in done for ch in n.children)))


def leaf_node(block: Block, n) -> int:
    """The graph node an input or parameter e-node of `block` stands for."""
    return (block.inputs if n.op == "input" else block.params)[n.leaf_slot]


def instantiate(graph: Graph, extracted: list[_Extracted]) -> Graph:
    """Builds the plan Graph: every member block gets its template's chosen terms."""
    out = Graph()
    producer: dict[int, tuple[int, int]] = {}  # original node -> (member, root class)
    members: list[tuple[Block, _Extracted]] = []
    for ex in extracted:
        for b in ex.template:
            m = len(members)
            members.append((b, ex))
            for slot, nid in enumerate(b.outputs):
                producer[nid] = (m, ex.ec.roots[slot])
    leaves: dict[int, int] = {}  # original leaf node -> plan node
    made: dict[tuple[int, int], int] = {}

    def leaf(orig: int) -> int:
        if orig not in leaves:
            n = graph[orig]
            if n.op in ("parameter", "state"):
                leaves[orig] = getattr(out, n.op)(n.name, n.shape)
            else:
                leaves[orig] = out.input_like(n)
        return leaves[orig]

    def deps(m: int, c: int):
        b, ex = members[m]
        n = ex.selection.choice[c]
        if n.op == "parameter":
            return n, [], [b.params[n.leaf_slot]]
        if n.op == "input":
            orig = b.inputs[n.leaf_slot]
            return n, ([] if orig not in producer else [producer[orig]]), [orig]
        return n, [(m, ch) for ch in n.children], []

    for n in graph.nodes:  # run-time inputs and state in the graph's own order: callers pass
        if n.op in ("input", "state"):  # inputs positionally, in that order
            leaf(n.id)
    # a plan without state updates is emitted deepest input first: of a node's missing
    # inputs the one with the longest chain below it is made first (as Sethi and Ullman
    # evaluate the costlier subtree first), so a short chain (a product computed again in
    # a backward, from forward tensors) runs just before its reader, not at the walk's
    # first touch. Plans that update state in place keep the plain walk (their launch
    # order is the decode step's, as measured). The price: e4b LoRA's default arena 14.58 ->
    # 14.66 GiB; with recompute_products 15.40 -> 8.28 (tools/train_arena.py)
    depth = _depths([producer[o] for o in graph.roots], deps) if not graph.effects else None
    for orig_out in graph.roots:
        stack = [producer[orig_out]]
        while stack:
            key = stack[-1]
            if key in made:
                stack.pop()
                continue
            n, need, origs = deps(*key)
            missing = [d for d in need if d not in made]
            if missing:
                if depth is not None:  # the deepest last on the stack: walked first
                    missing.sort(key=depth.__getitem__)
                stack.extend(missing)
                continue
            stack.pop()
            if n.op == "parameter" or (n.op == "input" and not need):
                made[key] = leaf(origs[0])
            elif n.op == "input":
                made[key] = made[need[0]]
            else:
                label = members[key[0]][0]
                with out.block(graph[label.nodes[0]].block or "top"):
                    made[key] = out.op(n.op, tuple(made[d] for d in need), **n.attrs)
    out.set_outputs([made[producer[o]] for o in graph.outputs],
                    [made[producer[o]] for o in graph.effects])
    return out
