"""A persistent kernel's static schedule: a plan's launches cut into tasks, each task given to
one of P programs, every wait on a task earlier in one global order.

A decode step run as one persistent kernel (a program per SM) has no launches and no gaps
between them: each program walks a task list fixed at compile time, a task waits on the
counters of the launches it depends on (acquire) and bumps its own launch's counter when
done (release). This module builds those lists from a compiled plan and checks them; the
kernel that walks them is the decode megakernel's.

- Works: one per kernel the plan launches (a node's chained kernels each), with its grid's
  programs, its estimated seconds (the plan's, from the cost model) and the memory it
  reads and writes (address intervals of its tensors: the buffer arena reuses memory, so a
  launch that overwrites what an earlier one still had to read waits for it too).
- Dependencies: launch j waits for every earlier launch whose writes meet j's reads or
  writes, or whose reads meet j's writes.
- Tasks: a launch's programs in at most P ranges, one task each, its cost its share.
- Assignment: tasks in launch order, each to the program where it would start first (the
  later of the program's free time and its dependencies' estimated ends).

Deadlock freedom holds by construction: tasks are numbered launch by launch, a task waits
only on launches before its own (so on smaller numbers), and each program runs its tasks in
increasing number. The smallest unfinished task can then always run: what it waits on and
what its program runs before it have smaller numbers, so are finished. `check` verifies
both properties of a schedule; `simulate` runs the programs in random interleavings, as a
GPU may, and finds the deadlock of a schedule that breaks them. (Triton's interpreter runs
programs one after another, so a spin-wait there would hang: schedules are checked here.)
"""

from __future__ import annotations

import heapq
import math
import random
from dataclasses import dataclass, field

from .ops import OPS


@dataclass(frozen=True)
class Work:
    """One launch of the plan: its programs, estimated seconds, and the byte intervals
    [lo, hi) it reads and writes."""

    name: str
    programs: int
    seconds: float
    reads: tuple[tuple[int, int], ...]
    writes: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class Task:
    launch: int  # index of its Work
    first: int  # the launch's first program this task runs
    count: int  # the launch's programs it runs, one after another
    seconds: float
    waits: tuple[int, ...]  # launches whose every task must be done first


@dataclass
class Schedule:
    programs: int
    tasks: list[Task]  # numbered launch by launch
    lists: list[list[int]]  # each program's tasks, in the order it runs them
    tasks_of: list[int]  # tasks of each launch (its counter's final count)
    makespan: float  # estimated seconds: the tasks' costs on the programs, no gaps
    serial: float = field(default=0.0)  # the launches' seconds one after another


def _meet(a, b) -> bool:
    return any(lo < hi2 and lo2 < hi for lo, hi in a for lo2, hi2 in b)


def dependencies(works: list[Work]) -> list[tuple[int, ...]]:
    """For each launch, the earlier launches it must wait for (read after write, write after
    read, write after write), without those implied through another one it waits for."""
    direct = []
    for j, w in enumerate(works):
        direct.append({i for i in range(j) if _meet(works[i].writes, w.reads + w.writes)
                       or _meet(works[i].reads, w.writes)})
    reach: list[set] = []  # every launch j waits for, directly or not
    out = []
    for j, deps in enumerate(direct):
        implied = set().union(*(reach[i] for i in deps)) if deps else set()
        out.append(tuple(sorted(deps - implied)))
        reach.append(deps | implied)
    return out


def build(works: list[Work], programs: int) -> Schedule:
    """The schedule of `works` (in launch order) on `programs` persistent programs."""
    if programs < 1:
        raise ValueError(f"programs must be >= 1, got {programs}")
    waits = dependencies(works)
    free = [(0.0, p) for p in range(programs)]  # a heap: (when a program is free, it)
    ends = [0.0] * len(works)  # estimated end of each launch's last task
    tasks: list[Task] = []
    lists: list[list[int]] = [[] for _ in range(programs)]
    tasks_of = []
    for j, w in enumerate(works):
        ready = max((ends[i] for i in waits[j]), default=0.0)
        n = min(w.programs, programs)
        per = math.ceil(w.programs / n)
        n = math.ceil(w.programs / per)
        tasks_of.append(n)
        for t in range(n):
            count = min(per, w.programs - t * per)
            cost = w.seconds * count / w.programs
            at, p = heapq.heappop(free)  # the earliest free starts first (or at `ready`)
            end = max(at, ready) + cost
            heapq.heappush(free, (end, p))
            ends[j] = max(ends[j], end)
            lists[p].append(len(tasks))
            tasks.append(Task(j, t * per, count, cost, waits[j]))
    return Schedule(programs, tasks, lists, tasks_of, max(at for at, _ in free),
                    sum(w.seconds for w in works))


def check(s: Schedule) -> None:
    """Raises ValueError unless every task is run once, by one program, each program's in
    increasing number, every wait on an earlier launch, and each launch's tasks cover its
    programs once: the properties deadlock freedom rests on."""
    seen = sorted(t for lst in s.lists for t in lst)
    if seen != list(range(len(s.tasks))):
        raise ValueError("every task must be in exactly one program's list")
    for p, lst in enumerate(s.lists):
        if any(a >= b for a, b in zip(lst, lst[1:])):
            raise ValueError(f"program {p} runs its tasks out of their global order")
    starts: dict[int, list] = {}
    for k, t in enumerate(s.tasks):
        if any(i >= t.launch for i in t.waits):
            raise ValueError(f"task {k} waits on launch {max(t.waits)}, not before its own "
                             f"({t.launch})")
        if k and t.launch < s.tasks[k - 1].launch:
            raise ValueError("tasks must be numbered launch by launch")
        starts.setdefault(t.launch, []).append((t.first, t.count))
    for j, ranges in starts.items():
        covered = [p for first, count in sorted(ranges) for p in range(first, first + count)]
        if covered != list(range(len(covered))) or len(ranges) != s.tasks_of[j]:
            raise ValueError(f"launch {j}'s tasks must cover its programs once")


def simulate(s: Schedule, seed: int = 0) -> bool:
    """Runs the programs' lists in a random interleaving (any program whose next task's
    launches are done may go next): True if every task finishes, False on a deadlock."""
    rng = random.Random(seed)
    done = [0] * len(s.tasks_of)
    nxt = [0] * s.programs
    left = len(s.tasks)
    while left:
        runnable = [p for p in range(s.programs) if nxt[p] < len(s.lists[p]) and all(
            done[i] == s.tasks_of[i] for i in s.tasks[s.lists[p][nxt[p]]].waits)]
        if not runnable:
            return False
        p = rng.choice(runnable)
        done[s.tasks[s.lists[p][nxt[p]]].launch] += 1
        nxt[p] += 1
        left -= 1
    return True


def in_program_order(s: Schedule) -> bool:
    """Whether the programs finish when run one after another, program 0 to its end first
    (as Triton's interpreter runs a grid): every wait met by a lower program or earlier in
    the program's own list."""
    done = [0] * len(s.tasks_of)
    for lst in s.lists:
        for k in lst:
            t = s.tasks[k]
            if any(done[i] < s.tasks_of[i] for i in t.waits):
                return False
            done[t.launch] += 1
    return True


def works_of(model) -> list[Work]:
    """The Works of a compiled model's launches (runtime.compiled.CompiledModel): each
    chained kernel its own, the node's estimated seconds (the plan's, by the cost model it
    was extracted with) shared among them. A kernel writes its node's tensor, the state
    (KV caches) it is given and its scratch buffers; it reads its other tensors."""
    g = model.plan.graph
    out = []
    for launch in model.launches:
        node = g[launch.node]
        secs = model.plan.estimate.get(node.id, 0.0)
        chain = launch.spec.chain()
        for k, spec in enumerate(chain):
            reads, writes = [], []
            for kind, x in spec.args:
                if kind in ("node", "desc"):
                    nid = x if kind == "node" else x[0]
                    span = _span(model.tensors[nid])
                    written = nid == node.id or g[nid].op == "state" or (
                        OPS[node.op].inplace and nid == node.inputs[0])
                    (writes if written else reads).append(span)
                elif kind == "scratch":
                    span = _span(model.scratch(*x))
                    reads.append(span)
                    writes.append(span)
            out.append(Work(f"{g.label(node.id)}[{k}]" if len(chain) > 1 else g.label(node.id),
                            math.prod(spec.grid), secs / len(chain), tuple(reads),
                            tuple(writes)))
    return out


def _span(t) -> tuple[int, int]:
    """The byte interval [lo, hi) a tensor's elements lie in."""
    last = sum((n - 1) * st for n, st in zip(t.shape, t.stride())) if t.numel() else -1
    return t.data_ptr(), t.data_ptr() + (last + 1) * t.element_size()


__all__ = ["Schedule", "Task", "Work", "build", "check", "dependencies", "in_program_order",
           "simulate", "works_of"]
