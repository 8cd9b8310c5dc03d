"""Human-readable and JSON forms of an optimization: what fired, what was chosen, what it costs."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from .kernels import STRUCTURED, node_kernel, summary
from .optimize import OptimizeReport
from .plan import Plan

def _us(seconds: float) -> str:
    return f"{seconds * 1e6:.1f} us" if seconds < 1e-3 else f"{seconds * 1e3:.2f} ms"


def merged_weights(plan: Plan) -> int:
    """Products whose weight is a concatenation of several weights (merged or paired)."""
    g = plan.graph
    count = 0
    for i in plan.launches:
        k = node_kernel(g[i])
        if k is not None and k.archetype == "product" and g[g[i].inputs[1]].op == "concat_cols":
            count += 1
    return count


def format_report(plan: Plan, rep: OptimizeReport, kernels: int = 0) -> str:
    lines = []
    for k, t in enumerate(rep.templates):
        phases = ", ".join(f"{p} {s * 1e3:.0f} ms" for p, s in t.seconds.items())
        lines.append(f"template {k}: {t.members} block(s) of {t.nodes} nodes -> e-graph "
                     f"{t.eclasses} classes, {t.enodes} e-nodes ({phases})")
    lines.append(f"optimize: {rep.seconds['optimize'] * 1e3:.0f} ms, plan: "
                 f"{rep.seconds['plan'] * 1e3:.0f} ms")
    fired = [(r, n) for r, n in sorted(rep.rules_fired().items()) if n]
    lines.append("rules fired (matches over all blocks):")
    lines += [f"  {n:6d}  {r}" for r, n in fired]
    counts = plan.kernel_counts()
    fused = {summary(g.op, g.attrs) for g in (plan.graph[i] for i in plan.launches)
             if g.op in STRUCTURED}
    chosen = [f"{name} x{n}" for name, n in counts.items() if name in fused]
    lines.append("fusions chosen: " + (", ".join(chosen) or "none"))
    lines.append(f"merged weights: {merged_weights(plan)} matmuls over concatenated weights; "
                 f"{len(plan.load_time)} load-time nodes, {len(plan.views)} views")
    lines.append(f"kernels: {len(plan.launches)} launches: " +
                 ", ".join(f"{op} {n}" for op, n in sorted(counts.items(), key=lambda x: -x[1])))
    lines.append(f"estimated time: {_us(rep.cost_before)} unfused -> {_us(rep.cost_after)} planned")
    lines.append("kernels, one block of each kind (estimated time each):")
    g = plan.graph
    by_block: dict[str, list[int]] = {}
    for i in plan.launches:
        by_block.setdefault(g[i].block, []).append(i)
    shown: dict[tuple, str] = {}
    for block, ids in by_block.items():
        key = tuple((_name(g[i]), g[i].shape) for i in ids)
        if key in shown:
            continue
        shown[key] = block
        same = sum(1 for b in by_block.values() if tuple((_name(g[i]), g[i].shape) for i in b) == key)
        lines.append(f"  [{block}] and {same - 1} more like it" if same > 1 else f"  [{block}]")
        for i in ids:
            n = g[i]
            lines.append(f"    {_us(plan.estimate[i]):>10}  {_name(n)} {list(n.shape)}")
    if kernels:
        lines.append(f"most expensive kernels (of {len(plan.launches)}):")
        top = sorted(plan.launches, key=lambda i: -plan.estimate[i])[:kernels]
        for i in top:
            n = g[i]
            lines.append(f"  {_us(plan.estimate[i]):>10}  %{i} {_name(n)} {list(n.shape)} [{n.block}]")
    return "\n".join(lines)


def plan_summary(plan: Plan) -> str:
    """One line: launches by kind, the fusions among them, the estimated time."""
    counts = plan.kernel_counts()
    kinds = ", ".join(f"{op} {n}" for op, n in sorted(counts.items(), key=lambda x: -x[1]))
    return f"{len(plan.launches)} launches ({kinds}); estimated {_us(plan.estimated_time)}"


def _name(n) -> str:
    return summary(n.op, n.attrs)


def _attrs_json(n) -> dict:
    """A node's attributes as JSON: a kernel's stages as objects."""
    if n.op not in STRUCTURED:
        return n.attrs
    return {where: [{"op": st.op, "operands": list(st.operands), "attrs": dict(st.attrs),
                     "at": st.at, "pair": st.pair} for st in n.attrs[where]]
            for where in ("prologue", "epilogue")}


def plan_json(plan: Plan) -> dict:
    g = plan.graph
    kind = {i: "load" for i in plan.load_time} | {i: "view" for i in plan.views} \
        | {i: "launch" for i in plan.launches}
    return {
        "outputs": g.outputs,
        "effects": g.effects,
        "nodes": [{"id": n.id, "op": n.op, "inputs": list(n.inputs), "shape": list(n.shape),
                   "attrs": _attrs_json(n), "name": n.name, "block": n.block,
                   "kind": kind.get(n.id, "leaf"), "estimate_s": plan.estimate.get(n.id)}
                  for n in g.nodes],
    }


def emit(plan: Plan, rep: OptimizeReport, directory: str | Path) -> list[Path]:
    """Writes the egglog program of each template and the plan as JSON into `directory`."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    for old in d.glob("template*.egg"):  # an earlier emit's templates, not this plan's
        old.unlink()
    written = []
    for k, t in enumerate(rep.templates):
        if t.egglog is not None:
            p = d / f"template{k}.egg"
            p.write_text(t.egglog)
            written.append(p)
    p = d / "plan.json"
    p.write_text(json.dumps(plan_json(plan), indent=1))
    written.append(p)
    p = d / "report.txt"
    p.write_text(format_report(plan, rep, kernels=len(plan.launches)) + "\n")
    written.append(p)
    return written


def kernels_per_block(plan: Plan) -> dict[str, Counter]:
    """block label -> Counter of its launches' kernels (kernels.summary) and, as "view", the
    column slices of run-time products (a merged product's parts)."""
    g = plan.graph
    out: dict[str, Counter] = {}
    for i in plan.launches:
        out.setdefault(g[i].block, Counter())[_name(g[i])] += 1
    for i in plan.views:
        out.setdefault(g[i].block, Counter())["view"] += 1
    return out


def plan_text(plan: Plan) -> str:
    """One line per plan node: the form kept in snapshot tests."""
    g = plan.graph
    kind = {i: "load" for i in plan.load_time} | {i: "view" for i in plan.views} \
        | {i: "launch" for i in plan.launches}
    lines = []
    for n in g.nodes:
        if n.op in STRUCTURED:  # product(%a, %b) [rms_norm(%w, eps=1e-06) | add(%r)]
            def stages(where, n=n):
                return ", ".join(st.text(lambda i: f"%{n.inputs[i]}") for st in n.attrs[where])
            main = ", ".join(f"%{i}" for i in n.inputs[:len(node_kernel(n).main)])
            pro = stages("prologue")
            attrs = f"[{pro + ' | ' if pro else ''}{stages('epilogue')}]"
            what = f"{n.op}({main}) {attrs}"
        else:
            attrs = " ".join(f"{k}={v}" for k, v in sorted(n.attrs.items()))
            what = n.name if n.name else f"{n.op}({', '.join(f'%{i}' for i in n.inputs)}) {attrs}"
        lines.append(f"%{n.id} {kind.get(n.id, 'leaf'):6} {list(n.shape)} {what.strip()}")
    lines.append(f"outputs: {', '.join(f'%{o}' for o in g.outputs)}")
    if g.effects:
        lines.append(f"effects: {', '.join(f'%{o}' for o in g.effects)}")
    return "\n".join(lines) + "\n"
