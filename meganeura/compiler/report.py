"""Human-readable and JSON forms of an optimization: what fired, what was chosen, what it costs."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from .plan import Plan
from .optimize import OptimizeReport

FUSED_OPS = {
    "norm_matmul": "rmsnorm_matmul",
    "norm_matmul_glu": "gated_mlp + rmsnorm_matmul",
    "matmul_glu": "gated_mlp",
    "matmul_gate": "gated_mlp",
    "norm_rope": "qk_norm_rope",
    "head_norm_rope": "qk_norm_rope",
    "norm_rope_write": "qk_norm_rope + cache_rows",
    "head_norm_rope_write": "qk_norm_rope + cache_rows",
    "unit_norm_write": "cache_rows",
    "matmul_add": "residual_epilogue",
    "norm_add": "post_norm_residual",
    "norm_add_scale": "post_norm_residual",
    "matmul_norm_add": "post_norm_residual",
    "matmul_norm_add_scale": "post_norm_residual",
    "matmul_softcap": "softcap_epilogue",
    "embedding_scale": "scalar_fold",
}


def _us(seconds: float) -> str:
    return f"{seconds * 1e6:.1f} us" if seconds < 1e-3 else f"{seconds * 1e3:.2f} ms"


def merged_weights(plan: Plan) -> int:
    """Launches whose weight is a concatenation of several weights (merged matmuls)."""
    g = plan.graph

    def is_concat(i):
        n = g[i]
        return n.op == "concat_cols"

    return sum(1 for i in plan.launches if "matmul" in g[i].op and is_concat(g[i].inputs[1]))


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
    chosen = [f"{op} x{n} ({FUSED_OPS[op]})" for op, n in counts.items() if op in FUSED_OPS]
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
        key = tuple((g[i].op, g[i].shape) for i in ids)
        if key in shown:
            continue
        shown[key] = block
        same = sum(1 for b in by_block.values() if tuple((g[i].op, g[i].shape) for i in b) == key)
        lines.append(f"  [{block}] and {same - 1} more like it" if same > 1 else f"  [{block}]")
        for i in ids:
            n = g[i]
            lines.append(f"    {_us(plan.estimate[i]):>10}  {n.op} {list(n.shape)}")
    if kernels:
        lines.append(f"most expensive kernels (of {len(plan.launches)}):")
        top = sorted(plan.launches, key=lambda i: -plan.estimate[i])[:kernels]
        for i in top:
            n = g[i]
            lines.append(f"  {_us(plan.estimate[i]):>10}  %{i} {n.op} {list(n.shape)} [{n.block}]")
    return "\n".join(lines)


def plan_summary(plan: Plan) -> str:
    """One line: launches by kind, the fusions among them, the estimated time."""
    counts = plan.kernel_counts()
    kinds = ", ".join(f"{op} {n}" for op, n in sorted(counts.items(), key=lambda x: -x[1]))
    return f"{len(plan.launches)} launches ({kinds}); estimated {_us(plan.estimated_time)}"


def plan_json(plan: Plan) -> dict:
    g = plan.graph
    kind = {i: "load" for i in plan.load_time} | {i: "view" for i in plan.views} \
        | {i: "launch" for i in plan.launches}
    return {
        "outputs": g.outputs,
        "effects": g.effects,
        "nodes": [{"id": n.id, "op": n.op, "inputs": list(n.inputs), "shape": list(n.shape),
                   "attrs": n.attrs, "name": n.name, "block": n.block,
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


def fusion_families_per_block(plan: Plan) -> dict[str, Counter]:
    """block label -> Counter of fusion families its launches use (merge counted separately)."""
    g = plan.graph
    out: dict[str, Counter] = {}
    for i in plan.launches:
        n = g[i]
        c = out.setdefault(n.block, Counter())
        for fam in FUSED_OPS.get(n.op, "").split(" + "):
            if fam:
                c[fam] += 1
    for i in plan.views:  # a slice of a run-time product: the product was merged
        out[g[i].block]["shared_input_merge"] += 1
    return out


def plan_text(plan: Plan) -> str:
    """One line per plan node: the form kept in snapshot tests."""
    g = plan.graph
    kind = {i: "load" for i in plan.load_time} | {i: "view" for i in plan.views} \
        | {i: "launch" for i in plan.launches}
    lines = []
    for n in g.nodes:
        attrs = " ".join(f"{k}={v}" for k, v in sorted(n.attrs.items()))
        what = n.name if n.name else f"{n.op}({', '.join(f'%{i}' for i in n.inputs)}) {attrs}"
        lines.append(f"%{n.id} {kind.get(n.id, 'leaf'):6} {list(n.shape)} {what.strip()}")
    lines.append(f"outputs: {', '.join(f'%{o}' for o in g.outputs)}")
    if g.effects:
        lines.append(f"effects: {', '.join(f'%{o}' for o in g.effects)}")
    return "\n".join(lines) + "\n"
