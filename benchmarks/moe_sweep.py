"""Tile sweep of the expert kernels on 26B-A4B's shapes: which block sizes and warps the
codegen (codegen/experts.py) should pick, measured, not guessed.

    python benchmarks/moe_sweep.py [--only row combine grouped] [--reps 100]

Each kernel is bound once by the compiler (a one-op graph, as a plan binds it), then its
launch is rebuilt with each configuration (constexprs, grid, warps, stages), checked
against the default's output, and timed in CUDA graphs of ten launches of it (median of
--reps replays, CUDA events; the graph's own launch spread over the ten). Row kernels (one
token: a program per pair, or per token for the weighted sum) report the bandwidth they
stream the chosen experts at; the grouped products (a prefill's pairs sorted by expert)
their TFLOP/s. The copy bandwidth of the device is
measured in the same run.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from timing import copy_bandwidth, graph_replay_ms  # noqa: E402
from meganeura.codegen import Target  # noqa: E402
from meganeura.codegen.cache import KernelCache  # noqa: E402
from meganeura.codegen.common import cdiv  # noqa: E402
from meganeura.compiler import formulas as fm  # noqa: E402
from meganeura.compiler.cost import CPU_INTERPRETER, CostModel  # noqa: E402
from meganeura.compiler.graph import Graph  # noqa: E402
from meganeura.compiler.plan import make_plan  # noqa: E402
from meganeura.runtime.check import relative_error  # noqa: E402
from meganeura.runtime.compiled import CompiledModel  # noqa: E402

H, E, K, WIDTH = 2816, 128, 8, 704


def launch_ms(run, reps: int, each: int = 10) -> float:
    """Median ms of one run(): `each` of it back to back in a CUDA graph, replayed `reps`
    times (so the graph's own launch is spread over `each` runs)."""
    return graph_replay_ms(lambda: [run() for _ in range(each)], reps) / each


def one_op(kind: str, tokens: int, device, dtype, gen):
    """A graph of one expert kernel of 26B-A4B's layer, its weights and inputs."""
    g = Graph()
    z = g.input_f32("logits", (tokens, E))
    scale = g.parameter("scale", (E,))
    weights = {"scale": (1 + 0.1 * torch.randn(E, generator=gen, device=device)).to(dtype)}
    inputs = [torch.randn(tokens, E, generator=gen, device=device).to(dtype)]
    if kind in ("row", "grouped-glu"):
        x = g.input_f32("x", (tokens, H))
        w = g.parameter("w", (E, 2 * WIDTH, H))
        weights["w"] = (torch.randn(E, 2 * WIDTH, H, generator=gen, device=device) / H ** 0.5
                        ).to(dtype)
        inputs.append(torch.randn(tokens, H, generator=gen, device=device).to(dtype))
        if kind == "row":
            nw = g.parameter("nw", (H,))
            weights["nw"] = torch.ones(H, device=device, dtype=dtype)
            out = g.expert_glu_routed(x, nw, z, scale, w, 1e-6, K, "gelu_tanh")
        else:
            out = g.expert_glu(x, g.moe_route(z, scale, K), w, "gelu_tanh")
    else:
        a = g.input_f32("a", (tokens * K, WIDTH))
        w = g.parameter("w", (E, H, WIDTH))
        weights["w"] = (torch.randn(E, H, WIDTH, generator=gen, device=device) / WIDTH ** 0.5
                        ).to(dtype)
        inputs.append(torch.randn(tokens * K, WIDTH, generator=gen, device=device).to(dtype))
        if kind == "combine":
            out = g.expert_matmul_combine_routed(a, z, scale, w, K)
        else:
            out = g.expert_matmul(a, g.moe_route(z, scale, K), w)
    g.set_outputs([out])
    return g, weights, inputs


def configs(kind: str) -> list[dict]:
    if kind == "row":
        return [dict(BN=bn, BK=bk, num_warps=w) for bn, bk, w in
                itertools.product((8, 16, 32), (256, 512), (4, 8))]
    if kind == "combine":
        return [dict(BN=bn, BK=bk, num_warps=4) for bn, bk in
                itertools.product((8, 16, 32), (64, 128, 256))]
    return [dict(BM=bm, BN=bn, BK=bk, num_warps=w, num_stages=st) for bm, bn, bk, w, st in
            ((64, 64, 64, 4, 3), (128, 64, 64, 8, 3), (128, 128, 64, 8, 3), (64, 128, 64, 4, 3),
             (128, 128, 64, 4, 4), (64, 256, 64, 8, 3), (128, 128, 64, 8, 4),
             (128, 256, 64, 8, 3), (128, 64, 128, 8, 3), (64, 128, 128, 4, 3),
             (128, 128, 32, 8, 5))]


def rebuilt(spec, cfg: dict, kind: str, tokens: int, nout: int):
    """The spec (or the grouped chain's product) with cfg's tiles, grid and warps."""
    warps, stages = cfg.get("num_warps", spec.num_warps), cfg.get("num_stages", spec.num_stages)
    tiles = {k: v for k, v in cfg.items() if k.isupper()}
    if kind == "row":
        grid = (tokens * K, cdiv(nout, tiles["BN"]))
    elif kind == "combine":
        grid = (tokens, cdiv(nout, tiles["BN"]))
        tiles["KSTEPS"] = cdiv(WIDTH, tiles["BK"])
    else:  # count, place, product: the place writes the tile starts for the product's BM
        count, place, prod = spec.chain()
        grid = (cdiv(tokens * K, tiles["BM"]) + min(E, tokens * K), cdiv(nout, tiles["BN"]))
        count = dataclasses.replace(count)
        count.then = dataclasses.replace(place, constexprs=dict(place.constexprs, BM=tiles["BM"]))
        args = [("desc", (x[0], (1, tiles["BN"], tiles["BK"]))) if kind_ == "desc" else
                (kind_, x) for kind_, x in prod.args]  # the weight tiles' block
        count.then.then = dataclasses.replace(prod, constexprs=dict(prod.constexprs, **tiles),
                                              grid=grid, args=args, num_warps=warps,
                                              num_stages=stages)
        return count
    return dataclasses.replace(spec, constexprs=dict(spec.constexprs, **tiles), grid=grid,
                               num_warps=warps, num_stages=stages)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", nargs="*", default=["row", "combine", "grouped-glu",
                                                   "grouped-down"])
    ap.add_argument("--tokens", type=int, default=2048, help="tokens of the grouped products")
    ap.add_argument("--reps", type=int, default=100)
    ap.add_argument("--cache-dir", default="/tmp/meganeura-moe-sweep")
    a = ap.parse_args(argv)
    device, dtype = torch.device("cuda"), torch.bfloat16
    bw = copy_bandwidth()
    print(f"# {torch.cuda.get_device_name()} torch {torch.__version__}; copy bandwidth "
          f"{bw / 1e12:.3f} TB/s", flush=True)
    cache = KernelCache(a.cache_dir, "moe_sweep")
    gen = torch.Generator(device=device).manual_seed(0)
    for kind in a.only:
        tokens = 1 if kind in ("row", "combine") else a.tokens
        g, weights, inputs = one_op(kind, tokens, device, dtype, gen)
        plan = make_plan(g, CostModel(CPU_INTERPRETER, "fp32"))
        if kind in ("row", "combine"):  # the default, split among programs, then the
            # configurations of a program per column tile
            model = CompiledModel(plan, weights, Target(device, dtype), cache, cuda_graph=False)
            model(*inputs)
            (launch,) = [x for x in model.launches if x.spec.archetype == "experts"]
            print(f"== {kind}, split: {launch.spec.variant} grid {launch.spec.grid} "
                  f"{launch.spec.constexprs} {launch_ms(launch.run, a.reps) * 1e3:.1f} us",
                  flush=True)
        model = CompiledModel(plan, weights, Target(device, dtype, expert_splits=False), cache,
                              cuda_graph=False)
        model(*inputs)
        (nid,) = [launch.node for launch in model.launches
                  if launch.spec.archetype == "experts"]
        base_spec = model.specs[nid]
        want = model.outputs[0].float().clone()
        nout = g[nid].shape[1]
        route = fm.moe_route(inputs[0].float(), weights["scale"].float(), K)
        experts = route[:, K:].long().unique().numel()
        rows = g[g[nid].inputs[-1]].shape[1] * g[g[nid].inputs[-1]].shape[2]
        nbytes = 2 * experts * rows if kind != "combine" else 2 * K * rows
        flops = 2 * tokens * K * rows
        results = []
        for cfg in configs(kind):
            model.specs[nid] = rebuilt(base_spec, cfg, kind, tokens, nout)
            try:
                launch = model._bind(nid)
                ms = launch_ms(launch.run, a.reps)
                err = relative_error(model.outputs[0].float(), want)
            except Exception as e:  # noqa: BLE001 - a configuration that does not build
                print(f"  {kind} {cfg}: failed {type(e).__name__}: {str(e)[:120]}", flush=True)
                continue
            results.append((ms, cfg, err))
        model.specs[nid] = base_spec
        base_ms = launch_ms(model._bind(nid).run, a.reps)
        default = (base_spec.chain()[-1] if kind.startswith("grouped") else base_spec).constexprs
        print(f"== {kind}, {tokens} token(s): default {default} "
              f"{base_ms * 1e3:.1f} us", flush=True)
        if kind.startswith("grouped"):  # the sort's two launches alone
            model.specs[nid] = dataclasses.replace(base_spec)
            model.specs[nid].then = dataclasses.replace(base_spec.then, then=None)
            sort_ms = launch_ms(model._bind(nid).run, a.reps)
            model.specs[nid] = base_spec
            print(f"  the sort (count, place): {sort_ms * 1e3:.1f} us", flush=True)
        for ms, cfg, err in sorted(results, key=lambda r: r[0])[:8]:
            rate = (f"{nbytes / ms / 1e9:.2f} TB/s ({nbytes / ms / 1e9 / (bw / 1e12):.0%} of "
                    f"copy)" if tokens == 1 else f"{flops / ms / 1e9:.0f} TFLOP/s")
            print(f"  {ms * 1e3:8.1f} us  {rate}  {cfg}  err {err:.1e}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
