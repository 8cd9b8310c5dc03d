"""Tile sweep of attention's gradient kernels (codegen/attention_grad.py) on the training
shapes, against PyTorch's own attention backward.

    python benchmarks/attention_grad_sweep.py [--shapes e2b-sliding e2b-full ...] [--reps 20]
    python benchmarks/attention_grad_sweep.py --device cpu    # the script itself, on the interpreter

Each shape is one attention_grad node (q, k, v column slices of one merged projection, as
in a plan) bound by the compiler with the default tiles (GPU_TILES). Printed per shape:
- the default's time, each kernel of the chain (stats, dq, dk | dv, the group's sum) by
  the difference of timed prefixes of the chain, TFLOP/s counted as 2.5 x the forward's
  4 * heads * head_dim * (query, key) pairs, and the error of [dq | dk | dv] against fp32
  autograd of the same attention;
- the same with P and dS in one or two bf16 terms each (TERMS_BF16): time and error;
- PyTorch's scaled_dot_product_attention backward on the same bf16 tensors (forward and
  backward less the forward; GQA by enable_gqa, a window by a boolean mask);
- each candidate tile of one kernel, the others at their defaults, best first.
Times: a CUDA graph of the launches replayed --reps times (median, CUDA events).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from timing import graph_replay_ms  # noqa: E402
from meganeura.codegen import Target  # noqa: E402
from meganeura.codegen import attention_grad as ag  # noqa: E402
from meganeura.codegen.cache import KernelCache  # noqa: E402
from meganeura.compiler.cost import CPU_INTERPRETER, CostModel, attention_pairs  # noqa: E402
from meganeura.compiler.graph import Graph  # noqa: E402
from meganeura.compiler.plan import make_plan  # noqa: E402
from meganeura.runtime.check import relative_error  # noqa: E402
from meganeura.runtime.compiled import CompiledModel  # noqa: E402

# name -> (tokens, heads, kv heads, head width, window)
SHAPES = {"e2b-sliding": (2048, 8, 1, 256, 512), "e2b-full": (2048, 8, 1, 512, 0),
          "e4b-sliding": (4096, 8, 2, 256, 512), "e4b-full": (4096, 8, 2, 512, 0),
          "4b": (2048, 20, 10, 128, 0), "31b-sliding": (2048, 32, 16, 256, 1024)}
TINY = {"tiny-group": (40, 4, 2, 16, 0), "tiny-window": (37, 4, 1, 32, 9)}
CANDIDATES = {  # (query rows, key rows, warps, stages)
    128: {"stats": [(64, 64, 4, 2), (128, 64, 8, 2), (64, 64, 4, 3), (128, 32, 4, 2)],
          "dq": [(64, 64, 4, 2), (128, 64, 8, 2), (64, 32, 4, 2), (128, 32, 8, 2), (64, 64, 4, 3)],
          "dkv": [(64, 64, 8, 2), (64, 64, 4, 2), (32, 64, 4, 2), (64, 128, 8, 2), (32, 128, 8, 2),
                  (64, 32, 4, 2)]},
    256: {"stats": [(64, 64, 8, 2), (64, 64, 4, 2), (64, 32, 4, 2), (64, 32, 8, 3)],
          "dq": [(64, 32, 8, 2), (64, 64, 8, 2), (64, 32, 4, 2), (128, 32, 8, 2), (64, 64, 8, 1)],
          "dkv": [(64, 32, 8, 2), (64, 64, 8, 2), (32, 32, 4, 2), (64, 32, 4, 2), (32, 64, 8, 2),
                  (64, 64, 8, 1), (32, 32, 8, 3)]},
    512: {"stats": [(64, 32, 8, 1), (64, 64, 8, 1), (32, 32, 4, 2), (64, 16, 8, 2)],
          "dq": [(32, 32, 8, 1), (64, 32, 8, 1), (32, 32, 4, 2), (64, 16, 8, 2), (32, 32, 8, 2)],
          "dkv": [(32, 16, 8, 1), (32, 32, 8, 1), (16, 32, 8, 1), (32, 16, 4, 2), (64, 16, 8, 1),
                  (32, 32, 8, 2)]},
}


def one_op(t, heads, kv, hd, window, device, dtype, gen, dy_fp32=False):
    g = Graph()
    width = (heads + 2 * kv) * hd
    qkv = g.input_f32("qkv", (t, width))
    q = g.slice_cols(qkv, 0, heads * hd)
    k = g.slice_cols(qkv, heads * hd, kv * hd)
    v = g.slice_cols(qkv, (heads + kv) * hd, kv * hd)
    dy = g.input_f32("dy", (t, heads * hd), fp32=dy_fp32)  # fp32: as a LoRA plan's dO
    g.set_outputs([g.attention_grad(q, k, v, dy, heads, kv, hd, 1.0, window)])
    x = (torch.randn(t, width, generator=gen, device=device) * hd ** -0.25).to(dtype)
    d = torch.randn(t, heads * hd, generator=gen, device=device)
    d = d if dy_fp32 else d.to(dtype)
    return g, [x, d]


def torch_attention(x, heads, kv, hd, window):
    """q, k, v [1, heads, t, hd] of the merged input, and the mask (None: causal)."""
    t = x.shape[0]
    q, k, v = x.split([heads * hd, kv * hd, kv * hd], dim=1)
    q, k, v = (y.reshape(t, -1, hd).transpose(0, 1).unsqueeze(0) for y in (q, k, v))
    mask = None
    if window:
        i = torch.arange(t, device=x.device)
        mask = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - window)
    return q, k, v, mask


def sdpa(q, k, v, mask):
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1.0, enable_gqa=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0, enable_gqa=True)


def reference(x, d, heads, kv, hd, window):
    """[dq | dk | dv] by fp32 autograd."""
    xf = x.float().requires_grad_(True)
    q, k, v, mask = torch_attention(xf, heads, kv, hd, window)
    o = sdpa(q, k, v, mask)
    t = x.shape[0]
    o.backward(d.float().reshape(t, heads, hd).transpose(0, 1).unsqueeze(0))
    return xf.grad


def torch_backward_ms(x, d, heads, kv, hd, window, reps, replay_ms) -> float:
    xb = x.detach().clone().requires_grad_(True)
    t = x.shape[0]
    g = d.to(x.dtype).reshape(t, heads, hd).transpose(0, 1).unsqueeze(0)

    def fwd():
        q, k, v, mask = torch_attention(xb, heads, kv, hd, window)
        return sdpa(q, k, v, mask)

    def both():
        torch.autograd.grad(fwd(), xb, g)

    with torch.no_grad():
        f = replay_ms(fwd, reps)
    return replay_ms(both, reps) - f


def timer(device):
    """ms of run(): CUDA-graph replays on a GPU; one run's wall time on the interpreter."""
    if device.type == "cuda":
        return graph_replay_ms

    def once(run, reps):
        t0 = time.perf_counter()
        run()
        return (time.perf_counter() - t0) * 1e3
    return once


def cut(spec, n: int):
    """The chain's first n kernels."""
    first = dataclasses.replace(spec)
    at = first
    for _ in range(n - 1):
        at.then = dataclasses.replace(at.then)
        at = at.then
    at.then = None
    return first


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", nargs="+", default=None, choices=list(SHAPES) + list(TINY))
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--no-sweep", dest="sweep", action="store_false")
    ap.add_argument("--dy-fp32", action="store_true", help="dO held in fp32, as a LoRA "
                    "plan's is")
    ap.add_argument("--cache-dir", default="/tmp/meganeura-attention-grad-sweep")
    a = ap.parse_args(argv)
    device = torch.device(a.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shapes = a.shapes or list(SHAPES if device.type == "cuda" else TINY)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "the interpreter"
    print(f"# {name} torch {torch.__version__}", flush=True)
    replay_ms = timer(device)
    cache = KernelCache(a.cache_dir, "attention_grad_sweep")
    gen = torch.Generator(device=device).manual_seed(0)
    target = Target(device, dtype)
    for name in shapes:
        t, heads, kv, hd, window = {**SHAPES, **TINY}[name]
        g, inputs = one_op(t, heads, kv, hd, window, device, dtype, gen, a.dy_fp32)
        plan = make_plan(g, CostModel(CPU_INTERPRETER, "fp32"))
        model = CompiledModel(plan, {}, target, cache, cuda_graph=False)
        model(*inputs)
        (launch,) = [x for x in model.launches if x.spec.archetype == "attention_grad"]
        nid = launch.node
        node = plan.graph[nid]
        flops = 10 * heads * hd * attention_pairs(t, window or None)
        want = reference(inputs[0], inputs[1], heads, kv, hd, window)
        err = relative_error(model.outputs[0].float(), want)
        base = model.specs[nid]
        n = len(base.chain())
        prefix = []
        for i in range(1, n + 1):
            model.specs[nid] = cut(base, i)
            prefix.append(replay_ms(model._bind(nid).run, a.reps))
        model.specs[nid] = base
        total = prefix[-1]
        each = [prefix[0]] + [prefix[i] - prefix[i - 1] for i in range(1, n)]
        parts = ", ".join(f"{s.variant} {ms * 1e3:.0f} us" for s, ms in zip(base.chain(), each))
        theirs = torch_backward_ms(inputs[0], inputs[1], heads, kv, hd, window, a.reps,
                                   replay_ms)
        print(f"== {name} (t {t}, heads {heads}/{kv}, hd {hd}, window {window}): "
              f"{total * 1e3:.0f} us, {flops / total / 1e9:.0f} TFLOP/s, err {err:.2e}; "
              f"torch sdpa backward {theirs * 1e3:.0f} us ({total / theirs:.2f}x of it)",
              flush=True)
        print(f"   {parts}", flush=True)
        if device.type == "cuda":  # P and dS in one or two bf16 terms
            saved = dict(ag.TERMS_BF16)
            for p_terms, ds_terms in ((1, 1), (1, 2), (2, 1), (2, 2)):
                ag.TERMS_BF16.update(p=p_terms, ds=ds_terms)
                model.specs[nid] = ag.build(node, plan.graph, target)
                ms = replay_ms(model._bind(nid).run, a.reps)
                e = relative_error(model.outputs[0].float(), want)
                print(f"   P in {p_terms}, dS in {ds_terms} bf16 term(s): {ms * 1e3:.0f} us, "
                      f"err {e:.2e}", flush=True)
            ag.TERMS_BF16.update(saved)
            model.specs[nid] = base
        if not a.sweep:
            continue
        bd = max(16, 1 << (hd - 1).bit_length())
        if device.type == "cpu":  # the interpreter's tiles, and one other of each kernel
            table, cands_of = ag.INTERPRETER_TILES, {"stats": [(32, 16, 4, 1)],
                                                      "dq": [(32, 16, 4, 1)],
                                                      "dkv": [(16, 32, 4, 1)]}
        else:
            table, cands_of = ag.GPU_TILES[bd], CANDIDATES[bd]
        default = dict(table)
        for kind, cands in cands_of.items():
            rows = []
            for cfg in cands:
                table.update({kind: cfg})
                try:
                    model.specs[nid] = ag.build(node, plan.graph, target)
                    ms = replay_ms(model._bind(nid).run, a.reps)
                    e = relative_error(model.outputs[0].float(), want)
                except Exception as ex:  # noqa: BLE001 - a tile that does not build
                    print(f"   {kind} {cfg}: failed {type(ex).__name__}: {str(ex)[:100]}",
                          flush=True)
                    continue
                rows.append((ms, cfg, e))
            table.update(default)
            model.specs[nid] = base
            for ms, cfg, e in sorted(rows):
                print(f"   {kind} {cfg}: {ms * 1e3:.0f} us ({total / ms:.2f}x faster), err {e:.1e}",
                      flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
