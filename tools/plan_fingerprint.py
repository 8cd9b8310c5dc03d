"""Every launch of the presets' GPU plans as text: what a refactoring must leave unchanged.

    python tools/plan_fingerprint.py OUT.txt [--only 4b-2048,...]

For each configuration (preset, tokens, forward or generation plan) the plan is optimized
with the H200 profile in bf16 and every kernel it launches is built for an sm_90 target of
132 SMs, without a GPU. A line per kernel gives its archetype, a hash of its source, its
grid, its arguments (tensors named by what they hold, not by node id), constexprs, warps
and stages. Two commits whose files are equal launch the same kernels on the same buffers.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from meganeura.compiler.cost import H200, CostModel  # noqa: E402
from meganeura.pipeline import optimize_graph  # noqa: E402
from meganeura.codegen import Target, kernel_for  # noqa: E402
from meganeura.models import PRESETS, build  # noqa: E402
from meganeura.models.kv import Generation  # noqa: E402

# (label, preset, tokens, cache capacity or 0 for a plain forward)
CONFIGS = [
    ("4b-2048", "gemma4_4b", 2048, 0),
    ("4b-8192", "gemma4_4b", 8192, 0),
    ("12b-2048", "gemma4_12b", 2048, 0),
    ("27b-2048", "gemma4_27b", 2048, 0),
    ("4b-decode-4096", "gemma4_4b", 1, 4096),
    ("e2b-2048", "gemma4_e2b", 2048, 0),
    ("e4b-2048", "gemma4_e4b", 2048, 0),
    ("e4b-prefill-1000-4096", "gemma4_e4b", 1000, 4096),
    ("e4b-decode-4096", "gemma4_e4b", 1, 4096),
    ("31b-2048", "gemma4_31b", 2048, 0),
    ("31b-decode-4096", "gemma4_31b", 1, 4096),
]


def labels(plan) -> dict[int, str]:
    """Plan node -> a name that does not depend on node numbering."""
    g = plan.graph
    launch = {nid: k for k, nid in enumerate(plan.launches)}
    out: dict[int, str] = {}
    for n in g.nodes:
        if n.name is not None:
            out[n.id] = n.name
        elif n.id in launch:
            out[n.id] = f"L{launch[n.id]}"
        else:  # a view or a load-time node: what it is made of
            attrs = ",".join(f"{k}={v}" for k, v in sorted(n.attrs.items()) if not k.startswith("_"))
            out[n.id] = f"{n.op}({','.join(out[i] for i in n.inputs)}{';' + attrs if attrs else ''})"
    return out


def arg_text(kind, x, name) -> str:
    if kind in ("node", "stride"):
        return f"{kind}:{name[x]}"
    if kind == "desc":
        return f"desc:{name[x[0]]}{list(x[1])}"
    return f"{kind}:{x}"


def fingerprint(preset: str, tokens: int, capacity: int) -> list[str]:
    generation = Generation(capacity, decode=tokens == 1) if capacity else None
    graph = build(PRESETS[preset], tokens, generation)
    plan, _ = optimize_graph(graph, CostModel(H200, "bf16"))
    target = Target(torch.device("cuda"), torch.bfloat16, sms=132,
                    pdl=bool(capacity) and tokens == 1)
    name = labels(plan)
    lines = []
    for k, nid in enumerate(plan.launches):
        for spec in kernel_for(plan.graph[nid], plan.graph, target).chain():
            src = hashlib.sha256(spec.source.encode()).hexdigest()[:16]
            args = " ".join(arg_text(kind, x, name) for kind, x in spec.args)
            cx = ",".join(f"{a}={b}" for a, b in sorted(spec.constexprs.items()))
            lines.append(f"L{k} {spec.archetype} src={src} grid={list(spec.grid)} "
                         f"warps={spec.num_warps} stages={spec.num_stages} pdl={spec.pdl} "
                         f"[{cx}] {args}")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", help="file to write")
    ap.add_argument("--only", default="", help="comma-separated labels (default: all)")
    a = ap.parse_args()
    only = {s for s in a.only.split(",") if s}
    with open(a.out, "w") as f:
        for label, preset, tokens, capacity in CONFIGS:
            if only and label not in only:
                continue
            lines = fingerprint(preset, tokens, capacity)
            f.write(f"== {label}: {len(lines)} kernels\n" + "\n".join(lines) + "\n")
            print(f"{label}: {len(lines)} kernels", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
