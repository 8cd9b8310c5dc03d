"""Generation as a server sees it: prompts of every length, several prompts at once.

    python benchmarks/serve.py --model gemma4-e4b
    python benchmarks/serve.py --tiny --device cpu     # the script itself, on the interpreter

One process, one model (transformers' model built in bf16 with random weights; meganeura
reads the very same tensors), in five parts, each printed as it ends:

1. warmup: `model.warmup(max_len + new)` makes the caches and every plan a request uses
   (the prefill chunks, the decode step), timed.
2. a stream of requests of random lengths 1 .. max_len, each a length not seen before:
   time to first token (`generate(prompt, 1)`, the plans all made), p50 / p99.
3. for a few of those lengths: the same prompt through a plan made for exactly that
   length (the whole prompt in one prefill), and through transformers + torch.compile
   (dynamic shapes, compiled once before; the last row's logits, as generate asks): time
   to first token of each, medians of 3, and the ratios.
4. several prompts (random lengths in [100, 2000]) decoded together, `new` greedy tokens
   each (no stop): new tokens per second of the batch against the same prompts one at a
   time and against transformers' batched generate (left-padded, eager, dynamic cache);
   each sequence's step logits against its batch-of-one run, up to the first id where
   the two greedy paths part (bf16 rounding may part them).
5. a fresh process: from the weights in memory (random, made first) to the first token
   of a 100-token prompt, the kernel cache warm from the parts above; then a second one,
   which finds the plans the first one kept (a plan depends on the caches' capacity: the
   first may have made its own).

Results go to results/serve.csv (one row a part) and to stdout.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hf_forward import has_transformers, hf_config, hf_model, shared_weights  # noqa: E402
from prefill import environment  # noqa: E402

import meganeura  # noqa: E402
from meganeura.inference.generation import SamplingParams, sample  # noqa: E402
from meganeura.models import MODEL_NAMES, PRESETS  # noqa: E402
from meganeura.models.llama import LlamaConfig  # noqa: E402
from meganeura.runtime.check import TOLERANCE, relative_error  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
TINY = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                   max_position_embeddings=4096)


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def pct(xs: list[float], q: float) -> float:
    """The q-quantile (0..1) of xs, nearest rank."""
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def ttft(model, prompt) -> float:
    """Seconds from the call to the first new id on the host (plans all made)."""
    model.generator.generate(prompt, 1, SamplingParams(), stop=[])
    st = model.generator.last_stats
    assert st["plans_s"] < 0.5, st  # (a plan was made in the call: not what is timed)
    return st["time_to_first_token_s"]


def exact_ttft(model, prompt, device) -> float:
    """Seconds to the first new id through the plan of exactly len(prompt) tokens."""
    gen = model.generator
    s = gen.session(prompt.numel() + 1)
    fn = gen.prefill_plan(s, prompt.numel())
    ids = prompt.to(device)
    sync(device)
    t = time.perf_counter()
    logits = fn.run_trusted(ids)
    int(sample(logits[-1], SamplingParams(), None))
    return time.perf_counter() - t


def hf_ttft(compiled, prompt, device) -> float:
    """Seconds to the first new id through transformers' compiled forward (last row only)."""
    ids = prompt.to(device)[None]
    sync(device)
    t = time.perf_counter()
    with torch.no_grad():
        logits = compiled(input_ids=ids, use_cache=False, logits_to_keep=1).logits
    int(logits[0, -1].argmax())
    return time.perf_counter() - t


def step_logits(model, prompts, new):
    """(outputs, per sequence a list of its steps' logits [vocab]) of a greedy run of the
    prompts together (several) or of one prompt (a list of one)."""
    steps = [[] for _ in prompts]

    def seen(x):
        for i in range(len(prompts)):
            steps[i].append(x[i].float().clone())
    out = model.generator._run(list(prompts), new, SamplingParams(), set(), None, seen, None)
    return out, steps


def part_fresh(args) -> dict:
    """Part 5, in its own process: weights made, then model object to first token."""
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = TINY if args.tiny else PRESETS[MODEL_NAMES[args.model]]
    from meganeura.models.weights import random_weights

    weights = random_weights(cfg, 0, dtype, device)
    prompt = torch.randint(0, cfg.vocab_size, (100,), generator=torch.Generator().manual_seed(5))
    sync(device)
    t = time.perf_counter()
    model = meganeura.from_config(cfg, weights, device, dtype)
    seen = []
    model.generate(prompt, 1, on_token=lambda x: seen.append(time.perf_counter()))
    st = model.generator.last_stats
    return {"to_first_token_s": seen[0] - t, "plans_s": st["plans_s"]}


def main(argv=None) -> int:
    names = sorted(n for n, key in MODEL_NAMES.items() if has_transformers(PRESETS[key]))
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="gemma4-e4b", choices=names)
    ap.add_argument("--tiny", action="store_true", help="a two-layer Llama (checks the script)")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--requests", type=int, default=40, help="part 2's stream (default: 40)")
    ap.add_argument("--max-len", type=int, default=8192, help="longest prompt (default: 8192)")
    ap.add_argument("--exact", type=int, default=6, help="lengths of part 3 (default: 6)")
    ap.add_argument("--batch", type=int, default=8, help="prompts of part 4 (default: 8)")
    ap.add_argument("--batch-len", default="100,2000", help="their lengths' range")
    ap.add_argument("--new", type=int, default=128, help="new tokens each (default: 128)")
    ap.add_argument("--check-steps", type=int, default=16, help="steps compared (default 16)")
    ap.add_argument("--no-hf", action="store_true", help="leave transformers out")
    ap.add_argument("--no-hf-compile", action="store_true", help="part 3 without transformers")
    ap.add_argument("--parts", default="1,2,3,4,5")
    ap.add_argument("--fresh", action="store_true", help=argparse.SUPPRESS)  # part 5's process
    ap.add_argument("--csv", default=str(RESULTS / "serve.csv"))
    args = ap.parse_args(argv)
    if args.fresh:
        print(json.dumps(part_fresh(args)))
        return 0
    parts = {int(p) for p in args.parts.split(",")}
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    name = "tiny" if args.tiny else args.model
    cfg = TINY if args.tiny else PRESETS[MODEL_NAMES[args.model]]
    env = environment()
    print(f"# serve {env}", flush=True)
    rows = []

    def record(part: str, **values) -> None:
        rows.append({**env, "model": name, "part": part, **values})
        print(f"{part}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                      for k, v in values.items()), flush=True)

    hf = None
    if not args.no_hf:
        hf = hf_model(hf_config(cfg, None if args.tiny else MODEL_NAMES[args.model]), dtype,
                      device, 0)
        model = meganeura.from_config(cfg, shared_weights(hf, cfg), device, dtype)
    else:
        model = meganeura.from_config(cfg, None, device, dtype)
    gen = torch.Generator().manual_seed(1)
    vocab = cfg.vocab_size
    longest = max(args.max_len, max(int(x) for x in args.batch_len.split(",")))

    t = time.perf_counter()
    model.warmup(longest + args.new)
    sync(device)
    record("warmup", seconds=time.perf_counter() - t, plans=model.generator.plan_count())
    lengths = sorted(set(torch.randint(1, args.max_len + 1, (args.requests,),
                                       generator=gen).tolist()))
    if 2 in parts:
        times = [ttft(model, torch.randint(0, vocab, (n,), generator=gen)) for n in lengths]
        record("stream", requests=len(lengths), ttft_p50_ms=pct(times, 0.5) * 1e3,
               ttft_p99_ms=pct(times, 0.99) * 1e3, ttft_max_ms=max(times) * 1e3,
               plans=model.generator.plan_count())
        for n, x in zip(lengths, times):
            print(f"  {n:6d} tokens: {x * 1e3:8.2f} ms", flush=True)
    if 3 in parts:
        picks = [lengths[round(k * (len(lengths) - 1) / max(1, args.exact - 1))]
                 for k in range(args.exact)]
        compiled = None
        if hf is not None and not args.no_hf_compile:
            compiled = torch.compile(hf, dynamic=True)
            t = time.perf_counter()
            hf_ttft(compiled, torch.randint(0, vocab, (picks[0],), generator=gen), device)
            record("hf_compile", seconds=time.perf_counter() - t)
        ratios, hf_ratios = [], []
        for n in picks:
            prompt = torch.randint(0, vocab, (n,), generator=gen)
            t = time.perf_counter()
            exact_ttft(model, prompt, device)  # the plan of this length made (not timed)
            built = time.perf_counter() - t
            exact = statistics.median(exact_ttft(model, prompt, device) for _ in range(3))
            chunked = statistics.median(ttft(model, prompt) for _ in range(3))
            values = dict(seq=n, chunked_ms=chunked * 1e3, exact_ms=exact * 1e3,
                          ratio=chunked / exact, exact_plan_s=built)
            if compiled is not None:
                first = hf_ttft(compiled, prompt, device)
                warm = statistics.median(hf_ttft(compiled, prompt, device) for _ in range(3))
                values |= dict(hf_compiled_first_ms=first * 1e3, hf_compiled_ms=warm * 1e3,
                               vs_hf=chunked / warm)
                hf_ratios.append(chunked / warm)
            ratios.append(chunked / exact)
            record("length", **values)
            for session in model.generator.sessions:  # (its arena goes)
                session.plans.pop(("prefill", n), None)
        summary = dict(lengths=len(picks), ratio_p50=pct(ratios, 0.5), ratio_p99=pct(ratios, 0.99))
        if hf_ratios:
            summary |= dict(vs_hf_p50=pct(hf_ratios, 0.5), vs_hf_p99=pct(hf_ratios, 0.99))
        record("lengths", **summary)
        del compiled
    if 4 in parts:
        lo, hi = (int(x) for x in args.batch_len.split(","))
        prompts = [torch.randint(0, vocab, (int(n),), generator=gen) for n in
                   torch.randint(lo, hi + 1, (args.batch,), generator=gen).tolist()]
        model.warmup(hi + args.new, len(prompts))
        sync(device)
        t = time.perf_counter()
        singles = [step_logits(model, [p], args.new) for p in prompts]
        one_s = time.perf_counter() - t
        t = time.perf_counter()
        outs, steps = step_logits(model, prompts, args.new)
        batch_s = time.perf_counter() - t
        st = model.generator.last_stats
        total = args.new * len(prompts)
        values = dict(sequences=len(prompts), new_each=args.new, batch_tokens_per_s=total / batch_s,
                      one_at_a_time_tokens_per_s=total / one_s, speedup=one_s / batch_s,
                      batch_decode_tokens_per_s=(st["new_tokens"] - len(prompts)) / st["decode_s"])
        worst, compared, parted = 0.0, 0, 0
        for i, ((out1, steps1), out, batch_steps) in enumerate(zip(singles, outs, steps)):
            same = prompts[i].numel()
            while same < out.numel() and out[same] == out1[0][same]:
                same += 1
            agree = same - prompts[i].numel()  # new ids equal: step k's logits comparable
            parted += agree < args.new
            for k in range(min(agree + 1, args.check_steps, len(steps1[0]))):
                worst = max(worst, relative_error(batch_steps[k], steps1[0][k]))
                compared += 1
        values |= dict(steps_compared=compared, max_rel_error=worst, paths_parted=parted,
                       bound=TOLERANCE["bf16" if cuda else "fp32"])
        if hf is not None:
            width = max(p.numel() for p in prompts)
            ids = torch.zeros(len(prompts), width, dtype=torch.int64)
            mask = torch.zeros(len(prompts), width, dtype=torch.int64)
            for i, p in enumerate(prompts):  # left-padded, as batched generate wants
                ids[i, width - p.numel():], mask[i, width - p.numel():] = p, 1
            ids, mask = ids.to(device), mask.to(device)
            with torch.no_grad():
                hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2,
                            do_sample=False, eos_token_id=None, pad_token_id=0)
                sync(device)
                t = time.perf_counter()
                hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args.new,
                            min_new_tokens=args.new, do_sample=False, eos_token_id=None,
                            pad_token_id=0)
                sync(device)
            hf_s = time.perf_counter() - t
            values |= dict(hf_batch_tokens_per_s=total / hf_s, vs_hf=hf_s / batch_s)
        record("batch", **values)
    if 5 in parts:  # twice: the first process keeps the plans its capacity needs, if new
        cmd = [sys.executable, __file__, "--fresh", "--device", args.device, "--model", args.model]
        cmd += ["--tiny"] if args.tiny else []
        for run in ("fresh", "fresh_again"):
            p = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
            if p.returncode != 0:
                print(p.stderr[-3000:], flush=True)
                record(run, error=p.returncode)
            else:
                record(run, **json.loads(p.stdout.strip().splitlines()[-1]))
    path = Path(args.csv)
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = list(dict.fromkeys(k for r in rows for k in r))
    old = []
    if path.exists():
        with open(path) as f:
            old = list(csv.DictReader(f))
        fields = list(dict.fromkeys([*(old[0].keys() if old else []), *fields]))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in old + rows:
            w.writerow({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in r.items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
