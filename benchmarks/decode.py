"""Decode speed: time per generated token, batch 1, against transformers and the bandwidth floor.

    python benchmarks/decode.py --table                 # the decode targets, H200
    python benchmarks/decode.py --models gemma4-e4b --contexts 512 4096 32768 --no-hf-compiled
    python benchmarks/decode.py --model llama-3.1-8b --contexts 4096 --check

Per model and context length C, each system generates `--steps` tokens (greedy) after a
context of C tokens; the time of each step is taken between CUDA events recorded as the
steps are queued, and the row reports the median (the host reads every id, as a user's
loop does):
- meganeura: the decode plan of a session whose caches hold C + steps positions, driven as
  `generate` drives it (the next step queued before the host reads an id). The context's
  cache contents are random (attention time does not depend on the values);
- transformers eager: its model of the preset (Gemma4ForCausalLM, LlamaForCausalLM,
  Qwen3ForCausalLM; sdpa) with its dynamic cache after a prefill of C random tokens;
- transformers compiled: the same model's forward under torch.compile (reduce-overhead,
  fullgraph) over a static cache sized for the largest context of the run plus the steps,
  compiled once, prefilled eagerly, called step by step;
- with --hf-generate, transformers' own `generate` loop, each step marked by a logits
  processor: with its dynamic cache, and with `cache_implementation="static"` (for which
  transformers compiles the forward itself);
- the floor: bytes a step must read at the copy bandwidth measured at the start of the run
  (`timing.py`; 4.3 TB/s, the H200's, on the CPU): every weight the step's products read
  (of stacked experts, the k a token chooses), the embedding rows gathered, the valid cache
  rows each attention reads and the new K/V written.
Also: time to first token of meganeura for a 2048-token prompt (prefill, last row's logits,
first id, on the host) against transformers' compiled forward over the same prompt
keeping the last row's logits; and the compile time of meganeura's prefill and decode plans
with an empty kernel cache. Presets transformers has share its weight tensors; the seed
family has no transformers counterpart (its rows hold meganeura and the floor). --check
first generates 16 greedy tokens after a prompt (1000 tokens, or the largest context if
shorter) and compares each step's logits with transformers' model upcast to fp32 (the same
weights): the rows carry the worst step's relative error (bound 2e-2 in bf16). --layers N
runs the presets cut to their first N layers (the same widths: an fp32 copy of 26B-A4B's
layers does not fit beside the bf16 one).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hf_forward import INITS, cut_layers  # noqa: E402
from prefill import (_release, environment, pyplot, report_from_csv, save_figure,  # noqa: E402
                     write_rows)

import meganeura  # noqa: E402
from meganeura.compiler.ops import OPS  # noqa: E402
from meganeura.inference.generation import LateIds, SamplingParams, capacity_for, sample  # noqa: E402
from meganeura.models import MODEL_NAMES, PRESETS, build  # noqa: E402
from meganeura.models.kv import Generation  # noqa: E402
from meganeura.runtime.check import TOLERANCE  # noqa: E402
from timing import copy_bandwidth  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
BANDWIDTH = 4.3e12  # bytes/s, the H200's measured copy bandwidth (docs/design.md, cost)
CONTEXTS = [512, 1024, 2048, 4096, 8192, 16384, 32768]
TABLE = {"gemma4-4b": [4096], "gemma4-e4b": [4096, 32768], "gemma4-31b": [4096],
         "gemma4-26b-a4b": [4096]}
# the MoE's floor counts the k chosen experts' weights a token reads
TARGET_FLOOR = {"gemma4-4b": 1.2, "gemma4-e4b": 1.25, "gemma4-31b": 1.15, "gemma4-26b-a4b": 1.3}
TTFT_TARGET, COMPILE_TARGET_S = 0.9, 30.0


def floor_bytes(cfg, context: int, elem: int) -> float:
    """Bytes one decode step must move at context C: weights read by run-time nodes (each
    once; of stacked experts, the k chosen ones), gathered rows, valid cache rows read by
    attention, K/V rows written."""
    g = build(cfg, 1, Generation(capacity_for(cfg, context + 1), decode=True))
    memo: dict = {}
    weights, total = set(), 0.0

    def params_under(nid):
        n = g[nid]
        if n.op == "parameter":
            return [nid]
        if g.load_time(nid, memo):
            return [p for i in n.inputs for p in params_under(i)]
        return []

    for n in g.nodes:
        if OPS[n.op].kind != "compute" or g.load_time(n.id, memo):
            continue
        if OPS[n.op].archetype == "gather":
            total += elem * math.prod(n.shape)
            continue
        if n.op == "cache_attention":
            slots = g[n.inputs[1]].shape[0]
            valid = min(context + 1, n.attrs.get("window") or slots, slots)
            total += elem * valid * (g[n.inputs[1]].shape[1] + g[n.inputs[2]].shape[1])
        elif n.op == "cache_write":
            total += elem * math.prod(g[n.inputs[1]].shape)
        elif OPS[n.op].archetype == "experts" and n.op != "expert_combine":
            # only the chosen experts' rows: k of [experts, out, in] a token
            route, w = g[n.inputs[1]], g[n.inputs[2]]
            total += elem * route.shape[1] // 2 * w.shape[1] * w.shape[2]
            continue
        for i in n.inputs:
            weights.update(params_under(i))
    return total + elem * sum(math.prod(g[p].shape) for p in weights)


def mark_step(marks: list, cuda: bool) -> None:
    """A mark in the stream (a CUDA event) or, on the CPU, the host clock."""
    if cuda:
        marks.append(torch.cuda.Event(enable_timing=True))
        marks[-1].record()
    else:
        marks.append(time.perf_counter())


def median_gap(marks: list) -> float:
    """Median milliseconds between consecutive marks (mark_step's)."""
    if marks and isinstance(marks[0], float):
        return statistics.median((b - a) * 1e3 for a, b in zip(marks, marks[1:]))
    torch.cuda.synchronize()
    return statistics.median(a.elapsed_time(b) for a, b in zip(marks, marks[1:]))


def step_times(run_step, steps: int, warmup: int = 4) -> float:
    """Median ms per step: run_step() queues one step and returns its id on the device, which
    the host reads one step later as `generate` does (generation.LateIds: behind that step,
    not behind the one queued after it); CUDA events between the steps (the host clock on
    the CPU, where each step runs as it is called)."""
    cuda = torch.cuda.is_available()
    ids = LateIds(torch.device("cuda" if cuda else "cpu"))
    marks = []
    for i in range(warmup + steps + 1):
        ids.send(run_step())
        if i >= warmup:
            mark_step(marks, cuda)
        if i > 0:
            ids.take()
    ids.take()
    return median_gap(marks)


def print_profile(decode, step_ms: float, reps: int = 20) -> None:
    """Each launch of the decode step timed on its own (replayed `reps` times in a CUDA
    graph), summed by kernel variant and shape: where a step's time goes."""
    from prefill import kernel_times

    times = kernel_times(decode, True, reps)
    g = decode.plan.graph
    groups: dict = {}
    for launch in decode.launches:
        n = g[launch.node]
        key = (launch.spec.archetype, launch.spec.variant,
               " ".join(str(list(g[i].shape)) for i in n.inputs[:2]), str(launch.spec.grid))
        t, c = groups.get(key, (0.0, 0))
        groups[key] = (t + times[launch.node], c + 1)
    total = sum(times.values())
    print(f"  profile: {len(decode.launches)} launches, {total:.3f} ms one by one, "
          f"{step_ms:.3f} ms a step")
    for (arch, variant, shapes, grid), (t, c) in sorted(groups.items(), key=lambda x: -x[1][0]):
        print(f"  {t:8.3f} ms {c:4d}x {t / c * 1e3:8.2f} us  {arch:16} {variant:60} {shapes:26} "
              f"grid {grid}")


def graph_replay_ms(decode, reps: int = 50) -> float:
    """Median ms of the decode plan's CUDA graph replayed alone: no sampling, no input copies,
    no wait for the host."""
    decode._graph.replay()
    marks = []
    for _ in range(reps):
        mark_step(marks, True)
        decode._graph.replay()
    mark_step(marks, True)
    return median_gap(marks)


def meganeura_decode(model, context: int, steps: int, profile: bool = False,
                     warmup: int = 4) -> float:
    """Median ms per token of meganeura's decode plan after a context of `context` tokens."""
    gen = model.generator
    s = gen.session(context + steps + 8, floor=False)
    g = torch.Generator(device=model.device).manual_seed(context)
    for t in s.caches.values():  # a context's worth of keys and values (random rows)
        t.normal_(generator=g)
    decode = gen.decode_plan(s)
    positions = torch.arange(context, context + steps + 8, device=model.device)
    state = {"tok": torch.zeros(1, dtype=torch.int64, device=model.device), "i": 0}

    def run_step():
        i = min(state["i"], steps + 7)
        logits = decode.run_trusted(state["tok"], positions[i:i + 1])
        state["tok"] = sample(logits[-1], SamplingParams(), None)
        state["i"] += 1
        return state["tok"]

    ms = step_times(run_step, steps, warmup)
    if profile and torch.cuda.is_available():
        print_profile(decode, ms)
        print(f"  the step's graph replayed back to back: {graph_replay_ms(decode):.3f} ms "
              f"(a step: {ms:.3f} ms; the rest is sampling, input copies and the host)")
    gen.sessions.remove(s)
    gen.last_session = None
    _release(torch.cuda.is_available())
    return ms


def megakernel_check(model, context: int, steps: int) -> tuple[float, bool, float, float]:
    """The decode step as the persistent kernel (model.generator.megakernel programs) against
    its launches: `steps` greedy steps after the same prefill of `context` random tokens,
    the launches' tokens fed to both. Returns the worst relative error of a step's logits
    (to the launches' largest); whether a second run of the persistent kernel from the same
    caches gave the same bits; the same error of the launches with every kernel at the
    persistent kernel's warps against the launches (what the order of the sums alone
    moves); and of the persistent kernel against those (0: the same bits). Caches of
    N(0, 1) noise instead of a prefill's keys made e4b's logits move by 5.5e-2 of the
    largest between the launches and the same launches at other warps: an attention over
    noise amplifies the order of the sums."""
    gen = model.generator
    programs, gen.megakernel = gen.megakernel, None
    s = gen.session(context + steps + 8, floor=False)
    step = gen.decode_plan(s)
    g = torch.Generator().manual_seed(context)
    prompt = torch.randint(0, model.config.vocab_size, (context,), generator=g)
    chunks = gen.schedule(s, context)
    for rows in sorted({r for _, r in chunks}):  # each plan made (its first run writes the
        gen.chunk_plan(s, rows)  # caches) before the prompt is: as Generator._run does
    first = gen._prefill(s, prompt, chunks).argmax(-1, keepdim=True)
    start = {n: t.clone() for n, t in s.caches.items()}  # (after the plans' first runs)
    tokens, want = [first.to(torch.int64)], []
    for i in range(steps):
        logits = step.run_trusted(tokens[-1], torch.tensor([context + i], device=model.device))
        want.append(logits.float().clone())
        tokens.append(logits[-1].argmax(-1, keepdim=True))
    gen.megakernel = programs
    mk = gen._persistent(step)
    runs = []
    for _ in range(2):
        for n, t in s.caches.items():
            t.copy_(start[n])
        got = []
        for i in range(steps):
            step.load_inputs(tokens[i], torch.tensor([context + i], device=model.device))
            mk.run()
            got.append(step.outputs[0].float().clone())
        runs.append(got)
    from meganeura.codegen.megakernel import WARPS
    from meganeura.runtime.compiled import CompiledModel

    four = CompiledModel(step.plan, model.all_weights(), dataclasses.replace(
        step.target, warps=WARPS), step.cache, cuda_graph=False, state=s.caches)
    for n, t in s.caches.items():
        t.copy_(start[n])
    ordered = []
    for i in range(steps):
        ordered.append(four.run_trusted(tokens[i], torch.tensor(
            [context + i], device=model.device)).float().clone())

    def worst(xs, ys):
        return max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(xs, ys))

    same = all(torch.equal(a, b) for a, b in zip(*runs))
    gen.sessions.remove(s)
    gen.last_session = None
    return worst(runs[0], want), same, worst(ordered, want), worst(runs[0], ordered)


def hf_decode(hf, forward, cache, context: int, steps: int, vocab: int, device,
              warmup: int = 4) -> float:
    """Median ms per token of transformers' model: a prefill of `context` random tokens into
    `cache` (eager), then greedy steps through `forward`."""
    g = torch.Generator(device="cpu").manual_seed(context)
    ids = torch.randint(0, vocab, (1, context), generator=g).to(device)
    with torch.no_grad():
        out = hf(input_ids=ids, past_key_values=cache, use_cache=True,
                 cache_position=torch.arange(context, device=device), logits_to_keep=1)
        state = {"tok": out.logits[:, -1].argmax(-1, keepdim=True), "pos": context}
        del out

        def run_step():
            pos = torch.tensor([state["pos"]], device=device)
            o = forward(input_ids=state["tok"], past_key_values=cache, use_cache=True,
                        cache_position=pos)
            state["tok"] = o.logits[:, -1].argmax(-1, keepdim=True)
            state["pos"] += 1
            return state["tok"][0, 0]

        return step_times(run_step, steps, warmup)


def hf_generate_decode(hf, context: int, steps: int, vocab: int, device, static: bool,
                       warmup: int = 4) -> float:
    """Median ms per token inside transformers' own `generate` (greedy) after a prompt of
    `context` random tokens: a logits processor marks each step (a CUDA event, or the host
    clock on the CPU). static: `cache_implementation="static"`, for which transformers
    compiles the forward itself."""
    from transformers import LogitsProcessor

    cuda = device.type == "cuda"

    class Mark(LogitsProcessor):
        def __init__(self):
            self.marks = []

        def __call__(self, input_ids, scores):
            mark_step(self.marks, cuda)
            return scores

    g = torch.Generator(device="cpu").manual_seed(context)
    ids = torch.randint(0, vocab, (1, context), generator=g).to(device)
    mark = Mark()
    n = warmup + steps + 1
    kw = dict(cache_implementation="static") if static else {}
    with torch.no_grad():
        hf.generate(input_ids=ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                    logits_processor=[mark], **kw)
    return median_gap(mark.marks[warmup:])


def ttft(model, hf_compiled, cfg, device, reps: int = 5) -> dict:
    """Time to first token for a 2048-token prompt: meganeura's generate (host clock, the id
    on the host) and transformers' compiled forward keeping the last row (CUDA events)."""
    g = torch.Generator().manual_seed(7)
    prompt = torch.randint(0, cfg.vocab_size, (2048,), generator=g)
    out = {}
    times = []
    for _ in range(reps + 1):
        model.generator.generate(prompt, 1, SamplingParams(), stop=[])
        times.append(model.generator.last_stats["time_to_first_token_s"] * 1e3)
    out["meganeura_ttft_ms"] = statistics.median(times[1:])
    if hf_compiled is not None:
        ids = prompt[None].to(device)
        call = lambda: hf_compiled(input_ids=ids, use_cache=False, logits_to_keep=1)  # noqa: E731
        with torch.no_grad():
            t = time.perf_counter()
            call()
            torch.cuda.synchronize()
            out["hf_prefill_compile_s"] = time.perf_counter() - t
            ts = []
            for _ in range(reps + 2):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                call().logits.argmax(-1).item()
                b.record()
                b.synchronize()
                ts.append(a.elapsed_time(b))
        out["hf_compiled_prefill_ms"] = statistics.median(ts[2:])
    return out


def compile_seconds(cfg, weights, device, dtype) -> float:
    """Seconds to make the 2048-token prefill plan and the decode plan (kernels built, the
    decode graph captured) with an empty kernel cache."""
    with tempfile.TemporaryDirectory() as d:
        m = meganeura.from_config(cfg, weights, device, dtype, cache_dir=d)
        t = time.perf_counter()
        s = m.generator.session(2048 + 256, floor=False)
        m.generator.prefill_plan(s, 2048)
        m.generator.decode_plan(s)
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t
        del m, s
    _release(torch.cuda.is_available())
    return dt


def check_generation(model, hf, cfg, contexts: list[int], steps: int, device) -> float:
    """The worst relative error of 16 greedy steps' logits against transformers' fp32 model
    (see generate_check.py), after a prompt of 1000 tokens or the largest context."""
    from generate_check import step_errors

    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, cfg.vocab_size, (min(1000, max(contexts)),), generator=g)
    errs, _ = step_errors(model, hf, prompt, min(16, steps), device)
    model.generator.sessions.clear()
    model.generator.last_session = None
    _release(device.type == "cuda")
    return max(errs)


def run_model(args, name: str, cfg, contexts: list[int], device, dtype, env) -> list[dict]:
    from hf_forward import has_transformers

    hf = None
    if has_transformers(cfg):
        from hf_forward import hf_config, hf_model, shared_weights

        hf = hf_model(hf_config(cfg, MODEL_NAMES.get(name)), dtype, device, args.seed,
                      args.init, cfg)
        weights = shared_weights(hf, cfg)
    else:
        from meganeura.models.weights import random_weights

        weights = random_weights(cfg, args.seed, dtype, device)
    extra = {}
    if args.compile_time and name == "gemma4-e4b":
        extra["meganeura_compile_s"] = compile_seconds(cfg, weights, device, dtype)
        print(f"{name}: prefill (2048) + decode plans from an empty kernel cache "
              f"{extra['meganeura_compile_s']:.1f} s", flush=True)
    model = meganeura.from_config(cfg, weights, device, dtype, cache_dir=args.cache_dir)
    model.generator.dependent_launches = args.dependent_launches
    model.generator.megakernel = args.megakernel
    model.generator.megakernel_options = dict(registers=args.megakernel_registers,
                                              prefetch=args.megakernel_prefetch)
    if args.check and hf is not None:
        err = extra["rel_error_hf_fp32"] = check_generation(model, hf, cfg, contexts,
                                                            args.steps, device)
        bound = TOLERANCE[args.dtype]
        print(f"{name}: greedy steps vs transformers' fp32 model: worst relative error "
              f"{err:.2e} ({'ok' if err <= bound else 'FAIL'}, bound {bound})", flush=True)
    compiled, static = None, None
    if hf is not None and args.hf_compiled:
        from transformers import StaticCache

        static = StaticCache(config=hf.config, max_cache_len=max(contexts) + args.steps + 16)
        compiled = torch.compile(hf.forward, mode="reduce-overhead", fullgraph=True)
    rows = []
    for c in contexts:
        row = {"model": name, "context": c, "steps": args.steps, "dtype": args.dtype,
               "init": args.init if hf is not None else "unit",
               "floor_ms": floor_bytes(cfg, c, 2) / args.bandwidth * 1e3,
               "bandwidth_tbs": args.bandwidth / 1e12,
               "layers": cfg.num_hidden_layers, **extra}
        if args.megakernel is not None:  # (0: one program per SM)
            row["megakernel_programs"] = (args.megakernel or torch.cuda.get_device_properties(
                device).multi_processor_count) if device.type == "cuda" else 1
        if args.megakernel is not None and args.check:
            err, same, order, alike = megakernel_check(model, c, args.steps)
            bound = TOLERANCE[args.dtype]
            row["megakernel_rel_error"] = err
            row["megakernel_rel_error_same_warps"] = alike
            print(f"{name} C={c}: the persistent kernel's logits against its launches' over "
                  f"{args.steps} steps: worst {err:.2e} ({'ok' if err <= bound else 'FAIL'}, "
                  f"bound {bound}); a second run {'the same bits' if same else 'DIFFERS'}; "
                  f"the launches at its warps against the launches {order:.2e} (the sums' "
                  f"order alone), the persistent kernel against those {alike:.2e}"
                  + (" (the same bits)" if alike == 0 else ""), flush=True)
        row["meganeura_ms"] = meganeura_decode(model, c, args.steps, c in args.profile,
                                               args.warmup)
        print(f"{name} C={c}: meganeura {row['meganeura_ms']:.3f} ms/token, floor "
              f"{row['floor_ms']:.3f} ({row['meganeura_ms'] / row['floor_ms']:.2f}x)", flush=True)
        if hf is not None and args.hf_eager:
            from transformers import DynamicCache

            row["hf_eager_ms"] = hf_decode(hf, hf, DynamicCache(config=hf.config), c, args.steps,
                                           cfg.vocab_size, device, args.warmup)
            print(f"  transformers eager {row['hf_eager_ms']:.2f} ms/token", flush=True)
            _release(torch.cuda.is_available())
        if compiled is not None:
            static.reset()
            t = time.perf_counter()
            try:
                row["hf_compiled_ms"] = hf_decode(hf, compiled, static, c, args.steps,
                                                  cfg.vocab_size, device, args.warmup)
            except Exception as e:  # noqa: BLE001 - a baseline that fails is reported, not fatal
                print(f"  transformers static cache, compiled: failed: {type(e).__name__}: "
                      f"{str(e)[:300]}", flush=True)
                compiled = None
            else:
                row["hf_static_cache"] = static.max_cache_len
                if "hf_compile_s" not in extra:  # the first context's run holds the compile
                    extra["hf_compile_s"] = row["hf_compile_s"] = time.perf_counter() - t
                print(f"  transformers static cache, compiled {row['hf_compiled_ms']:.2f} "
                      f"ms/token", flush=True)
        if hf is not None and args.hf_generate:
            for key, static in (("hf_generate_ms", False), ("hf_generate_static_ms", True)):
                try:
                    row[key] = hf_generate_decode(hf, c, args.steps, cfg.vocab_size, device,
                                                  static, args.warmup)
                except Exception as e:  # noqa: BLE001 - a baseline that fails is reported
                    print(f"  transformers generate{' (static cache)' if static else ''}: "
                          f"failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
                    continue
                print(f"  transformers generate{', static cache (compiled by transformers)' if static else ''}"
                      f" {row[key]:.2f} ms/token", flush=True)
            _release(torch.cuda.is_available())
        rows.append(row)
        append_csv([row], env, Path(args.csv))
    if args.ttft and name in ("gemma4-e4b", "gemma4-small-test"):
        hf_prefill = torch.compile(hf) if hf is not None and args.hf_compiled else None
        try:
            t = ttft(model, hf_prefill, cfg, device)
        except Exception as e:  # noqa: BLE001
            print(f"{name}: transformers' compiled prefill failed: {type(e).__name__}: "
                  f"{str(e)[:300]}", flush=True)
            t = ttft(model, None, cfg, device)
        print(f"{name}: time to first token (2048 prompt) meganeura {t['meganeura_ttft_ms']:.2f} ms"
              + (f", transformers compiled prefill {t['hf_compiled_prefill_ms']:.2f} ms"
                 if "hf_compiled_prefill_ms" in t else ""), flush=True)
        for r in rows:
            if r["context"] == 4096:
                r.update(t)
        append_csv([{"model": name, "context": 2048, "steps": 0, "dtype": args.dtype, **t}], env,
                   Path(args.csv))
    del model, compiled, static, hf
    _release(torch.cuda.is_available())
    return rows



FIELDS = ["date", "gpu", "torch", "triton", "transformers", "meganeura", "commit", "model",
          "context", "steps", "dtype", "init", "meganeura_ms", "floor_ms", "hf_eager_ms",
          "hf_compiled_ms", "hf_static_cache", "hf_compile_s", "hf_generate_ms",
          "hf_generate_static_ms", "meganeura_ttft_ms",
          "hf_compiled_prefill_ms", "hf_prefill_compile_s", "meganeura_compile_s",
          "rel_error_hf_fp32", "layers", "bandwidth_tbs", "megakernel_programs",
          "megakernel_rel_error", "megakernel_rel_error_same_warps"]


def append_csv(rows: list[dict], env: dict, path: Path) -> None:
    write_rows(rows, env, path, FIELDS)


def rows_of(path: Path, commits: list[str]) -> list[dict]:
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if any(r["commit"].startswith(c) for c in commits)]
    for r in rows:
        for k in FIELDS[7:]:
            if k not in ("model", "dtype", "init") and r.get(k) not in (None, ""):
                r[k] = float(r[k]) if k not in ("context", "steps", "hf_static_cache") else int(r[k])
    return rows


def latest(rows: list[dict], key: str, model: str, where=lambda r: True) -> dict[int, float]:
    """context -> the value of `key` in the last row (CSV order: the newest) of `model` that
    has it and satisfies `where`."""
    out = {}
    for r in rows:
        if r["model"] == model and r.get("steps") and r.get(key) not in (None, "") and where(r):
            out[r["context"]] = r[key]
    return out


def series(rows: list[dict], key: str, model: str, where=lambda r: True) -> tuple[str, dict]:
    """One line of the plot: `key` over the contexts, all from the newest commit that
    measured it for `model` (lines from different commits are not joined), and that commit."""
    have = [r for r in rows if r["model"] == model and r.get("steps")
            and r.get(key) not in (None, "") and where(r)]
    if not have:
        return "", {}
    commit = have[-1]["commit"]
    return commit, latest(rows, key, model, lambda r: where(r) and r["commit"] == commit)


def print_targets(rows: list[dict]) -> None:
    def mark(ok):
        return "met" if ok else "MISSED"

    print("\n== targets (per-token time, batch 1)")
    for name, contexts in TABLE.items():
        ms, floor = latest(rows, "meganeura_ms", name), latest(rows, "floor_ms", name)
        for c in contexts:
            if c not in ms:
                print(f"{name} C={c}: not measured")
                continue
            ratio = ms[c] / floor[c]
            print(f"{name} C={c}: {ms[c]:.3f} ms, floor {floor[c]:.3f} ms, "
                  f"{ratio:.2f}x (target <= {TARGET_FLOOR[name]}x): {mark(ratio <= TARGET_FLOOR[name])}")
    t = next((r for r in reversed(rows) if r.get("meganeura_ttft_ms")
              and r.get("hf_compiled_prefill_ms")), None)
    if t:
        ratio = t["meganeura_ttft_ms"] / t["hf_compiled_prefill_ms"]
        print(f"gemma4-e4b time to first token (2048): {t['meganeura_ttft_ms']:.2f} ms vs "
              f"{t['hf_compiled_prefill_ms']:.2f} ms, {ratio:.3f}x (target <= {TTFT_TARGET}x): "
              f"{mark(ratio <= TTFT_TARGET)}")
    else:
        print("gemma4-e4b time to first token: not measured against transformers")
    c = next((r for r in reversed(rows) if r.get("meganeura_compile_s")), None)
    if c:
        print(f"gemma4-e4b compile (prefill + decode plans, empty cache): "
              f"{c['meganeura_compile_s']:.1f} s (target <= {COMPILE_TARGET_S:.0f} s): "
              f"{mark(c['meganeura_compile_s'] <= COMPILE_TARGET_S)}")
    else:
        print("gemma4-e4b compile time: not measured")


def plot(rows: list[dict], env: dict, path: Path) -> Path | None:
    """Per-token time against context length, one panel per model: each system and the floor."""
    plt = pyplot()
    if plt is None:
        return None
    models = [m for m in dict.fromkeys(r["model"] for r in rows if r.get("meganeura_ms"))]
    if not models:
        return None
    fig, axes = plt.subplots(1, len(models), figsize=(4.2 * len(models), 3.6), squeeze=False)
    lines = [("meganeura", "meganeura_ms", "o-"), ("transformers eager", "hf_eager_ms", "s--"),
              ("transformers generate", "hf_generate_ms", "P--"),
              ("transformers generate, static cache", "hf_generate_static_ms", "X--"),
              ("floor (bytes / 4.3 TB/s)", "floor_ms", "kx:")]
    for ax, m in zip(axes[0], models):
        for label, key, style in lines:
            commit, pts = series(rows, key, m)
            if pts:
                tag = "" if key == "floor_ms" else f" ({commit})"
                ax.plot(*zip(*sorted(pts.items())), style, label=label + tag, markersize=4)
        caches = sorted({r["hf_static_cache"] for r in rows if r["model"] == m
                         and r.get("hf_static_cache") not in (None, "")})
        for cache, style in zip(caches, ("^--", "v-.", "d--")):  # one line per static cache
            commit, pts = series(rows, "hf_compiled_ms", m,
                                 lambda r, c=cache: r.get("hf_static_cache") == c)
            if not pts:
                continue
            ax.plot(*zip(*sorted(pts.items())), style, markersize=5,
                    label=f"transformers + torch.compile, static cache of {cache} ({commit})")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel("ms per token (median)")
        ax.set_title(m, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"decode, batch 1, bf16: {env['gpu']}, torch {env['torch']}, triton "
                 f"{env['triton']}, {env['date']}", fontsize=8)
    return save_figure(fig, path)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", "--model", nargs="+", default=["gemma4-e4b"],
                    choices=sorted(MODEL_NAMES), help="presets measured at every --contexts")
    ap.add_argument("--contexts", type=int, nargs="+", default=CONTEXTS)
    ap.add_argument("--table", action="store_true", help="the decode targets: 4b and 31b at "
                    "4096, e4b at every --contexts (4096 and 32768 at least), time to first "
                    "token and compile time (overrides --models)")
    ap.add_argument("--steps", type=int, default=64, help="steps timed per context (>= 64 for "
                    "the targets)")
    ap.add_argument("--warmup", type=int, default=4, help="untimed steps before them, each "
                    "context and system")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--init", choices=INITS, default="transformers", help="presets "
                    "transformers has: its own initialization, or meganeura's random_weights "
                    "(N(0, 1/fan_in)) loaded into its model")
    ap.add_argument("--no-hf-eager", dest="hf_eager", action="store_false")
    ap.add_argument("--no-hf-compiled", dest="hf_compiled", action="store_false",
                    help="skip transformers under torch.compile (its compile takes minutes)")
    ap.add_argument("--hf-generate", action="store_true", help="also time transformers' own "
                    "generate loop (dynamic cache, and static cache with the forward it compiles)")
    ap.add_argument("--no-ttft", dest="ttft", action="store_false")
    ap.add_argument("--no-compile-time", dest="compile_time", action="store_false")
    ap.add_argument("--no-dependent-launches", dest="dependent_launches", action="store_false",
                    help="launch the decode step's kernels plainly (not as programmatic "
                    "dependents of the kernel before)")
    ap.add_argument("--megakernel", type=int, default=None, metavar="P",
                    help="meganeura's decode step as one persistent kernel of P programs "
                         "(0: one per SM; codegen/megakernel.py) instead of its launches")
    ap.add_argument("--megakernel-registers", type=int, default=None, metavar="R",
                    help="with --megakernel: at most R registers a thread (more programs an SM)")
    ap.add_argument("--megakernel-prefetch", type=int, default=0, metavar="BYTES",
                    help="with --megakernel: bytes of its weights each task asks L2 for "
                         "before it waits")
    ap.add_argument("--profile", type=int, nargs="*", default=[], metavar="CONTEXT",
                    help="at these contexts, also time every kernel of the step on its own")
    ap.add_argument("--layers", type=int, default=None, help="the presets cut to their first N "
                    "layers (same widths; e.g. for --check of a model whose fp32 copy does "
                    "not fit)")
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--csv", default=str(RESULTS / "decode.csv"))
    ap.add_argument("--plot", default=str(RESULTS / "decode.png"))
    ap.add_argument("--from-csv", metavar="COMMIT", nargs="+", default=None,
                    help="no runs: the targets and the plot from the --csv rows of these commits")
    ap.add_argument("--check", action="store_true", help="presets transformers has: greedy "
                    "steps' logits against its model upcast to fp32 (needs 4 bytes a weight)")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.from_csv:
        return report_from_csv(args, rows_of(Path(args.csv), args.from_csv), print_targets,
                               plot)
    device, dtype = run_device(args)
    env = environment()
    try:
        import transformers
        env["transformers"] = transformers.__version__
    except ImportError:
        env["transformers"] = ""
        args.hf_eager = args.hf_compiled = False
    print(f"# decode benchmark {env}", flush=True)
    args.bandwidth = copy_bandwidth() if device.type == "cuda" else BANDWIDTH
    print(f"# copy bandwidth {args.bandwidth / 1e12:.3f} TB/s"
          f"{' (measured)' if device.type == 'cuda' else ' (the H200s, no GPU here)'}",
          flush=True)
    plan = {m: sorted(set(args.contexts)) for m in args.models}
    if args.table:
        plan = {m: sorted(set(c) | (set(args.contexts) if m == "gemma4-e4b" else set()))
                for m, c in TABLE.items()}
    rows = []
    for name, contexts in plan.items():
        cfg = cut_layers(PRESETS[MODEL_NAMES[name]], MODEL_NAMES[name], args.layers)
        rows += run_model(args, name, cfg, contexts, device, dtype, env)
    print_targets(rows)
    if args.plot:
        p = plot([{**env, **r} for r in rows], env, Path(args.plot))
        if p:
            print(f"wrote {p}")
    bad = [r for r in rows if r.get("rel_error_hf_fp32", 0) > TOLERANCE[args.dtype]]
    return 1 if bad else 0


def run_device(args) -> tuple[torch.device, torch.dtype]:
    """CUDA in bf16; else the script itself through Triton's interpreter: fp32, the host's clock."""
    if torch.cuda.is_available():
        args.dtype = "bf16"
        return torch.device("cuda"), torch.bfloat16
    args.dtype = "fp32"
    return torch.device("cpu"), torch.float32


if __name__ == "__main__":
    sys.exit(main())
