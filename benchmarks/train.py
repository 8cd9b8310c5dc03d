"""Training steps side by side: meganeura's Trainer, transformers, transformers + Liger.

    python benchmarks/train.py                        # e4b LoRA at 4096, e2b full at 2048, check
    python benchmarks/train.py --works check          # e2b gradients against fp32 autograd
    python benchmarks/train.py --tiny --device cpu    # the script itself, on the interpreter

One process, one model per work (transformers' model built in bf16 with random weights,
sdpa attention; meganeura reads the very same tensors). A step is forward with labels,
backward, the AdamW step and zero_grad, on one sequence of random ids; time is the median
of --steps steps after --warmup, memory the peak above what the step found allocated (for
meganeura, plus its plan's buffer arena, which stays allocated between steps).

- e4b-lora: gemma4-e4b, LoRA rank 16, alpha 32 on q, k, v, o, gate, up, down, seq 4096;
  transformers through peft.
- e2b-full: gemma4-e2b, every weight but the token and per-layer embeddings, seq 2048.
- check: gemma4-e2b, seq 256: meganeura's bf16 gradients (embeddings frozen) against
  transformers' fp32 autograd of the same weights; relative error per tensor. Beside it,
  on the same weights and ids: transformers' bf16 autograd, and the floor under any bf16
  implementation (transformers' fp32 model with only the products' operands rounded to
  bf16, as tensor cores read them). `--init unit` draws meganeura's `random_weights`
  instead of transformers' initialization (the rows' model column says so).

meganeura's step is the joint forward + backward plan in generated kernels (attention's
gradient tiled by benchmarks/attention_grad_sweep.py; the norms' gradients not tuned yet;
`--executor reference` times the same graph in plain PyTorch). Rows go to results/train.csv, tagged with the GPU,
versions, commit and date. The first step of each length includes making its plan.
"""

from __future__ import annotations

import argparse
import csv
import re
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hf_forward import (INITS, bf16_floor_gradients, hf_config, hf_fp32_copy,  # noqa: E402
                        hf_model, shared_weights)
from prefill import environment  # noqa: E402

import meganeura  # noqa: E402
from meganeura.models import PRESETS  # noqa: E402
from meganeura.models.llama import LlamaConfig  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TINY = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                   max_position_embeddings=4096)
WORKS = {"e4b-lora": ("gemma4_e4b", 4096, "lora"), "e2b-full": ("gemma4_e2b", 2048, "full"),
         "check": ("gemma4_e2b", 256, "check")}
FIELDS = ["date", "gpu", "torch", "triton", "meganeura", "commit", "work", "model", "seq",
          "contender", "step_ms", "peak_gib", "tokens_per_s", "trained", "max_rel_error",
          "median_rel_error", "tensors", "note"]


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def frozen(name: str) -> bool:
    """The e2b-full work's frozen weights: the token and per-layer embeddings."""
    return "embed_tokens" in name


def measure(step, device, warmup: int, steps: int) -> dict:
    """Median ms of `step()` after warmup; peak bytes above the start of a step."""
    for _ in range(warmup):
        step()
    times, peaks = [], []
    for _ in range(steps):
        sync(device)
        if device.type == "cuda":
            start = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
        t = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t)
        if device.type == "cuda":
            peaks.append(torch.cuda.max_memory_allocated(device) - start)
    ms = statistics.median(times) * 1e3
    return {"step_ms": round(ms, 2), "peak_gib": round(max(peaks) / 2**30, 3) if peaks else ""}


def hf_step(model, params, ids, lr):
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)

    def step():
        loss = model(input_ids=ids[None], labels=ids[None], use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def contenders(args, work, cfg, key, seq, mode, device, dtype):
    """(name, step function, trained weight count) of each contender, made in turn (each
    after the one before was measured: peft and Liger change transformers' model)."""
    config = hf_config(cfg, key) if not args.tiny else hf_config(cfg)
    model = hf_model(config, dtype, device, seed=0, init=args.init, cfg=cfg)
    weights = shared_weights(model, cfg)
    ids = torch.randint(0, cfg.vocab_size, (seq,), generator=torch.Generator().manual_seed(1))
    ids = ids.to(device)
    mine = meganeura.from_config(cfg, weights, device, dtype)
    if mode == "lora":
        trainer = meganeura.Trainer(mine, lr=args.lr, lora=meganeura.LoRA(16, 32.0, TARGETS),
                                    executor=args.executor, fp32_products=args.fp32_products)
    else:
        trainer = meganeura.Trainer(mine, lr=args.lr, trainable=lambda n: not frozen(n),
                                    executor=args.executor, fp32_products=args.fp32_products)
    trained = sum(mine.weights[n].numel() for n in trainer.names)
    held = [trainer]  # dropped (its optimizer state freed) before transformers is measured
    del trainer, mine
    def step():
        held[0].step(ids.cpu())
    step.trainer, step.ids = held[0], ids.cpu()
    yield "meganeura", step, trained
    held.clear()
    del step.trainer  # its plans' arenas too: e4b's LoRA plan holds 44 GiB at 4096 tokens
    if device.type == "cuda":
        torch.cuda.empty_cache()
    model.train()
    if args.no_hf:
        return
    if mode == "lora":
        try:
            import peft
        except ImportError:
            print("  transformers: peft is not installed, no LoRA baseline", flush=True)
            return
        model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32,
                                                           lora_dropout=0.0,
                                                           target_modules=TARGETS))
    else:
        for n, p in model.named_parameters():
            p.requires_grad_(not frozen(n))
    params = [p for p in model.parameters() if p.requires_grad]
    yield "transformers", hf_step(model, params, ids, args.lr), sum(p.numel() for p in params)
    if args.no_liger:
        return
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    # Liger patches a multimodal Gemma-4 and a text-only one by separate functions
    patch = ("apply_liger_kernel_to_gemma4" if type(base).__name__ ==
             "Gemma4ForConditionalGeneration" else "apply_liger_kernel_to_gemma4_text")
    try:
        import liger_kernel.transformers as liger
        apply = getattr(liger, patch)
    except (ImportError, AttributeError) as e:
        print(f"  transformers + Liger: not run ({str(e).splitlines()[0]})", flush=True)
        return
    try:
        apply(rope=False, cross_entropy=False, fused_linear_cross_entropy=True, rms_norm=True,
              geglu=True, model=base)
    except Exception as e:  # noqa: BLE001 (a version whose patch does not fit: say so, go on)
        print(f"  transformers + Liger: not run ({type(e).__name__}: "
              f"{str(e).splitlines()[0][:200]})", flush=True)
        return
    yield "transformers + Liger", hf_step(model, params, ids, args.lr), \
        sum(p.numel() for p in params)


def run_work(args, work: str, writer) -> None:
    key, seq, mode = WORKS[work]
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = TINY if args.tiny else PRESETS[key]
    seq = args.seq or (24 if args.tiny else seq)
    name = ("tiny" if args.tiny else key.replace("_", "-")) + (
        " unit-init" if args.init == "unit" else "")
    base = {**environment(), "work": work, "model": name, "seq": seq}
    if mode == "check":
        for row in check_gradients(args, cfg, key, seq, device, dtype):
            print(f"{work}: {row}", flush=True)
            writer.writerow({**base, **row})
        return
    for who, step, trained in contenders(args, work, cfg, key, seq, mode, device, dtype):
        try:
            r = measure(step, device, args.warmup, args.steps)
        except torch.cuda.OutOfMemoryError:
            r = {"note": "out of memory"}
            torch.cuda.empty_cache()
        if "step_ms" in r:
            r["tokens_per_s"] = round(seq / r["step_ms"] * 1e3, 1)
        if hasattr(step, "trainer") and r.get("peak_gib") != "" and "peak_gib" in r:
            # the plan's buffer arena (activations, gradients) stays allocated between
            # steps, where transformers frees its activations: it counts as the step's
            arena = sum(fn.buffer_bytes for _, _, fn in step.trainer._plans.values() if fn)
            r["peak_gib"] = round(r["peak_gib"] + arena / 2**30, 3)
        if args.breakdown and hasattr(step, "trainer"):
            breakdown(step.trainer, step.ids, device)
        row = {**base, "contender": who, "trained": trained, **r}
        print(f"{work}: {who}: " + ", ".join(f"{k} {row[k]}" for k in
                                            ("step_ms", "peak_gib", "tokens_per_s", "note")
                                            if row.get(k) not in (None, "")), flush=True)
        writer.writerow(row)
        if device.type == "cuda":
            torch.cuda.empty_cache()


def breakdown(trainer, ids, device, top: int = 25) -> None:
    """Where one step's time goes: the plan's run (gradients), the optimizer, the host
    work between; then the GPU kernels by total time (torch.profiler)."""
    marks = []

    def mark(what):
        sync(device)
        marks.append((what, time.perf_counter()))
    mark("start")
    loss, grads = trainer._gradients(ids, None, keep=False)
    mark("forward + backward (plan)")
    trainer.optimizer.step(grads, max_norm=trainer.grad_clip)
    mark("AdamW")
    trainer._weights_changed()
    mark("after-step host work")
    for (_, t0), (what, t1) in zip(marks, marks[1:]):
        print(f"  breakdown: {what}: {(t1 - t0) * 1e3:.2f} ms", flush=True)
    if device.type != "cuda":
        return
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        trainer.step(ids)
        sync(device)
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=top), flush=True)


def check_gradients(args, cfg, key, seq, device, dtype) -> dict:
    """meganeura's gradients (model dtype) against transformers' fp32 autograd."""
    config = hf_config(cfg, key) if not args.tiny else hf_config(cfg)
    model = hf_model(config, dtype, device, seed=0, init=args.init, cfg=cfg)
    ref = hf_fp32_copy(model)
    del model
    for n, p in ref.named_parameters():
        p.requires_grad_(not frozen(n))
    weights = {n: w.to(dtype) for n, w in shared_weights(ref, cfg).items()}
    ids = torch.randint(0, cfg.vocab_size, (seq,), generator=torch.Generator().manual_seed(2))
    mine = meganeura.from_config(cfg, weights, device, dtype)
    trainer = meganeura.Trainer(mine, trainable=lambda n: not frozen(n), executor=args.executor,
                                fp32_products=args.fp32_products)
    loss, grads = trainer.gradients(ids)
    del trainer
    ref_loss = ref(input_ids=ids[None].to(device), labels=ids[None].to(device),
                   use_cache=False).loss
    ref_loss.backward()
    exact = {}
    for n, p in ref.named_parameters():
        if p.grad is not None:
            exact[n], p.grad = p.grad, None
    rows = []
    who = "meganeura" + (" (fp32 products)" if args.fp32_products else "")
    for who, theirs, their_loss in ((who, grads, loss), _product_floor(ref, ids, device),
                                    *_bf16_autograd(ref, ids, device)):
        errors = {n: ((theirs[n].float() - g).norm() / g.norm()).item()
                  for n, g in exact.items()}
        worst = max(errors, key=errors.get)
        print(f"  {who}: loss {their_loss:.6f} vs fp32 {ref_loss.item():.6f}; worst tensor "
              f"{worst}", flush=True)
        kinds: dict = {}
        for n, e in errors.items():  # by weight kind: the name without its layer
            kinds.setdefault(re.sub(r"\.\d+\.", ".*.", n), []).append(e)
        print("    median by kind: " + ", ".join(
            f"{k.removeprefix('model.')} {statistics.median(v):.2e}"
            for k, v in sorted(kinds.items(), key=lambda kv: -statistics.median(kv[1]))),
            flush=True)
        rows.append({"contender": f"{who} vs fp32 autograd",
                     "max_rel_error": f"{errors[worst]:.3e}",
                     "median_rel_error": f"{statistics.median(errors.values()):.3e}",
                     "tensors": len(errors), "trained": sum(theirs[n].numel() for n in errors),
                     "note": f"loss {their_loss:.5f} vs {ref_loss.item():.5f}"})
    return rows


def _product_floor(ref, ids, device):
    """transformers' fp32 gradients with only what a bf16 tensor-core product must round
    (hf_forward.bf16_floor_gradients; the weights are bf16 values already)."""
    loss, grads = bf16_floor_gradients(ref, ids[None].to(device))
    return "bf16 product operands (floor)", grads, loss


def _bf16_autograd(ref, ids, device):
    """transformers' own gradients in bf16 (a bf16 copy of the fp32 model): what bf16
    costs any implementation, beside meganeura's (none on the CPU, where both are fp32)."""
    if device.type != "cuda":
        return []
    import copy

    half = copy.deepcopy(ref).to(torch.bfloat16)
    half.zero_grad()
    out = half(input_ids=ids[None].to(device), labels=ids[None].to(device), use_cache=False)
    out.loss.backward()
    grads = {n: p.grad for n, p in half.named_parameters() if p.grad is not None}
    return [("transformers bf16", grads, out.loss.item())]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--works", default="e4b-lora,e2b-full,check",
                    help=f"comma-separated, of {', '.join(WORKS)}")
    ap.add_argument("--tiny", action="store_true", help="a two-layer Llama (checks the script)")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--seq", type=int, default=None, help="tokens a step (default: the work's)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--no-hf", action="store_true", help="meganeura alone")
    ap.add_argument("--executor", choices=("compiled", "reference"), default="compiled",
                    help="meganeura's training graph as generated kernels or on the reference "
                    "executor")
    ap.add_argument("--no-liger", action="store_true", help="leave transformers + Liger out")
    ap.add_argument("--breakdown", action="store_true",
                    help="after meganeura's steps: one step's time by part, and its kernels")
    ap.add_argument("--init", choices=INITS, default="transformers",
                    help="random weights: transformers' own initialization, or meganeura's "
                    "random_weights (unit: activations keep their scale at any width)")
    ap.add_argument("--fp32-products", action="store_true",
                    help="meganeura's plans hold the forward products' outputs in fp32 "
                    "(Trainer(fp32_products=True))")
    ap.add_argument("--csv", default=str(RESULTS / "train.csv"))
    args = ap.parse_args(argv)
    works = args.works.split(",")
    bad = [w for w in works if w not in WORKS]
    if bad:
        ap.error(f"unknown work {bad[0]!r} (one of {', '.join(WORKS)})")
    path = Path(args.csv)
    new = not path.exists()
    path.parent.mkdir(parents=True, exist_ok=True)
    print(f"# train {environment()}", flush=True)
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, FIELDS)
        if new:
            writer.writeheader()
        for work in works:
            run_work(args, work, writer)
            f.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
