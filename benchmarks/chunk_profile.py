"""Where a chunked prefill's time goes, against the plan made for exactly the prompt's length.

    python benchmarks/chunk_profile.py --model gemma4-e4b --lengths 1528 8152
    python benchmarks/chunk_profile.py --model gemma4-small-test --device cpu --lengths 9

Random weights. First each chunk size's plan: the cost model's estimate of it, the time
measured when it was made (what the chunk schedule is priced by on CUDA) and a timing of
2 x `--runs` runs. Then per prompt length: time to first token through the chunks and
through the exact plan (medians of `--runs`), and every launch of both timed on its own
(replayed in a CUDA graph), the chunks each at their positions in the prompt after the
whole prompt was prefilled (a full-attention layer's cache holds the keys before them; a
sliding ring holds the prompt's last keys, in the slots a chunk reads: the same work),
summed by kernel kind side by side and listed by launch.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prefill import kernel_times  # noqa: E402

import meganeura  # noqa: E402
from meganeura.inference.generation import SamplingParams, sample  # noqa: E402
from meganeura.models import MODEL_NAMES, PRESETS  # noqa: E402
from meganeura.models.weights import random_weights  # noqa: E402


def sync(dev) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, dev) -> float:
    sync(dev)
    t = time.perf_counter()
    fn()
    sync(dev)
    return time.perf_counter() - t


def by_launch(fn, times: dict, into: dict) -> None:
    """Adds each launch's time to its (archetype variant, operand shapes) entry of `into`."""
    g = fn.plan.graph
    for launch in fn.launches:
        key = f"{launch.spec.archetype} {launch.spec.variant} " + \
            " ".join(str(list(g[i].shape)) for i in g[launch.node].inputs[:2])
        t, c = into.get(key, (0.0, 0))
        into[key] = (t + times[launch.node], c + 1)


def kind(key: str) -> str:
    arch, variant = key.split(" ")[:2]
    return f"{arch} {variant.split('+')[0]}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="gemma4-e4b", choices=sorted(MODEL_NAMES))
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--lengths", type=int, nargs="+", default=[1528, 8152])
    ap.add_argument("--chunks", type=int, nargs="+", help="chunk sizes (default: the model's)")
    ap.add_argument("--reps", type=int, default=10, help="replays a launch is timed over")
    ap.add_argument("--runs", type=int, default=5, help="runs a time to first token is the "
                    "median of (default 5; a chunk's timing: twice as many)")
    args = ap.parse_args(argv)
    if min(args.lengths + (args.chunks or [1]) + [args.reps, args.runs]) < 1:
        ap.error("lengths, chunk sizes, --reps and --runs must be at least 1")
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: --device cpu runs the interpreter", file=sys.stderr)
        return 2
    dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    cfg = PRESETS[MODEL_NAMES[args.model]]
    model = meganeura.from_config(cfg, random_weights(cfg, 0, dt, dev), dev, dt)
    gen = model.generator
    if args.chunks:
        gen.chunks = tuple(sorted(set(args.chunks)))
    longest = max(args.lengths)
    t = time.perf_counter()
    model.warmup(longest + 1)
    sync(dev)
    print(f"warmup {time.perf_counter() - t:.1f} s, chunks {gen.chunks}", flush=True)
    s = gen.session(longest + 1)
    g = torch.Generator().manual_seed(3)
    for rows in gen.chunk_sizes(s):
        fn = gen.chunk_plan(s, rows)
        inputs = (torch.randint(0, cfg.vocab_size, (rows,), generator=g).to(dev),
                  torch.arange(rows, dtype=torch.int64, device=dev),
                  torch.full((1,), rows - 1, dtype=torch.int64, device=dev))
        fn.run_trusted(*inputs)
        runs = 2 * args.runs
        ms = timed(lambda: [fn.run_trusted(*inputs) for _ in range(runs)], dev) * 1e3 / runs
        made = s.measured.get(rows)
        print(f"chunk {rows:5d}: estimate {fn.plan.estimated_time * 1e3:9.3f} ms, measured when "
              f"made {'-' if made is None else f'{made * 1e3:.3f}':>9} ms, {runs} runs {ms:9.3f} ms "
              f"a run ({ms / rows * 1e3:.2f} us a row)", flush=True)
    s.held, s.prefilled = [], 0  # (those runs wrote the caches)
    for n in args.lengths:
        prompt = torch.randint(0, cfg.vocab_size, (n,), generator=g)
        plan = gen.schedule(s, n)
        print(f"\n== {n} tokens: chunks (start, rows) {plan}", flush=True)

        def chunked():
            gen.generate(prompt, 1, SamplingParams(), stop=[])
            return gen.last_stats["time_to_first_token_s"]
        chunked()
        ch = statistics.median(chunked() for _ in range(args.runs))
        exact = gen.prefill_plan(s, n)
        ids = prompt.to(dev)
        first = lambda: int(sample(exact.run_trusted(ids)[-1], SamplingParams(), None))  # noqa: E731
        first()
        ex = statistics.median(timed(first, dev) for _ in range(args.runs))
        print(f"time to first token: chunks {ch * 1e3:.2f} ms, exact plan {ex * 1e3:.2f} ms "
              f"({ch / ex:.3f}x)", flush=True)
        cuda = dev.type == "cuda"
        whole, parts = {}, {}
        by_launch(exact, kernel_times(exact, cuda, args.reps, (ids,)), whole)
        gen._prefill(s, prompt, plan)  # the caches hold the prompt's keys for the chunks
        padded = torch.zeros(plan[-1][0] + plan[-1][1], dtype=torch.int64)
        padded[:n] = prompt
        padded = padded.to(dev)
        for start, rows in plan:
            fn = gen.chunk_plan(s, rows)
            inputs = (padded[start:start + rows],
                      torch.arange(start, start + rows, dtype=torch.int64, device=dev),
                      torch.full((1,), min(n - start, rows) - 1, dtype=torch.int64, device=dev))
            by_launch(fn, kernel_times(fn, cuda, args.reps, inputs), parts)
        s.held, s.prefilled = [], 0
        print(f"launches one by one: exact {sum(t for t, _ in whole.values()):.3f} ms "
              f"({len(exact.launches)} launches), chunks "
              f"{sum(t for t, _ in parts.values()):.3f} ms", flush=True)
        kinds: dict[str, list[float]] = {}
        for i, d in enumerate((whole, parts)):
            for key, (t, _) in d.items():
                kinds.setdefault(kind(key), [0.0, 0.0])[i] += t
        for k, (a, b) in sorted(kinds.items(), key=lambda x: -max(x[1])):
            print(f"  {k:48} exact {a:9.3f} ms  chunks {b:9.3f} ms  {b - a:+9.3f}", flush=True)
        for title, d in (("exact", whole), ("chunks", parts)):
            print(f"  -- {title}, by launch", flush=True)
            for key, (t, c) in sorted(d.items(), key=lambda x: -x[1][0])[:14]:
                print(f"  {t:9.3f} ms {c:4d}x  {key}", flush=True)
        s.plans.pop(("prefill", n), None)  # (its arena goes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
