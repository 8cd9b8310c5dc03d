"""Prefill benchmark: meganeura against PyTorch eager and torch.compile, in one process.

    python benchmarks/prefill.py --model gemma4-4b --seq-len 2048 8192 [--check]
    python benchmarks/prefill.py --model gemma4-e4b --check --hf-fp32
    python benchmarks/prefill.py --table --check      # every configuration of the targets

    python benchmarks/prefill.py --models llama-3.2-1b llama-3.1-8b qwen3-8b --check --hf-fp32

The seed's presets run against a plain PyTorch forward of the same graph
(`torch_forward.py`: eager with the sliding-window layers through a dense band mask,
torch.compile with FlexAttention and a sliding-window block mask; --dense-baseline adds
torch.compile of the dense form as a second row); the presets of the published families
(gemma4-e2b, -e4b, -31b, llama-3.2-1b, llama-3.1-8b, qwen3-8b) against transformers' own
model (`hf_forward.py`, sdpa), eager and under torch.compile, meganeura reading that model's
very tensors. Same weights and token ids for all three; CUDA events, warm-up, median of
--iters.
Prints a table (ms, ratios, TFLOP/s, peak memory, compile times), the estimated vs
measured time of the most expensive kernels, and appends rows tagged with GPU,
versions, commit and date to benchmarks/results/prefill.csv. --check compares the
compiled logits with the fp32 reference executor (relative error, bound 2e-2 in bf16);
--hf-fp32 (presets transformers has) also with transformers' model upcast to fp32.
--regimes times meganeura and torch.compile interleaved from idle (a single request) and
sustained (back to back, at the power cap), with the energy of a forward.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

# a cold compile means cold caches: Triton's too (read when it compiles, set before import)
os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="meganeura-triton-"))

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hf_forward import INITS, cut_layers, has_transformers  # noqa: E402
from torch_forward import make_forward  # noqa: E402

import meganeura  # noqa: E402
import triton  # noqa: E402
from meganeura.models import MODEL_NAMES, PRESETS, build  # noqa: E402
from meganeura.models.weights import random_weights  # noqa: E402
from meganeura.runtime.check import TOLERANCE, relative_error  # noqa: E402
from meganeura.runtime.reference import run_reference  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
TABLE = [("gemma4-4b", 2048), ("gemma4-4b", 8192), ("gemma4-12b", 2048), ("gemma4-27b", 2048),
         ("gemma4-e4b", 2048), ("gemma4-31b", 2048), ("gemma4-26b-a4b", 2048)]
# targets of the second prefill round: time ratio to the strongest torch.compile baseline
# (the seed's sliding-window layers through FlexAttention; transformers' model for the
# published presets), in both regimes where --regimes measured them, and the share of the
# FLOP floor for 4b at 2048
TARGET_RATIO = {("gemma4-4b", 2048): 0.90, ("gemma4-4b", 8192): 0.85, ("gemma4-12b", 2048): 0.95,
                ("gemma4-27b", 2048): 0.95, ("gemma4-e4b", 2048): 0.85, ("gemma4-31b", 2048): 0.85,
                ("gemma4-26b-a4b", 2048): 0.5}


def timed(fn, warmup: int, iters: int, cuda: bool) -> float:
    """Median milliseconds of fn() over iters, after warmup calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def peak_during(fn, cuda: bool) -> float:
    """GiB allocated at the peak of one call, above what was allocated before it."""
    if not cuda:
        return float("nan")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**30


def _allocated(cuda: bool) -> int:
    if not cuda:
        return 0
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


def _peak_above(base: int, cuda: bool) -> float:
    """GiB at the peak since the last _allocated(), above `base` (the shared weights)."""
    if not cuda:
        return float("nan")
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**30


def _since(t: float, cuda: bool) -> float:
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t


def _release(cuda: bool) -> None:
    import gc

    gc.collect()
    if cuda:
        torch.cuda.empty_cache()


class Energy:
    """The GPU's total-energy counter (NVML, millijoules since the driver loaded), read
    through libnvidia-ml directly; `joules()` is None where there is no NVML or no counter."""

    def __init__(self):
        self._lib = self._dev = None
        try:
            import ctypes

            lib = ctypes.CDLL("libnvidia-ml.so.1")
            dev = ctypes.c_void_p()
            index = torch.cuda.current_device() if torch.cuda.is_available() else 0
            if lib.nvmlInit_v2() == 0 and lib.nvmlDeviceGetHandleByIndex_v2(
                    index, ctypes.byref(dev)) == 0:
                self._lib, self._dev = lib, dev
        except (OSError, AttributeError):
            pass

    def joules(self) -> float | None:
        if self._lib is None:
            return None
        import ctypes

        mj = ctypes.c_ulonglong()
        if self._lib.nvmlDeviceGetTotalEnergyConsumption(self._dev, ctypes.byref(mj)) != 0:
            return None
        return mj.value / 1e3


def regimes(contenders: dict, rounds: int, cuda: bool, idle_s: float = 0.25,
            block: int = 8) -> dict:
    """Each contender in two regimes, interleaved (A, B, A, B ...) so that drift in clocks
    and temperature falls on both alike:
    - from idle: one call after `idle_s` of idle (the latency of a single request);
    - sustained: blocks of `block` calls back to back, the board at its power cap;
    and the energy per forward of the sustained blocks. Fields <name>_idle_ms,
    <name>_sustained_ms (medians) and <name>_j (joules a forward; absent without NVML)."""
    energy = Energy() if cuda else None
    idle = {n: [] for n in contenders}
    sustained = {n: [] for n in contenders}
    joules = {n: [] for n in contenders}

    def one(fn) -> float:
        if not cuda:
            t = time.perf_counter()
            fn()
            return (time.perf_counter() - t) * 1e3
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        return a.elapsed_time(b)

    for _ in range(rounds):
        for name, fn in contenders.items():
            if cuda:
                torch.cuda.synchronize()
            time.sleep(idle_s)
            idle[name].append(one(fn))
    for n, fn in contenders.items():  # the board up to its sustained state
        for _ in range(block):
            fn()
    for _ in range(rounds):
        for name, fn in contenders.items():
            if cuda:
                torch.cuda.synchronize()
            e0 = energy.joules() if energy else None
            sustained[name] += [one(fn) for _ in range(block)]
            e1 = energy.joules() if energy else None
            if e0 is not None and e1 is not None:
                joules[name].append((e1 - e0) / block)
    out = {}
    for n in contenders:
        out[f"{n}_idle_ms"] = statistics.median(idle[n])
        out[f"{n}_sustained_ms"] = statistics.median(sustained[n])
        if joules[n]:
            out[f"{n}_j"] = statistics.median(joules[n])
    return out


def model_flops(graph) -> float:
    """Matmul FLOPs of one forward: every product (projections, lm_head) and the attention
    pairs the causal and sliding-window masks allow."""
    from meganeura.compiler.cost import attention_pairs
    from meganeura.compiler.ops import OPS

    total = 0.0
    for n in graph.nodes:
        work = OPS[n.op].archetype  # a product, fused or not, or attention
        if work == "product":
            (m, k), cols = graph[n.inputs[0]].shape, graph[n.inputs[1]].shape[1]
            total += 2 * m * k * cols
        elif work == "attention":
            a = n.attrs
            total += 4 * a["num_heads"] * a["head_dim"] * attention_pairs(n.shape[0], a.get("window"))
    return total


def kernel_times(model, cuda: bool, reps: int, inputs: tuple = ()) -> dict[int, float]:
    """Measured ms of each launch on its own; on CUDA, `reps` launches replayed as one graph
    (so the host's launch overhead, which the model's own graph replay also avoids, is out).
    inputs: copied in before each launch (a forward's token ids share the arena with buffers
    that later launches write)."""
    out = {}
    for i, launch in enumerate(model.launches):
        if inputs:
            model.load_inputs(*inputs)
        if launch.spec.archetype == "experts":  # its work depends on the routes: the
            # launches before it run first, so it reads this forward's routes, not a buffer
            # that a later launch has since reused
            for before in model.launches[:i]:
                before.run()
        out[launch.node] = graph_time(launch.run, reps) if cuda else timed(launch.run, 1, reps,
                                                                                False)
    return out


def graph_time(fn, reps: int) -> float:
    """Milliseconds of one fn() call: `reps` calls captured in a CUDA graph, replayed."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


def run_one(args, name: str, seq: int, device, dtype) -> dict:
    cfg = cut_layers(PRESETS[MODEL_NAMES[name]], MODEL_NAMES[name], args.layers)
    if has_transformers(cfg):
        return run_published(args, name, cfg, seq, device, dtype)
    cuda = device.type == "cuda"
    graph = build(cfg, seq)
    weights = random_weights(cfg, args.seed, dtype, device)
    gen = torch.Generator(device="cpu").manual_seed(args.seed + seq)
    ids = torch.randint(0, cfg.vocab_size, (seq,), generator=gen).to(device)
    row = {"model": name, "seq": seq, "dtype": args.dtype, "init": "unit"}

    # cold: empty meganeura and Triton caches; warm: the same compile again
    fn = compile_timed(row, graph, weights, ids, device, dtype, args.cache_dir, cuda)
    if args.check:  # fp32 reference on the same weights, upcast one parameter at a time
        logits = fn(ids).float()
        (ref,) = run_reference(graph, weights, {"token_ids": ids}, torch.float32, device)
        row["rel_error"] = relative_error(logits, ref)
        del ref, logits
        _release(cuda)
    row["meganeura_ms"] = timed(lambda: fn(ids, copy=False), args.warmup, args.iters, cuda)

    # eager: sliding-window layers through a dense band mask (FlexAttention without
    # torch.compile materializes every score); torch.compile: FlexAttention's block mask
    forward = make_forward(cfg, seq, device, "dense")
    if args.check:  # how far plain bf16 PyTorch lands from fp32: the scale of bf16 error
        with torch.no_grad():
            eager_logits = forward(weights, ids).float()
            (ref,) = run_reference(graph, weights, {"token_ids": ids}, torch.float32, device)
            row["eager_rel_error"] = relative_error(eager_logits, ref)
            del eager_logits, ref
            _release(cuda)
    with torch.no_grad():
        row["eager_ms"] = timed(lambda: forward(weights, ids), args.warmup, args.iters, cuda)
        row["eager_peak_gib"] = peak_during(lambda: forward(weights, ids), cuda)
        if args.torch_compile:
            compiled = torch.compile(make_forward(cfg, seq, device, "flex"))
            _release(cuda)
            base = _allocated(cuda)
            t = time.perf_counter()
            compiled(weights, ids)
            row["torch_compile_s"] = _since(t, cuda)
            row["torch_compile_first_peak_gib"] = _peak_above(base, cuda)
            call = lambda: compiled(weights, ids)  # noqa: E731
            row["torch_compile_ms"] = timed(call, args.warmup, args.iters, cuda)
            row["torch_compile_peak_gib"] = peak_during(call, cuda)
            if args.regimes:
                row.update(regimes({"meganeura": lambda: fn(ids, copy=False), "torch_compile": call},
                                   args.regime_rounds, cuda))
            if args.dense_baseline and cfg.sliding_window_size < seq:
                dense = torch.compile(forward)
                row["torch_compile_dense_ms"] = timed(lambda: dense(weights, ids), args.warmup,
                                                      args.iters, cuda)
                del dense
    return finish_row(args, row, fn, graph, cuda, ids)


def finish_row(args, row: dict, fn, graph, cuda: bool, ids) -> dict:
    """FLOP rate and floor, and each kernel's measured time beside its estimate."""
    row["tflops"] = model_flops(graph) / (row["meganeura_ms"] * 1e-3) / 1e12
    row["floor_ms"] = model_flops(graph) / 790e12 * 1e3
    measured = kernel_times(fn, cuda, args.kernel_reps, (ids,))
    plan = fn.report.plan
    top = sorted(measured, key=lambda i: -measured[i])[:10]
    row["kernels"] = [(plan.graph[i].op, list(plan.graph[i].shape), plan.estimate[i] * 1e3,
                       measured[i]) for i in top]
    row["kernel_sum_ms"] = sum(measured.values())
    by_op: dict[str, list[float]] = {}
    for i, ms in measured.items():
        est_ms = plan.estimate[i] * 1e3
        acc = by_op.setdefault(plan.graph[i].op, [0, 0.0, 0.0])
        acc[0] += 1
        acc[1] += est_ms
        acc[2] += ms
    row["by_op"] = by_op
    row["launches"] = len(fn.launches)
    return row


def compile_timed(row: dict, graph, weights, ids, device, dtype, cache_dir, cuda: bool):
    """meganeura cold (empty caches) then warm; the compiled model of the warm compile."""
    if not cache_dir:  # Triton's on-disk cache too: each configuration compiles cold
        os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="meganeura-triton-")
    cache_dir = cache_dir or tempfile.mkdtemp(prefix="meganeura-kernels-")
    base = _allocated(cuda)
    t = time.perf_counter()
    fn = meganeura.compile(graph, weights, device, dtype, cache_dir=cache_dir)
    fn(ids, copy=False)
    row["meganeura_compile_s"] = _since(t, cuda)
    row["meganeura_peak_gib"] = _peak_above(base, cuda)
    row["meganeura_resident_gib"] = (_allocated(cuda) - base) / 2**30
    del fn
    _release(cuda)
    t = time.perf_counter()
    fn = meganeura.compile(graph, weights, device, dtype, cache_dir=cache_dir)
    fn(ids, copy=False)
    row["meganeura_warm_compile_s"] = _since(t, cuda)
    return fn


def run_published(args, name: str, cfg, seq: int, device, dtype) -> dict:
    """A model transformers has (the published Gemma-4, Llama, Qwen3) against transformers'
    model (eager and torch.compile), meganeura reading the same weight tensors."""
    from hf_forward import hf_config, hf_fp32_copy, hf_logits, hf_model, shared_weights

    cuda = device.type == "cuda"
    model = hf_model(hf_config(cfg, MODEL_NAMES.get(name)), dtype, device, args.seed,
                     args.init, cfg)
    weights = shared_weights(model, cfg)
    graph = build(cfg, seq)
    gen = torch.Generator(device="cpu").manual_seed(args.seed + seq)
    ids = torch.randint(0, cfg.vocab_size, (seq,), generator=gen).to(device)
    row = {"model": name, "seq": seq, "dtype": args.dtype, "init": args.init,
           "layers": cfg.num_hidden_layers}
    fn = compile_timed(row, graph, weights, ids, device, dtype, args.cache_dir, cuda)
    if args.check:
        logits = fn(ids).float()
        (ref,) = run_reference(graph, weights, {"token_ids": ids}, torch.float32, device)
        row["rel_error"] = relative_error(logits, ref)
        row["eager_rel_error"] = relative_error(hf_logits(model, ids).float(), ref)
        if args.hf_fp32:  # transformers' own fp32 model of the same weights
            ref_model = hf_fp32_copy(model)
            hf32 = hf_logits(ref_model, ids).float()
            del ref_model
            row["rel_error_hf_fp32"] = relative_error(logits, hf32)
            row["reference_vs_hf_fp32"] = relative_error(ref, hf32)
            del hf32
        del logits, ref
        _release(cuda)
    row["meganeura_ms"] = timed(lambda: fn(ids, copy=False), args.warmup, args.iters, cuda)
    with torch.no_grad():
        forward = lambda: model(input_ids=ids[None], use_cache=False)  # noqa: E731
        row["eager_ms"] = timed(forward, args.warmup, args.iters, cuda)
        row["eager_peak_gib"] = peak_during(forward, cuda)
        if args.torch_compile:
            compiled = torch.compile(model)
            _release(cuda)
            base = _allocated(cuda)
            t = time.perf_counter()
            compiled(input_ids=ids[None], use_cache=False)
            row["torch_compile_s"] = _since(t, cuda)
            row["torch_compile_first_peak_gib"] = _peak_above(base, cuda)
            call = lambda: compiled(input_ids=ids[None], use_cache=False)  # noqa: E731
            row["torch_compile_ms"] = timed(call, args.warmup, args.iters, cuda)
            row["torch_compile_peak_gib"] = peak_during(call, cuda)
            if args.regimes:
                row.update(regimes({"meganeura": lambda: fn(ids, copy=False), "torch_compile": call},
                                   args.regime_rounds, cuda))
            del compiled
    return finish_row(args, row, fn, graph, cuda, ids)


def print_row(r: dict) -> None:
    tc = r.get("torch_compile_ms")
    print(f"\n== {r['model']} seq {r['seq']} {r['dtype']}: {r['launches']} launches")
    print(f"  meganeura      {r['meganeura_ms']:9.2f} ms  {r['tflops']:6.1f} TFLOP/s  "
          f"compile {r['meganeura_compile_s']:.1f} s (warm cache {r['meganeura_warm_compile_s']:.1f}"
          f" s)  memory above the weights: peak {r['meganeura_peak_gib']:.2f} GiB, resident "
          f"{r['meganeura_resident_gib']:.2f} GiB")
    print(f"  eager          {r['eager_ms']:9.2f} ms  ratio {r['meganeura_ms'] / r['eager_ms']:.3f}"
          f"  peak +{r['eager_peak_gib']:.2f} GiB")
    if tc:
        print(f"  torch.compile  {tc:9.2f} ms  ratio {r['meganeura_ms'] / tc:.3f}  compile "
              f"{r['torch_compile_s']:.1f} s  memory above the weights: peak "
              f"{r['torch_compile_first_peak_gib']:.2f} GiB (compile + first call), "
              f"{r['torch_compile_peak_gib']:.2f} GiB (a call)")
    if r.get("torch_compile_dense_ms"):
        print(f"  torch.compile, sliding layers through a dense mask  "
              f"{r['torch_compile_dense_ms']:9.2f} ms")
    if r.get("meganeura_idle_ms"):
        for regime in ("idle", "sustained"):
            m, t = r[f"meganeura_{regime}_ms"], r[f"torch_compile_{regime}_ms"]
            print(f"  {'from idle' if regime == 'idle' else 'sustained':9}      meganeura {m:.2f} ms,"
                  f" torch.compile {t:.2f} ms, ratio {m / t:.3f} (interleaved)")
        if r.get("meganeura_j"):
            print(f"  energy a forward (sustained): meganeura {r['meganeura_j']:.2f} J, "
                  f"torch.compile {r['torch_compile_j']:.2f} J")
    print(f"  FLOP floor     {r['floor_ms']:9.2f} ms  ({r['floor_ms'] / r['meganeura_ms']:.0%} of "
          f"it reached)")
    if r.get("rel_error") is not None:
        ok = "ok" if r["rel_error"] <= TOLERANCE["bf16"] else "FAIL"
        print(f"  relative error vs fp32 reference: {r['rel_error']:.2e} ({ok}); eager bf16 "
              f"baseline: {r.get('eager_rel_error', float('nan')):.2e}")
    if r.get("rel_error_hf_fp32") is not None:
        print(f"  relative error vs transformers' fp32 model: {r['rel_error_hf_fp32']:.2e}; the fp32 "
              f"reference executor vs transformers' fp32 model: {r['reference_vs_hf_fp32']:.2e}")
    print(f"  kernels one by one: {r['kernel_sum_ms']:.2f} ms; ten most expensive "
          f"(estimated vs measured):")
    print("  by kernel kind: " + ", ".join(f"{op} x{n} {meas:.2f} ms (est {est:.2f})" for op, (
        n, est, meas) in sorted(r["by_op"].items(), key=lambda kv: -kv[1][2])))
    for op, shape, est, meas in r["kernels"]:
        print(f"    {op:26} {str(shape):16} est {est:8.3f} ms  meas {meas:8.3f} ms  "
              f"({meas / est:5.2f}x)")


def print_targets(rows: list[dict]) -> None:
    """One line per configuration: each target of the table, measured, met or missed."""
    def mark(ok):
        return "met" if ok else "MISSED"

    print("\n== targets (ratio = meganeura / torch.compile, same process)")
    for r in rows:
        key = (r["model"], int(r["seq"]))
        tc = _num(r.get("torch_compile_ms"))
        ms = _num(r["meganeura_ms"])
        parts = [f"{r['model']} {r['seq']}: {ms:.2f} ms vs {tc:.2f} ms"]
        if key in TARGET_RATIO:
            want = TARGET_RATIO[key]
            parts.append(f"ratio {ms / tc:.3f} (<= {want}: {mark(ms / tc <= want)})")
            for regime in ("idle", "sustained"):
                m, t = _num(r.get(f"meganeura_{regime}_ms")), _num(r.get(f"torch_compile_{regime}_ms"))
                if m == m and t == t:  # measured (not NaN)
                    parts.append(f"{regime} {m / t:.3f} ({mark(m / t <= want)})")
        idle = _num(r.get("meganeura_idle_ms"))  # the target's floor is reached from idle
        floor = _num(r["floor_ms"]) / (idle if idle == idle else ms)
        parts.append(f"floor {floor:.1%} {'from idle' if idle == idle else 'at the median'}"
                     + (f" (>= 80%: {mark(floor >= 0.8 and idle == idle)})"
                        if key == ("gemma4-4b", 2048) else ""))
        if r["model"] == "gemma4-4b":
            cold, warm = _num(r["meganeura_compile_s"]), _num(r["meganeura_warm_compile_s"])
            parts.append(f"compile {cold:.1f} s (<= 30: {mark(cold <= 30)}), warm {warm:.1f} s "
                         f"(<= 5: {mark(warm <= 5)})")
        peak, tpeak = _num(r["meganeura_peak_gib"]), _num(r.get("torch_compile_first_peak_gib"))
        over = (peak - tpeak) * 2**30
        parts.append(f"peak {peak:.4f} vs {tpeak:.4f} GiB ({mark(peak <= tpeak)}"
                     + (f" by {over / 1024:.1f} KiB" if over > 0 else "") + ")")
        if r.get("rel_error") not in (None, ""):
            err = _num(r["rel_error"])
            parts.append(f"rel. error {err:.1e} ({mark(err <= TOLERANCE['bf16'])})")
        print("  " + "; ".join(parts))


def _num(x) -> float:
    return float("nan") if x in (None, "") else float(x)


def rows_of(csv_path: Path, commits: list[str]) -> list[dict]:
    """The rows runs at `commits` appended (the last per configuration), in table order."""
    with open(csv_path, newline="") as f:
        latest = {(r["model"], r["seq"]): r for r in csv.DictReader(f) if r["commit"] in commits}
    rows = list(latest.values())
    for r in rows:
        for k, v in r.items():
            if k.endswith(("_ms", "_s", "_gib", "error", "_j")) and v not in (None, ""):
                r[k] = float(v)
    order = {k: i for i, k in enumerate(TABLE)}
    return sorted(rows, key=lambda r: order.get((r["model"], int(r["seq"])), 99))


def environment() -> dict:
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor()
    return {"date": datetime.date.today().isoformat(), "gpu": gpu, "torch": torch.__version__,
            "triton": triton.__version__, "meganeura": meganeura.__version__,
            "commit": os.environ.get("MEGANEURA_COMMIT", "unknown")}


FIELDS = ["date", "gpu", "torch", "triton", "meganeura", "commit", "model", "seq", "dtype",
          "init", "meganeura_ms", "eager_ms", "torch_compile_ms", "tflops", "floor_ms",
          "meganeura_compile_s", "torch_compile_s", "meganeura_peak_gib", "eager_peak_gib",
          "torch_compile_peak_gib", "rel_error", "eager_rel_error", "launches",
          "meganeura_warm_compile_s", "meganeura_resident_gib", "torch_compile_first_peak_gib",
          "rel_error_hf_fp32", "reference_vs_hf_fp32", "torch_compile_dense_ms",
          "meganeura_idle_ms", "torch_compile_idle_ms", "meganeura_sustained_ms",
          "torch_compile_sustained_ms", "meganeura_j", "torch_compile_j", "layers"]


def append_csv(rows: list[dict], env: dict, path: Path) -> None:
    write_rows(rows, env, path, FIELDS)


def write_rows(rows: list[dict], env: dict, path: Path, fields: list[str]) -> None:
    """Appends rows (tagged with env) to the CSV at path, earlier rows kept under the current
    header; floats to 4 significant digits (memory in GiB to 11: a byte shows below 100 GiB)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    old = []
    if path.exists():  # keep earlier rows, under the current header
        with open(path, newline="") as f:
            old = list(csv.DictReader(f))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(old)
        for r in rows:
            w.writerow({**env, **{k: (f"{v:.11g}" if k.endswith("_gib") else f"{v:.4g}")
                                  if isinstance(v, float) else v for k, v in r.items()}})


def pyplot():
    """matplotlib's pyplot without a display, or None (and a line saying so) without it."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return None
    return plt


def plot(rows: list[dict], env: dict, path: Path) -> Path | None:
    """Bar chart of ms per configuration: meganeura, eager, torch.compile."""
    plt = pyplot()
    if plt is None:
        return None
    labels = [f"{r['model']}\nseq {r['seq']}" for r in rows]
    series = [("meganeura", "meganeura_ms"), ("eager (PyTorch / transformers)", "eager_ms"),
              ("torch.compile", "torch_compile_ms")]
    fig, ax = plt.subplots(figsize=(2.2 + 1.6 * len(rows), 4))
    width = 0.27
    for k, (name, key) in enumerate(series):
        vals = [r.get(key, float("nan")) for r in rows]
        bars = ax.bar([i + (k - 1) * width for i in range(len(rows))], vals, width, label=name)
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(range(len(rows)), labels)
    ax.set_ylabel("ms per forward (median)")
    ax.set_yscale("log")
    ax.set_title(f"prefill, {env['gpu']}, torch {env['torch']}, triton {env['triton']}, "
                 f"{env['date']}", fontsize=8)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def save_figure(fig, path: Path) -> Path:
    """Writes a finished figure (the prefill, decode and sweep plots) and returns its path."""
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def report_from_csv(args, rows: list[dict], print_targets, plot) -> int:
    """--from-csv: the targets and the plot of rows measured earlier (no runs)."""
    if not rows:
        print(f"no rows of commits {' '.join(args.from_csv)} in {args.csv}", file=sys.stderr)
        return 2
    print_targets(rows)
    env = {k: rows[0][k] for k in ("date", "gpu", "torch", "triton")}
    if args.plot and plot(rows, env, Path(args.plot)):
        print(f"wrote {args.plot}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="gemma4-4b", choices=sorted(MODEL_NAMES))
    ap.add_argument("--seq-len", type=int, nargs="+", default=[2048])
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default=None)
    ap.add_argument("--device", choices=("cuda", "cpu"), default=None)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--kernel-reps", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--init", choices=INITS, default="transformers", help="presets "
                    "transformers has: its own initialization, or meganeura's random_weights "
                    "(N(0, 1/fan_in)) loaded into its model; both read the same tensors")
    ap.add_argument("--check", action="store_true", help="relative error vs the fp32 reference")
    ap.add_argument("--hf-fp32", action="store_true", help="with --check, presets transformers "
                    "has (published Gemma-4, Llama, Qwen3): also against transformers' model "
                    "upcast to fp32 (needs 4 bytes a weight)")
    ap.add_argument("--no-torch-compile", dest="torch_compile", action="store_false")
    ap.add_argument("--regimes", action="store_true", help="also meganeura against "
                    "torch.compile from idle and sustained, interleaved, with the energy of a "
                    "forward (NVML)")
    ap.add_argument("--regime-rounds", type=int, default=10, help="interleaved rounds per regime")
    ap.add_argument("--dense-baseline", action="store_true", help="seed presets: also "
                    "torch.compile with the sliding-window layers through a dense mask")
    ap.add_argument("--layers", type=int, default=None, help="the preset cut to its first N "
                    "layers (same widths; e.g. for --hf-fp32 where the whole fp32 copy does "
                    "not fit)")
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--csv", default=str(RESULTS / "prefill.csv"))
    ap.add_argument("--plot", default=str(RESULTS / "prefill.png"))
    ap.add_argument("--models", nargs="+", default=None, choices=sorted(MODEL_NAMES),
                    help="several presets, each at every "
                    "--seq-len (overrides --model)")
    ap.add_argument("--table", action="store_true", help="the prefill target table: 4b at 2048 "
                    "and 8192 tokens, 12b and 27b at 2048 (overrides --model(s) and --seq-len)")
    ap.add_argument("--from-csv", metavar="COMMIT", nargs="+", default=None, help="no runs: "
                    "the targets and the plot from the --csv rows of these commits (a table "
                    "measured in parts, by calls of a time limit)")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.from_csv:
        rows = rows_of(Path(args.csv), args.from_csv)
        rows = [r for r in rows if not args.models or r["model"] in args.models]
        return report_from_csv(args, rows, print_targets, plot)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    args.dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    env = environment()
    print(f"# prefill benchmark {env}")
    runs = [(m, s) for m in args.models or [args.model] for s in args.seq_len]
    if args.table:
        runs = TABLE
    rows = []
    for model, seq in runs:
        r = run_one(args, model, seq, device, dtype)
        print_row(r)
        rows.append(r)
        append_csv([r], env, Path(args.csv))  # each row as soon as it is measured
        _release(device.type == "cuda")
    print_targets(rows)
    if args.plot:
        p = plot(rows, env, Path(args.plot))
        if p:
            print(f"wrote {p}")
    bad = [r for r in rows if r.get("rel_error", 0) > TOLERANCE[args.dtype if args.dtype == "bf16"
                                                                 else "fp32"]]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
