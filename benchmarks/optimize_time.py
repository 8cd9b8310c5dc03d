"""Time of the optimizer (e-graph build, saturation, extraction, plan) for every preset.

    python benchmarks/optimize_time.py [--seq-len 2048] [--repeat 3]

Prints one row per preset: layers, templates, e-graph size, phase times (best of
--repeat runs) and the estimated H200 time of the plan. No weights are touched.
"""

from __future__ import annotations

import argparse
import platform
import time

from meganeura.compiler.cost import H200, CostModel
from meganeura.models import PRESETS, build
from meganeura.pipeline import optimize_graph as optimize


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    cost = CostModel(H200, "bf16")
    print(f"# optimizer time, seq {args.seq_len}, {platform.processor() or platform.machine()}, "
          f"best of {args.repeat}")
    print(f"{'preset':<11} {'layers':>6} {'nodes':>6} {'tmpl':>4} {'e-nodes':>7} {'encode':>7} "
          f"{'saturate':>8} {'extract':>8} {'plan':>6} {'total':>7} {'kernels':>7} {'est. H200':>9}")
    for name, config in PRESETS.items():
        graph = build(config, args.seq_len)
        best = None
        for _ in range(args.repeat):
            t = time.perf_counter()
            plan, rep = optimize(graph, cost)
            total = time.perf_counter() - t
            if best is None or total < best[0]:
                best = (total, plan, rep)
        total, plan, rep = best
        phase = {p: sum(t.seconds[p] for t in rep.templates) for p in ("encode", "saturate")}
        phase["extract"] = sum(t.seconds["serialize"] + t.seconds["extract"] for t in rep.templates)
        print(f"{name:<11} {config.num_hidden_layers:>6} {len(graph):>6} {len(rep.templates):>4} "
              f"{sum(t.enodes for t in rep.templates):>7} {phase['encode']:>6.2f}s "
              f"{phase['saturate']:>7.2f}s {phase['extract']:>7.2f}s {rep.seconds['plan']:>5.2f}s "
              f"{total:>6.2f}s {len(plan.launches):>7} {plan.estimated_time * 1e3:>7.2f}ms")


if __name__ == "__main__":
    main()
