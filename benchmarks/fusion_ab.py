"""A fused kernel against the kernels it replaces, on a model's own shapes, in one process.

    python benchmarks/fusion_ab.py [--only NAME ...] [--reps 200]

Each case is two graphs computing the same tensor: the fused kernel (one node with stages)
and the unfused kernels the plan would run otherwise. Both are bound without the
optimizer (what the graph says is what runs), checked against each other, and timed as
CUDA-graph replays of their launches (median over --reps, CUDA events). The cases are the
fusions the e-graph chooses that no measurement stood behind before:

- the final RMSNorm as the prologue of a one-row lm_head with its soft-cap (e4b, 31b decode:
  every column tile recomputes the row's statistics, against one more launch);
- the per-layer inputs' token rows, scaled, plus the normalized projection, scaled again, in
  the gather (e4b prefill and decode: the rows are written once, not three times).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from meganeura.codegen import Target  # noqa: E402
from meganeura.codegen.cache import KernelCache  # noqa: E402
from meganeura.compiler.cost import CPU_INTERPRETER, CostModel  # noqa: E402
from meganeura.compiler.graph import Graph  # noqa: E402
from meganeura.compiler.kernels import stage  # noqa: E402
from meganeura.compiler.plan import make_plan  # noqa: E402
from meganeura.runtime.check import relative_error  # noqa: E402
from meganeura.runtime.compiled import CompiledModel  # noqa: E402
from timing import graph_replay_ms  # noqa: E402


def lm_head(fused: bool, hidden: int, vocab: int = 262144, cap: float = 30.0):
    """softcap(rms_norm(x) @ E^T) of one row, E the [vocab, hidden] embedding read in place."""
    g = Graph()
    x = g.input_f32("x", (1, hidden))
    w = g.parameter("norm", (hidden,))
    e = g.transpose(g.parameter("embed", (vocab, hidden)))
    if fused:
        out = g.kernel("product", (x, e), [stage("rms_norm", w, eps=1e-6)],
                       [stage("softcap", cap=cap)])
    else:
        out = g.kernel("product", (g.rms_norm(x, w, 1e-6), e), (), [stage("softcap", cap=cap)])
    g.set_outputs([out])
    return g, {"norm": (hidden,), "embed": (vocab, hidden)}, {"x": (1, hidden)}


def per_layer_inputs(fused: bool, rows: int, width: int = 42 * 256, vocab: int = 262144):
    """(table[ids] * sqrt(P) + proj) * 2^-0.5 over [rows, layers * P]."""
    g = Graph()
    ids = g.input_u32("ids", (rows,))
    proj = g.input_f32("proj", (rows, width))
    table = g.parameter("table", (vocab, width))
    if fused:
        out = g.kernel("gather", (ids, table), (), [stage("scale", factor=16.0), stage("add", proj),
                                                    stage("scale", factor=2 ** -0.5)])
    else:  # as the plans ran it: the two scales folded into one gather, the add apart (and
        # the projection's 2^-0.5 folded into its norm's weight: proj here comes scaled)
        out = g.add(g.kernel("gather", (ids, table), (), [stage("scale", factor=16 * 2 ** -0.5)]),
                    proj)
    g.set_outputs([out])
    return g, {"table": (vocab, width)}, {"ids": (rows,), "proj": (rows, width)}


CASES = {
    "e4b lm_head, one row: final norm as prologue": lambda f: lm_head(f, 2560),
    "31b lm_head, one row: final norm as prologue": lambda f: lm_head(f, 5376),
    "e4b per-layer inputs, one row: add and scale in the gather": lambda f: per_layer_inputs(f, 1),
    "e4b per-layer inputs, 2048 rows: add and scale in the gather":
        lambda f: per_layer_inputs(f, 2048),
}


def bind(graph, weights, device, dtype, cache):
    plan = make_plan(graph, CostModel(CPU_INTERPRETER, "fp32"))
    # the inputs in buffers of their own: the replays run without copying them in
    return CompiledModel(plan, weights, Target(device, dtype), cache, cuda_graph=False,
                         inputs_apart=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", nargs="*", default=None, help="substrings of case names")
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--cache-dir", default="/tmp/meganeura-fusion-ab")
    a = ap.parse_args()
    device, dtype = torch.device("cuda"), torch.bfloat16
    cache = KernelCache(a.cache_dir, "fusion_ab")
    gen = torch.Generator(device=device).manual_seed(0)
    print(f"# {torch.cuda.get_device_name()} torch {torch.__version__}", flush=True)
    for name, make in CASES.items():
        if a.only and not any(s in name for s in a.only):
            continue
        _, wshapes, ishapes = make(True)
        weights = {k: (torch.randn(s, generator=gen, device=device) / math.sqrt(s[-1])).to(dtype)
                   if len(s) > 1 else (1 + 0.1 * torch.randn(s, generator=gen, device=device)).to(dtype)
                   for k, s in wshapes.items()}
        inputs = [torch.randint(0, wshapes.get("table", (262144,))[0], s, generator=gen,
                                device=device) if k == "ids"
                  else torch.randn(s, generator=gen, device=device).to(dtype)
                  for k, s in ishapes.items()]
        out, ms = {}, {}
        for fused in (False, True):
            graph, _, _ = make(fused)
            model = bind(graph, weights, device, dtype, cache)
            if "per-layer" in name and not fused:  # the projection as that plan scaled it
                model.load_inputs(inputs[0], inputs[1] * 2 ** -0.5)
            else:
                model.load_inputs(*inputs)
            ms[fused] = graph_replay_ms(model.run_kernels, a.reps)
            out[fused] = model.outputs[0].float().clone()
        err = relative_error(out[True], out[False])
        print(f"{name}: unfused {ms[False] * 1e3:8.1f} us, fused {ms[True] * 1e3:8.1f} us "
              f"({ms[True] / ms[False]:.3f}x), fused vs unfused rel. error {err:.1e}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
