"""The mixture-of-experts part of one Gemma-4 26B-A4B layer: meganeura's plan against
transformers' router and experts on the same weights, and the bytes floor at the copy
bandwidth measured in the same run.

    python benchmarks/moe_layer.py --tokens 1 8 2048 [--reps 200]
    python benchmarks/moe_layer.py --tiny --tokens 1 5      # through the interpreter

The part, on a layer's residual rows x [tokens, hidden] (bf16): the router (weightless
RMSNorm times scale * hidden^-0.5, the product to the experts' logits, fp32 softmax, top-k,
renormalized, times the chosen experts' scale), the experts' pre-norm, the experts (gate |
up, GELU-tanh gated, down) and their weighted sum.

- meganeura: that part of the model's graph (models/gemma4_text.py), optimized by the e-graph
  for the GPU and bound; its launches (as programmatic dependents at one token, as a decode
  step runs them) replayed as one CUDA graph;
- transformers: its Gemma4TextRouter, RMSNorm and Gemma4TextExperts modules holding the
  same tensors, with the experts implementation its models pick by default (grouped_mm on
  a GPU), eager and under torch.compile (reduce-overhead: CUDA graphs);
- the floor at one token: the bytes the part must read (the router's weight, the norms',
  the k chosen experts' gate | up and down rows, x and the output) at the device's copy
  bandwidth measured here (timing.py).

Each output is compared with transformers' modules upcast to fp32 (relative error; a token
whose k-th and (k+1)-th router scores are closer than bf16 can tell apart may choose another
expert in bf16). Medians of --reps CUDA-event timings.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from prefill import graph_time, timed  # noqa: E402
from timing import copy_bandwidth, graph_replay_ms  # noqa: E402
from meganeura import pipeline  # noqa: E402
from meganeura.compiler.graph import Graph  # noqa: E402
from meganeura.models import gemma4_text  # noqa: E402
from meganeura.runtime.check import relative_error  # noqa: E402

# a 26B-A4B-shaped part small enough for the interpreter
TINY = dict(hidden_size=40, num_experts=11, top_k_experts=3, moe_intermediate_size=24)


def part_graph(cfg, tokens: int) -> Graph:
    g = Graph()
    x = g.input_f32("x", (tokens, cfg.hidden_size))
    g.set_outputs([gemma4_text._experts(g, cfg, "moe", x)])
    return g


def hf_part(cfg_fields: dict, device, dtype, seed: int):
    """transformers' router, experts pre-norm and experts, random weights of unit-scale
    activations; and the function of x they compute as a decoder layer does."""
    from transformers import Gemma4TextConfig
    from transformers.models.gemma4 import modeling_gemma4 as m

    config = Gemma4TextConfig(**cfg_fields)
    config._experts_implementation = "grouped_mm" if device.type == "cuda" else "eager"
    torch.manual_seed(seed)
    mods = torch.nn.ModuleDict({
        "router": m.Gemma4TextRouter(config),
        "norm": m.Gemma4RMSNorm(config.hidden_size, eps=config.rms_norm_eps),
        "experts": m.Gemma4TextExperts(config)}).to(device=device, dtype=torch.float32)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in mods.named_parameters():
            r = torch.randn(p.shape, generator=gen, device=device)
            p.copy_(1 + 0.1 * r if p.dim() == 1 else r / p.shape[-1] ** 0.5)
    mods = mods.to(dtype).eval()

    def run(x, mods=mods):
        with torch.no_grad():
            _, weights, index = mods["router"](x)
            return mods["experts"](mods["norm"](x), index, weights)
    return mods, run


def meganeura_weights(mods) -> dict[str, torch.Tensor]:
    """The modules' own tensors under the part graph's names (no copy)."""
    r, e = mods["router"], mods["experts"]
    return {"moe.router.scale": r.scale, "moe.router.proj.weight": r.proj.weight,
            "moe.router.per_expert_scale": r.per_expert_scale,
            "moe.pre_feedforward_layernorm_2.weight": mods["norm"].weight,
            "moe.experts.gate_up_proj": e.gate_up_proj, "moe.experts.down_proj": e.down_proj}


def floor_bytes(cfg, tokens: int, elem: int = 2) -> int:
    """Bytes the part reads and writes at least: every router and norm weight, each chosen
    expert's rows once (at one token the k chosen; at more, at most every expert), x, out."""
    h, e, k, w = cfg.hidden_size, cfg.num_experts, cfg.top_k_experts, cfg.moe_intermediate_size
    experts = min(e, tokens * k)
    return elem * (e * h + 2 * h + e + experts * 3 * w * h + 2 * tokens * h)


def replay_ms(run, reps: int, cuda: bool) -> float:
    """Median ms of run() as one replayed CUDA graph (the host clock on the CPU)."""
    return graph_replay_ms(run, reps) if cuda else timed(run, 1, reps, False)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 2048])
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tiny", action="store_true", help="a small part of the same structure "
                    "(hidden 40, 11 experts of 24, top 3)")
    ap.add_argument("--no-torch-compile", dest="torch_compile", action="store_false")
    ap.add_argument("--cache-dir", default=None)
    a = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    fields = dict(gemma4_text.PRESET_FIELDS["gemma4_26b_a4b"], **(TINY if a.tiny else {}))
    cfg = gemma4_text.from_dict(fields)
    bandwidth = copy_bandwidth()
    print(f"# moe part of a layer: hidden {cfg.hidden_size}, {cfg.num_experts} experts of "
          f"{cfg.moe_intermediate_size}, top {cfg.top_k_experts}; "
          f"{torch.cuda.get_device_name() if cuda else 'cpu (interpreter)'}, torch "
          f"{torch.__version__}; copy bandwidth {bandwidth / 1e12:.3f} TB/s"
          f"{'' if cuda else ' (the H200s: no GPU here)'}", flush=True)
    mods, hf_run = hf_part(fields, device, dtype, a.seed)
    ref_mods, ref_run = hf_part(fields, device, torch.float32, a.seed)
    ref_mods.load_state_dict({k: v.float() for k, v in mods.state_dict().items()})
    s = pipeline.setup(device, dtype, cache_dir=a.cache_dir)
    weights = meganeura_weights(mods)
    failed = False
    for tokens in a.tokens:
        gen = torch.Generator(device=device).manual_seed(a.seed + tokens)
        x = torch.randn(tokens, cfg.hidden_size, generator=gen, device=device).to(dtype)
        t = time.perf_counter()
        plan, report = pipeline.optimize_graph(part_graph(cfg, tokens), s)
        model = pipeline.bind(plan, report, weights, s, cuda_graph=False,
                              dependent_launches=tokens == 1)
        compile_s = time.perf_counter() - t
        out = model(x).float().clone()
        ref = ref_run(x.float())
        err, hf_err = relative_error(out, ref), relative_error(hf_run(x).float(), ref)
        kernels = ", ".join(f"{n} {c}" for n, c in plan.kernel_counts().items())
        ms = replay_ms(model.run_kernels, a.reps, cuda)
        hf_ms = replay_ms(lambda: hf_run(x), a.reps, cuda) if cuda else None
        line = (f"tokens {tokens}: meganeura {ms * 1e3:.1f} us ({kernels}; compiled in "
                f"{compile_s:.1f} s)")
        if hf_ms is not None:
            line += f"; transformers eager {hf_ms * 1e3:.1f} us ({ms / hf_ms:.3f}x)"
        print(line, flush=True)
        if cuda:  # each launch alone, 20 of it back to back in one CUDA graph (no graph
            # launch in the time; its weights partly in L2 from the launch before)
            alone = [(f"{plan.graph[launch.node].op}[{launch.spec.variant}]",
                      graph_time(launch.run, 20)) for launch in model.launches]
            print("  launches alone: " + ", ".join(f"{n} {t * 1e3:.1f} us" for n, t in alone),
                  flush=True)
        if cuda and a.torch_compile:
            t = time.perf_counter()
            compiled = torch.compile(hf_run, mode="reduce-overhead")
            try:
                compiled(x)
                c_s = time.perf_counter() - t
                c_ms = timed(lambda: compiled(x), 3, a.reps, True)
                print(f"  transformers + torch.compile {c_ms * 1e3:.1f} us ({ms / c_ms:.3f}x; "
                      f"compiled in {c_s:.1f} s)", flush=True)
            except Exception as e:  # noqa: BLE001 - a baseline that does not compile is reported
                print(f"  transformers + torch.compile failed: {type(e).__name__}: "
                      f"{str(e)[:200]}", flush=True)
            torch.compiler.reset()
        floor_ms = floor_bytes(cfg, tokens) / bandwidth * 1e3
        print(f"  bytes floor {floor_ms * 1e3:.1f} us ({ms / floor_ms:.2f}x); relative error "
              f"vs transformers fp32: meganeura {err:.2e}, transformers bf16 {hf_err:.2e}",
              flush=True)
        failed |= err > (2e-2 if dtype == torch.bfloat16 else 1e-4)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
