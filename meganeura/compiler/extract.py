"""DAG-aware extraction: pick one e-node per needed e-class so that the plan is cheapest,
paying a subterm used several times once.

1. Shapes of every e-class are inferred with the IR's own shape rules (a class whose
   e-nodes disagree is an unsound rewrite and raises).
2. A greedy pass picks, per class, the e-node of least tree cost (own cost + children).
   Every own cost is > 0, so cost strictly falls along every chosen edge: no cycles.
3. Local search on the exact DAG cost (each reachable class paid once): try pinning a
   class to another e-node, and "sharing moves" that pin every parent able to use a
   class to do so (three matmuls reading one materialized norm; q, k, v slicing one
   merged product), each through its cheapest e-node that reads it, and "dropping moves"
   that re-choose every parent of a class to an e-node that does not read it (a kernel
   whose outputs two classes slice is dropped only when both move at once). Greedy re-runs
   under the pins; a move is kept if the DAG cost falls.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

from ..errors import GraphError
from .egraph import LEAVES, EClasses, ENode
from .graph import find_cycle
from .ops import FLOAT, OPS, _Mismatch

EPS = 1e-12  # the least own cost: views and load-time nodes still cost > 0 (no cycles)


def class_shapes(ec: EClasses, leaf_type) -> dict[int, tuple]:
    """Shape of every class, inferred bottom-up; `leaf_type(node)` gives a leaf's (shape, dtype)."""
    shapes: dict[int, tuple] = {}
    dtypes: dict[int, str] = {}
    pending = True
    while pending:
        pending = False
        for c, nodes in ec.nodes.items():
            for n in nodes:
                if any(ch not in shapes for ch in n.children):
                    continue
                if n.op in LEAVES:
                    s, dtypes[c] = leaf_type(n)
                else:
                    s = _infer(n, shapes, dtypes)
                    dtypes[c] = OPS[n.op].out_dtype
                if c not in shapes:
                    shapes[c], pending = tuple(s), True
                elif shapes[c] != s:
                    raise GraphError(f"unsound rewrite: e-class {c} holds shapes {list(shapes[c])}"
                                     f" and {list(s)} ({n.op})")
    return shapes


def _infer(n: ENode, shapes: dict, dtypes: dict) -> tuple:
    ins = [shapes[ch] for ch in n.children]
    try:
        return tuple(OPS[n.op].shape(ins, [dtypes.get(ch, FLOAT) for ch in n.children], n.attrs))
    except _Mismatch as e:
        raise GraphError(f"unsound rewrite: {n.op} e-node has {e}") from None


def classes_where(ec: EClasses, holds) -> set[int]:
    """The least set of classes with an e-node for which holds(node, set so far) is true
    (grown until it holds no more)."""
    done: set[int] = set()
    grew = True
    while grew:
        grew = False
        for c, nodes in ec.nodes.items():
            if c not in done and any(holds(n, done) for n in nodes):
                done.add(c)
                grew = True
    return done


def load_time_classes(ec: EClasses) -> set[int]:
    """Classes computable from parameters alone (evaluated once when weights load)."""
    return classes_where(ec, _param_only)


def _param_only(n: ENode, done: set[int]) -> bool:
    if n.op == "parameter" or OPS[n.op].kind == "constant":
        return True
    return n.op not in LEAVES and bool(n.children) and all(ch in done for ch in n.children)


@dataclass
class Selection:
    choice: dict[int, ENode]  # reachable class -> chosen e-node
    cost: float  # DAG cost: each reachable class's own cost, once


class Extractor:
    """Extraction over one e-graph with fixed own costs per e-node."""

    def __init__(self, ec: EClasses, own_cost):
        self.ec = ec
        self.own = {id(n): max(own_cost(c, n), EPS) if n.op not in LEAVES else EPS
                    for c, nodes in ec.nodes.items() for n in nodes}
        self.parents: dict[int, list[tuple[int, ENode]]] = {c: [] for c in ec.nodes}
        for c, nodes in ec.nodes.items():
            for n in nodes:
                for ch in set(n.children):
                    self.parents[ch].append((c, n))
        # the e-nodes as flat lists, numbered class by class in the e-graph's order (the
        # number breaks exact ties between e-nodes in the queue at once: the earlier wins)
        self._class: list[int] = []
        self._node: list[ENode] = []
        self._own: list[float] = []
        self._kids: list[tuple[int, ...]] = []
        self._users: dict[int, list[int]] = {c: [] for c in ec.nodes}
        for c, nodes in ec.nodes.items():
            for n in nodes:
                i = len(self._node)
                self._class.append(c)
                self._node.append(n)
                self._own.append(self.own[id(n)])
                self._kids.append(tuple(n.children))
                for ch in set(n.children):
                    self._users[ch].append(i)
        self._waits = [len(set(k)) for k in self._kids]

    def greedy(self, pins: dict[int, ENode] | None = None) -> dict[int, ENode] | None:
        """Least tree cost per class under pins; None if a root cannot be built.

        Bottom-up in order of cost (Knuth's generalization of Dijkstra to and-or graphs): an
        e-node is priced once, when the last of its children is settled, and a class settles
        at its cheapest priced e-node. Own costs are >= 0, so an e-node costs at least as
        much as each child and the first price a class pops is its least."""
        pins = pins or {}
        own, kids, cls, users = self._own, self._kids, self._class, self._users
        node = self._node
        best = dict.fromkeys(self.ec.nodes, math.inf)
        choice: dict[int, ENode] = {}
        waits = list(self._waits)

        def allowed(i):
            c = cls[i]
            return c not in pins or pins[c] is node[i]

        heap = [(own[i], i) for i in range(len(node)) if not kids[i] and allowed(i)]
        heapq.heapify(heap)
        while heap:
            cost, i = heapq.heappop(heap)
            if math.isinf(cost):  # (a kernel the cost model refuses) the rest cannot be built
                break
            c = cls[i]
            if c in choice:
                continue
            best[c], choice[c] = cost, node[i]
            for u in users[c]:
                waits[u] -= 1
                if waits[u] == 0 and cls[u] not in choice and allowed(u):
                    heapq.heappush(heap, (own[u] + sum(best[ch] for ch in kids[u]), u))
        if any(math.isinf(best[r]) for r in self.ec.roots):
            return None
        self.tree = best  # the least tree cost of every class, of the last greedy pass
        return choice

    def dag(self, choice: dict[int, ENode]) -> Selection:
        """Restricts `choice` to what the roots reach and prices it with each class once."""
        reach: dict[int, ENode] = {}
        stack = list(self.ec.roots)
        while stack:
            c = stack.pop()
            if c in reach:
                continue
            reach[c] = choice[c]
            stack.extend(choice[c].children)
        check_acyclic(reach, self.ec.roots)
        return Selection(reach, sum(self.own[id(n)] for n in reach.values()))

    def moves(self, sel: Selection):
        """Candidate pin sets: sharing moves first, then single re-choices. A sharing move
        pins each chosen parent able to read class c to the e-node that reads c at the least
        tree cost of its other children (not merely the least own cost: an e-node that is
        cheap itself can need a class nothing else computes)."""
        tree = dict(self.tree)
        for c in self.ec.nodes:
            move, price = {}, {}
            for p, n in self.parents[c]:
                if p in sel.choice and c not in sel.choice[p].children:
                    cost = self.own[id(n)] + sum(tree[ch] for ch in set(n.children) if ch != c)
                    if p not in move or cost < price[p]:
                        move[p], price[p] = n, cost
            if move:
                yield move
        # dropping moves: every chosen parent of class c re-chosen to its least-tree-cost
        # e-node that does not read c, so c is computed no more (a kernel whose outputs two
        # classes slice, such as the loss and d rows of one lm_head op, is dropped only
        # when both move at once; one at a time, the other still pays for it)
        readers: dict[int, list[int]] = {}
        for p, chosen in sel.choice.items():
            for ch in set(chosen.children):
                readers.setdefault(ch, []).append(p)
        for c, ps in readers.items():
            if len(ps) < 2:
                continue
            move = {}
            for p in ps:
                others = [(self.own[id(n)] + sum(tree[ch] for ch in set(n.children)), k)
                          for k, n in enumerate(self.ec.nodes[p]) if c not in n.children]
                if not others:
                    break
                move[p] = self.ec.nodes[p][min(others)[1]]
            else:
                yield move
        for p, chosen in sel.choice.items():
            for n in self.ec.nodes[p]:
                if n is not chosen:
                    yield {p: n}

    def extract(self, local_search: bool = True) -> Selection:
        choice = self.greedy()
        if choice is None:
            raise GraphError("extraction failed: a block output has no finite-cost term")
        sel = self.dag(choice)
        pins: dict[int, ENode] = {}
        improved = local_search
        while improved:
            improved = False
            for move in self.moves(sel):
                trial = self.greedy({**pins, **move})
                if trial is None:
                    continue
                cand = self.dag(trial)
                if cand.cost < sel.cost * (1 - 1e-9):
                    sel, pins, improved = cand, {**pins, **move}, True
                    break
        return sel


def check_acyclic(choice: dict[int, ENode], roots: list[int]) -> None:
    """Raises if the chosen e-nodes do not form a DAG covering every root."""
    for r in roots:
        if r not in choice:
            raise GraphError(f"extraction does not cover output class {r}")

    def children(c):
        if c not in choice:
            raise GraphError(f"extraction left e-class {c} without a term")
        return choice[c].children

    edge = find_cycle(roots, children)
    if edge:
        raise GraphError(f"extraction produced a cycle through e-class {edge[1]}")
