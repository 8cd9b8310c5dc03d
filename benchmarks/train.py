"""Training steps side by side: meganeura's Trainer, transformers, transformers + Liger.

    python benchmarks/train.py                        # every work below, in turn
    python benchmarks/train.py --works e2b-full,4b    # some of them
    python benchmarks/train.py --works check          # e2b gradients against fp32 autograd
    python benchmarks/train.py --tiny --device cpu    # the script itself, on the interpreter

One process, one model per work (transformers' model built in bf16 with random weights,
sdpa attention; meganeura reads the very same tensors). A step is forward with labels,
backward, the AdamW step and zero_grad, on one sequence of random ids; time is the median
of --steps steps after --warmup, memory the peak above what the step found allocated (for
meganeura, plus its plan's buffer arena, which stays allocated between steps). Each row
also gives the step's model FLOPs (3x the forward's products and attention pairs, 2x for
LoRA's frozen products), their share of the GPU's dense bf16 peak (mfu), and the first
step's seconds (meganeura's make the plan and compile its kernels: with an empty
--cache-dir, the compile from an empty cache).

- e4b-lora: gemma4-e4b, LoRA rank 16, alpha 32 on q, k, v, o, gate, up, down, seq 4096;
  transformers through peft.
- e2b-full: gemma4-e2b, every weight but the token and per-layer embeddings, seq 2048.
- 4b: the seed's gemma4_4b (its random weights), forward, loss and backward at 2048
  tokens, no optimizer step: meganeura's gradients against benchmarks/torch_forward.py
  eagerly and under torch.compile on the same weights (each row notes its loss).
- 31b-lora: gemma4-31b with e4b-lora's adapters at 2048 tokens, its GLUs' gate and up
  computed again in the backward (Trainer(recompute_products=True)); transformers may not
  fit beside it: its row then says so.
- curve: e2b-full's training for --curve-steps steps (lr --curve-lr) on consecutive
  windows of the project's own docs (README.md and docs/*.md, their bytes as token ids),
  from the same weights: meganeura, transformers in bf16, and transformers in fp32 as the
  reference; each step's loss goes to --curve-csv and --curve-plot, the rows give each bf16
  run's worst and median loss gap to the fp32 one.
- check: gemma4-e2b, seq 256: meganeura's bf16 gradients (embeddings frozen) against
  transformers' fp32 autograd of the same weights; relative error per tensor. Beside it,
  on the same weights and ids: transformers' bf16 autograd, and the floor under any bf16
  implementation (transformers' fp32 model with only the products' operands rounded to
  bf16, as tensor cores read them). `--init unit` draws meganeura's `random_weights`
  instead of transformers' initialization (the rows' model column says so).

`--hf-compile` adds transformers under torch.compile to the timed works (its first steps
compile: minutes for these models, and peft's LoRA model has not finished within 150 s);
a torch.compile contender still compiling after --compile-limit seconds is left out, its
row saying so.
meganeura's step is the joint forward + backward plan in generated kernels (attention's
gradient tiled by benchmarks/attention_grad_sweep.py; the norms' gradients not tuned yet;
`--executor reference` times the same graph in plain PyTorch). Rows go to
results/train.csv, tagged with the GPU, versions, commit and date, and the step times to a
plot (--plot). The first step of each length includes making its plan.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import re
import signal
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
from meganeura.errors import MeganeuraError  # noqa: E402
from meganeura.models import PRESETS  # noqa: E402
from meganeura.models.llama import LlamaConfig  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TINY = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                   max_position_embeddings=4096)
WORKS = {"e4b-lora": ("gemma4_e4b", 4096, "lora"), "e2b-full": ("gemma4_e2b", 2048, "full"),
         "4b": ("gemma4_4b", 2048, "grads"), "31b-lora": ("gemma4_31b", 2048, "lora"),
         "curve": ("gemma4_e2b", 2048, "curve"), "check": ("gemma4_e2b", 256, "check")}
FIELDS = ["date", "gpu", "torch", "triton", "meganeura", "commit", "work", "model", "seq",
          "contender", "step_ms", "peak_gib", "tokens_per_s", "trained", "max_rel_error",
          "median_rel_error", "tensors", "note", "model_tflop", "mfu", "first_step_s"]
CURVE_FIELDS = ["date", "gpu", "commit", "model", "seq", "lr", "contender", "step", "loss"]
# dense bf16 tensor-core peaks (FLOP/s) by device name, for the model FLOP utilisation
PEAKS = {"H100 PCIe": 756e12, "H100": 989.4e12, "H200": 989.4e12}
# a step's model FLOPs over the forward's: forward, d(input), d(weights) (the latter absent
# for LoRA's frozen products: the adapters' own are a rounding error)
PASSES = {"full": 3, "grads": 3, "lora": 2}


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def frozen(name: str) -> bool:
    """The e2b-full work's frozen weights: the token and per-layer embeddings."""
    return "embed_tokens" in name


def forward_flops(graph) -> float:
    """Matrix FLOPs of a forward graph: 2 m k n a product, 4 heads x width a pair of
    (query, key) an attention sees."""
    from meganeura.compiler.cost import attention_pairs
    from meganeura.compiler.ops import OPS

    total = 0.0
    for n in graph.nodes:
        arch = OPS[n.op].archetype
        if arch == "product":
            (m, k), cols = graph[n.inputs[0]].shape, graph[n.inputs[1]].shape[1]
            total += 2.0 * m * k * cols
        elif arch == "attention":
            a = n.attrs
            total += 4.0 * a["num_heads"] * a["head_dim"] * attention_pairs(
                graph[n.inputs[0]].shape[0], a.get("window") or None)
    return total


def peak_flops(gpu: str) -> float | None:
    return next((v for k, v in PEAKS.items() if k in gpu), None)


def write_rows(path: Path, rows: list[dict], fields: list[str]) -> None:
    """Appends rows to the CSV at path, earlier rows kept under the current header."""
    old = []
    if path.exists():
        with path.open(newline="") as f:
            old = list(csv.DictReader(f))
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(old + rows)


class CompileTimeout(Exception):
    pass


class Alarm:
    fired = False


@contextlib.contextmanager
def deadline(seconds: int):
    """Raises CompileTimeout in the block after `seconds` (0: none) and marks the Alarm it
    yields as fired: a contender under torch.compile still compiling then is left out (its
    compile is Python, which the alarm interrupts; torch.compile may re-raise the exception
    as one of its own, or swallow it: the mark tells either way)."""
    alarm = Alarm()
    if not seconds or not hasattr(signal, "SIGALRM"):
        yield alarm
        return

    def fire(signum, frame):
        alarm.fired = True
        raise CompileTimeout()
    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield alarm
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def measure(step, device, warmup: int, steps: int) -> dict:
    """Median ms of `step()` after warmup; peak bytes above the start of a step; the first
    step's seconds (meganeura's include making its plan and compiling its kernels)."""
    sync(device)
    t = time.perf_counter()
    for k in range(warmup):
        step()
        if k == 0:
            sync(device)
            first = time.perf_counter() - t
    times, peaks, loss = [], [], None
    for _ in range(steps):
        sync(device)
        if device.type == "cuda":
            start = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
        t = time.perf_counter()
        loss = step()  # (a step that returns its loss: the same weights each step)
        sync(device)
        times.append(time.perf_counter() - t)
        if device.type == "cuda":
            peaks.append(torch.cuda.max_memory_allocated(device) - start)
    ms = statistics.median(times) * 1e3
    out = {"step_ms": round(ms, 2), "peak_gib": round(max(peaks) / 2**30, 3) if peaks else ""}
    if warmup:
        out["first_step_s"] = float(f"{first:.4g}")
    return out if loss is None else {**out, "note": f"loss {loss:.6f}"}


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
    mine = meganeura.from_config(cfg, weights, device, dtype, cache_dir=args.cache_dir)
    again = False
    if mode == "lora":
        # 31b's weights leave about 22 GiB of an 80 GB GPU: its GLUs' products are computed
        # again in the backward (arena 23.6 -> 13.9 GiB on the CPU's count)
        again = args.recompute_products or work == "31b-lora"
        trainer = meganeura.Trainer(mine, lr=args.lr, lora=meganeura.LoRA(16, 32.0, TARGETS),
                                    executor=args.executor, fp32_products=args.fp32_products,
                                    cuda_graph=args.cuda_graph, recompute_products=again)
    else:
        trainer = meganeura.Trainer(mine, lr=args.lr, trainable=lambda n: not frozen(n),
                                    executor=args.executor, fp32_products=args.fp32_products,
                                    cuda_graph=args.cuda_graph)
    trained = sum(mine.weights[n].numel() for n in trainer.names)
    held = [trainer]  # dropped (its optimizer state freed) before transformers is measured
    del trainer, mine
    def step():
        held[0].step(ids.cpu())
    step.trainer, step.ids = held[0], ids.cpu()
    yield "meganeura" + (" (CUDA graph)" if args.cuda_graph else "") + (
        " (recomputed products)" if again and work != "31b-lora" else ""), step, trained
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
    if args.hf_compile:
        yield "transformers + torch.compile", hf_step(torch.compile(model), params, ids,
                                                      args.lr), sum(p.numel() for p in params)
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


def seed_contenders(args, cfg, seq, device, dtype):
    """The seed model's forward, loss and backward (no optimizer step) on its random
    weights: meganeura's Trainer.gradients (fp32 gradients of every weight), then the same
    weights through benchmarks/torch_forward.py, eagerly (sliding layers by a dense band
    mask) and under torch.compile (FlexAttention), loss.backward() into bf16 gradients."""
    import torch.nn.functional as F
    from torch_forward import make_forward

    from meganeura.models.weights import random_weights

    weights = random_weights(cfg, 0, dtype, device)
    ids = torch.randint(0, cfg.vocab_size, (seq,), generator=torch.Generator().manual_seed(1))
    mine = meganeura.from_config(cfg, weights, device, dtype, cache_dir=args.cache_dir)
    held = [meganeura.Trainer(mine, lr=args.lr, executor=args.executor,
                              fp32_products=args.fp32_products, cuda_graph=args.cuda_graph)]
    trained = sum(w.numel() for w in weights.values())
    del mine

    def step():
        return held[0]._gradients(ids, None, keep=False)[0]  # (no copy of the gradients)
    step.trainer, step.ids = held[0], ids
    yield "meganeura" + (" (CUDA graph)" if args.cuda_graph else ""), step, trained
    held.clear()
    del step.trainer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if args.no_hf:
        return
    w = {n: t.requires_grad_(True) for n, t in weights.items()}
    dev_ids = ids.to(device)

    def torch_step(forward):
        def run():
            logits = forward(w, dev_ids)
            loss = F.cross_entropy(logits[:-1].float(), dev_ids[1:])
            loss.backward()
            for t in w.values():
                t.grad = None
            return loss.item()
        return run
    yield "torch eager", torch_step(make_forward(cfg, seq, device, "dense")), trained
    if device.type == "cuda":  # (its CPU lowering of FlexAttention is not what is measured)
        yield "torch.compile", torch_step(torch.compile(make_forward(cfg, seq, device, "flex"))), \
            trained


def docs_ids(vocab: int) -> torch.Tensor:
    """The project's own docs (README.md, docs/*.md) as token ids: their UTF-8 bytes (modulo
    the vocabulary, for a tiny one). A tokenizer-free text that every run has."""
    root = Path(__file__).resolve().parent.parent
    text = b"\n\n".join(p.read_bytes() for p in [root / "README.md",
                                                  *sorted((root / "docs").glob("*.md"))])
    return torch.tensor(list(text), dtype=torch.int64) % vocab


def run_curve(args, cfg, key, seq, device, dtype, base: dict) -> list[dict]:
    """--curve-steps AdamW steps on consecutive windows of docs_ids, every weight but the
    embeddings trained, from the same initial weights: meganeura (bf16), transformers
    (bf16) and transformers in fp32 (the reference). Each step's loss goes to --curve-csv;
    the summary rows give each bf16 run's loss gap to the fp32 run (relative, worst and
    median over the steps)."""
    text = docs_ids(cfg.vocab_size)
    starts = [(i * seq) % (text.numel() - seq) for i in range(args.curve_steps)]
    windows = [text[a:a + seq] for a in starts]
    config = hf_config(cfg, key) if not args.tiny else hf_config(cfg)
    model = hf_model(config, dtype, device, seed=0, init=args.init, cfg=cfg)
    first = {n: t.detach().cpu().clone() for n, t in model.state_dict().items()}
    losses = {}
    mine = meganeura.from_config(cfg, {n: t.clone() for n, t in shared_weights(model, cfg).items()},
                                 device, dtype)
    trainer = meganeura.Trainer(mine, lr=args.curve_lr, trainable=lambda n: not frozen(n),
                                executor=args.executor)
    losses["meganeura"] = [trainer.step(ids) for ids in windows]
    del trainer, mine
    if device.type == "cuda":
        torch.cuda.empty_cache()

    def hf_curve(m):
        m.train()
        for n, p in m.named_parameters():
            p.requires_grad_(not frozen(n))
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad],
                                lr=args.curve_lr, weight_decay=0.0)
        out = []
        for ids in windows:
            loss = m(input_ids=ids[None].to(device), labels=ids[None].to(device),
                     use_cache=False).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            out.append(loss.item())
        return out
    if not args.no_hf:
        losses["transformers"] = hf_curve(model)
        model.load_state_dict(first)
        ref = hf_fp32_copy(model)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
        losses["transformers fp32"] = hf_curve(ref)
        del ref
    curve = [{**base, "lr": args.curve_lr, "contender": who, "step": i, "loss": f"{v:.6f}"}
             for who, vs in losses.items() for i, v in enumerate(vs)]
    write_rows(Path(args.curve_csv), curve, CURVE_FIELDS)
    plot_curve(losses, base, Path(args.curve_plot))
    rows = []
    ref = losses.get("transformers fp32")
    for who in ("meganeura", "transformers"):
        if who not in losses:
            continue
        row = {"contender": who, "note": f"loss {losses[who][0]:.4f} -> {losses[who][-1]:.4f} "
                                         f"in {len(windows)} steps, lr {args.curve_lr}"}
        if ref is not None:
            gaps = [abs(a - b) / b for a, b in zip(losses[who], ref)]
            row.update(max_rel_error=f"{max(gaps):.3e}",
                       median_rel_error=f"{statistics.median(gaps):.3e}", tensors="")
        rows.append(row)
    if ref is not None and len(rows) == 2 and dtype != torch.float32:
        ours, theirs = (float(r["max_rel_error"]) for r in rows)
        print(f"curve: meganeura's worst step is {ours:.2e} from fp32, transformers' bf16 "
              f"{theirs:.2e}: {'within' if ours <= 1.5 * theirs else 'outside'} 1.5x of "
              f"transformers' own bf16 noise", flush=True)
    return rows


def plot_curve(losses: dict, base: dict, path: Path) -> None:
    from prefill import pyplot

    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for who, vs in losses.items():
        ax.plot(range(len(vs)), vs, label=who, linewidth=1)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(f"{base['model']}, {base['seq']} tokens a step, on the project's docs "
                 f"({base['gpu']}, {base['commit']})", fontsize=8)
    ax.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    print(f"curve plot: {path}", flush=True)


def plot_steps(rows: list[dict], path: Path) -> None:
    """Bars of each work's step time by contender (this run's rows)."""
    from prefill import pyplot

    timed = [r for r in rows if r.get("step_ms") not in (None, "")]
    if not timed:
        return
    plt = pyplot()
    if plt is None:
        return
    works = list(dict.fromkeys(r["work"] for r in timed))
    fig, axes = plt.subplots(1, len(works), figsize=(4 * len(works), 3.5), squeeze=False)
    for ax, work in zip(axes[0], works):
        mine = [r for r in timed if r["work"] == work]
        ax.bar(range(len(mine)), [float(r["step_ms"]) for r in mine])
        ax.set_xticks(range(len(mine)), [r["contender"] for r in mine], rotation=20,
                      fontsize=7)
        ax.set_title(f"{work} ({mine[0]['model']}, {mine[0]['seq']} tokens)", fontsize=8)
        ax.set_ylabel("ms a step")
    fig.suptitle(f"{timed[0]['gpu']}, {timed[0]['commit']}, {timed[0]['date']}", fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    print(f"plot: {path}", flush=True)


def run_work(args, work: str, rows: list) -> None:
    """Measures the work; each row is appended to `rows` as it is made."""
    key, seq, mode = WORKS[work]
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.tiny:  # the seed's own family for its work (graph-layout weights)
        key = "small_test" if mode == "grads" else key
        cfg = PRESETS["small_test"] if mode == "grads" else TINY
    else:
        cfg = PRESETS[key]
    seq = args.seq or (24 if args.tiny else seq)
    name = ("tiny" if args.tiny else key.replace("_", "-")) + (
        " unit-init" if args.init == "unit" else "")
    base = {**environment(), "work": work, "model": name, "seq": seq}
    if mode in ("check", "curve"):
        made = (check_gradients(args, cfg, key, seq, device, dtype) if mode == "check" else
                run_curve(args, cfg, key, seq, device, dtype, base))
        for row in made:
            print(f"{work}: {row}", flush=True)
            rows.append({**base, **row})
        return
    from meganeura.models import build

    flops = forward_flops(build(cfg, seq)) * PASSES[mode]
    peak = peak_flops(base["gpu"])
    made = (seed_contenders(args, cfg, seq, device, dtype) if mode == "grads" else
            contenders(args, work, cfg, key, seq, mode, device, dtype))
    for who, step, trained in made:
        limit = args.compile_limit if "torch.compile" in who else 0
        with deadline(limit) as alarm:
            try:
                r = measure(step, device, args.warmup, args.steps)
            except torch.cuda.OutOfMemoryError:
                r = {"note": "out of memory"}
                torch.cuda.empty_cache()
            except MeganeuraError as e:  # e.g. a plan that does not fit the device
                r = {"note": str(e).splitlines()[0][:300]}
            except Exception:  # noqa: BLE001 (the alarm, as torch.compile re-raised it)
                if not alarm.fired:
                    raise
                r = {}
        if alarm.fired:  # interrupted, or finished past its limit
            r = {"note": f"not compiled within {limit} s"}
            torch._dynamo.reset()
        if "step_ms" in r:
            r["tokens_per_s"] = round(seq / r["step_ms"] * 1e3, 1)
            r["model_tflop"] = f"{flops / 1e12:.4g}"
            if peak is not None:
                r["mfu"] = round(flops / (r["step_ms"] / 1e3) / peak, 4)
        if hasattr(step, "trainer") and r.get("peak_gib") != "" and "peak_gib" in r:
            # the plan's buffer arena (activations, gradients) stays allocated between
            # steps, where transformers frees its activations: it counts as the step's
            arena = sum(fn.buffer_bytes for _, _, fn in step.trainer._plans.values() if fn)
            r["peak_gib"] = round(r["peak_gib"] + arena / 2**30, 3)
        if args.breakdown and hasattr(step, "trainer"):
            breakdown(step.trainer, step.ids, device)
        row = {**base, "contender": who, "trained": trained, **r}
        print(f"{work}: {who}: " + ", ".join(f"{k} {row[k]}" for k in
                                            ("step_ms", "peak_gib", "tokens_per_s", "mfu",
                                             "first_step_s", "note")
                                            if row.get(k) not in (None, "")),
              flush=True)
        rows.append(row)
        if device.type == "cuda":
            torch.cuda.empty_cache()


def breakdown(trainer, ids, device, top: int = 25) -> None:
    """Where one step's time goes: the plan's run (gradients), the optimizer, the host
    work between; then the GPU kernels by total time (torch.profiler). The trained weights
    are put back afterwards: the contenders measured next share them (the seed's 4b's
    losses agree only so; its work takes no optimizer step, so its AdamW line includes the
    kernel's build)."""
    weights = trainer.model.weights
    kept = {n: weights[n].to("cpu", copy=True) for n in trainer.names}
    try:
        _breakdown(trainer, ids, device, top)
    finally:
        with torch.no_grad():
            for n, t in kept.items():
                weights[n].copy_(t)
        trainer._weights_changed()


def _breakdown(trainer, ids, device, top: int) -> None:
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
    ap.add_argument("--works", default="e4b-lora,e2b-full,4b,31b-lora,curve,check",
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
    ap.add_argument("--hf-compile", action="store_true",
                    help="also transformers under torch.compile (its compile takes minutes)")
    ap.add_argument("--compile-limit", type=int, default=600, help="seconds a torch.compile "
                    "contender may take to its timed steps, else its row says so (0: no limit)")
    ap.add_argument("--breakdown", action="store_true",
                    help="after meganeura's steps: one step's time by part, and its kernels")
    ap.add_argument("--init", choices=INITS, default="transformers",
                    help="random weights: transformers' own initialization, or meganeura's "
                    "random_weights (unit: activations keep their scale at any width)")
    ap.add_argument("--fp32-products", action="store_true",
                    help="meganeura's plans hold the forward products' outputs in fp32 "
                    "(Trainer(fp32_products=True))")
    ap.add_argument("--cuda-graph", action="store_true", help="meganeura's training plans "
                    "captured in CUDA graphs (Trainer(cuda_graph=True))")
    ap.add_argument("--recompute-products", action="store_true", help="LoRA works: every "
                    "GLU's gate and up computed again in the backward "
                    "(Trainer(recompute_products=True); 31b-lora always; its rows say so)")
    ap.add_argument("--cache-dir", default=None, help="meganeura's kernel cache (default: "
                    "its usual one); an empty directory makes first_step_s the compile from "
                    "an empty cache")
    ap.add_argument("--csv", default=str(RESULTS / "train.csv"))
    ap.add_argument("--plot", default=str(RESULTS / "train.png"),
                    help="bars of this run's step times")
    ap.add_argument("--curve-steps", type=int, default=200, help="steps of the curve work")
    ap.add_argument("--curve-lr", type=float, default=1e-4)
    ap.add_argument("--curve-csv", default=str(RESULTS / "train-curve.csv"))
    ap.add_argument("--curve-plot", default=str(RESULTS / "train-curve.png"))
    args = ap.parse_args(argv)
    works = args.works.split(",")
    bad = [w for w in works if w not in WORKS]
    if bad:
        ap.error(f"unknown work {bad[0]!r} (one of {', '.join(WORKS)})")
    print(f"# train {environment()}", flush=True)
    rows = []
    for work in works:
        made = []
        try:
            run_work(args, work, made)
        finally:  # each work's rows as it ends (those measured, if it fails)
            write_rows(Path(args.csv), made, FIELDS)
            rows += made
    plot_steps(rows, Path(args.plot))
    return 0


if __name__ == "__main__":
    sys.exit(main())
