"""A batch's decode step against a one-row step: where the time goes, launch by launch.

    python benchmarks/decode_batch.py                         # e4b, 1 and 8 rows, context 1024
    python benchmarks/decode_batch.py --model gemma4-4b --rows 1 4 16 --context 4096
    python benchmarks/decode_batch.py --model gemma4-small-test --device cpu   # the script

For each row count, the decode plan of a session of that many sequences (random weights,
random cached keys and values at `--context` positions) runs a few steps; on CUDA its
step's graph is then replayed back to back (ms a step) and each launch timed on its own
(decode.print_profile: summed by kernel variant and shape). A step of b rows reads the
weights once for all of them, so its time over the one-row step's says how well the
few-row products stream.

`--megakernel [P ...]` also runs the one-row step as one persistent kernel of P programs
(default: one per SM; codegen/megakernel.py under compiler/schedule.py's schedule): its
logits and caches against the step's own launches from the same caches (the same bits
where every launch has the megakernel's warp count, since a reduction's order follows the
warps; else within rounding), then ms a step over 50 runs back to back (each zeroes the counters first).
`--megakernel-times` then runs its instrumented build once (each task's start and end on
the GPU's timer) and prints where the run's time goes: by kernel variant, the launches'
mean task time and the programs' time between tasks (waits included).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode import graph_replay_ms, print_profile  # noqa: E402

import meganeura  # noqa: E402
from meganeura.models import MODEL_NAMES, PRESETS  # noqa: E402
from meganeura.models.weights import random_weights  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="gemma4-e4b", choices=sorted(MODEL_NAMES))
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8],
                    help="sequences a step (a batch's plan takes the next power of two)")
    ap.add_argument("--context", type=int, default=1024, help="positions each sequence holds")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--megakernel", type=int, nargs="*", default=None, metavar="P",
                    help="the one-row step as a persistent kernel of P programs too "
                         "(no P: one per SM)")
    ap.add_argument("--megakernel-times", action="store_true",
                    help="with --megakernel on CUDA: where its time goes, task by task")
    args = ap.parse_args(argv)
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        print("no CUDA device: --device cpu runs the script on the interpreter", file=sys.stderr)
        return 2
    dev = torch.device(args.device)
    dtype = torch.bfloat16 if cuda else torch.float32
    cfg = PRESETS[MODEL_NAMES[args.model]]
    model = meganeura.from_config(cfg, random_weights(cfg, 0, dtype, dev), dev, dtype)
    gen = model.generator
    one = None
    for b in args.rows:
        s = gen.session(args.context + 16, sequences=b, floor=False)
        g = torch.Generator(device=dev).manual_seed(b)
        for t in s.caches.values():  # a context's worth of keys and values
            t.normal_(generator=g)
        step = gen.decode_plan(s)
        pos = torch.full((s.sequences,), args.context, dtype=torch.int64, device=dev)
        tok = torch.zeros(s.sequences, dtype=torch.int64, device=dev)
        for _ in range(3):
            tok = step.run_trusted(tok, pos).argmax(-1)
        if cuda:
            torch.cuda.synchronize()
            ms = graph_replay_ms(step)
            one = ms if b == 1 else one
            ratio = f", {ms / one:.2f}x the one-row step" if one and b > 1 else ""
            print(f"== {args.model} {b} rows, context {args.context}: {ms:.3f} ms a step{ratio}",
                  flush=True)
            print_profile(step, ms)
        else:
            print(f"== {args.model} {b} rows: {len(step.launches)} launches ran", flush=True)
        if args.megakernel is not None and b == 1:
            sms = torch.cuda.get_device_properties(dev).multi_processor_count if cuda else 1
            for p in args.megakernel or [sms]:
                megakernel(step, s, p, dtype, one, args.megakernel_times and cuda)
        gen.sessions.remove(s)
        gen.last_session = None
        if cuda:
            torch.cuda.empty_cache()
    return 0


def megakernel(step, s, programs: int, dtype, plan_ms: float | None,
               times: bool = False) -> None:
    """The step as one persistent kernel of `programs` programs: same bits as the step's
    launches from the same caches, then its time a step (times: and task by task)."""
    from meganeura.codegen.megakernel import WARPS, Megakernel
    from meganeura.compiler.schedule import build, works_of

    dev = step.target.device
    works = works_of(step)
    sched = build(works, programs)
    mk = Megakernel(step, sched)
    ids = torch.tensor([3], device=dev)
    pos = torch.tensor([max(0, s.capacity - 20)], device=dev)
    before = {n: t.clone() for n, t in s.caches.items()}
    want = step(ids, pos).clone()
    after = {n: t.clone() for n, t in s.caches.items()}
    for n, t in s.caches.items():
        t.copy_(before[n])
    step.load_inputs(ids, pos)
    mk.run()
    same = torch.equal(step.outputs[0], want) and all(torch.equal(s.caches[n], after[n])
                                                       for n in s.caches)
    # (the same bits where every launch has the megakernel's warps: a reduction's order
    # follows them; else within rounding)
    warps = sum(spec.num_warps != WARPS for launch in step.launches for spec in launch.spec.chain())
    err = ((step.outputs[0].float() - want.float()).abs().max() / want.float().abs().max()).item()
    line = (f"   megakernel, {programs} programs, {len(sched.tasks)} tasks, {mk.kernels} "
            f"kernels: {'same bits as the launches' if same else 'not the same bits'}; logits "
            f"{err:.2e} from the launches' (relative to their largest; {warps} launches of "
            f"another warp count)")
    if dev.type == "cuda":
        reps = 50
        mk.run()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            mk.run()
        end.record()
        torch.cuda.synchronize()
        ms = start.elapsed_time(end) / reps
        line += f"; {ms:.3f} ms a step" + (f", {ms / plan_ms:.2f}x the launches' graph"
                                           if plan_ms else "")
        line += f" (estimated: {sched.makespan * 1e3:.3f} ms on the programs, " \
                f"{sched.serial * 1e3:.3f} ms back to back)"
    print(line, flush=True)
    if times:
        task_report(step, Megakernel(step, sched, timed=True))


def task_report(step, mk, top: int = 12) -> None:
    """One run of the timed build: the run's length; by kernel variant the run's time past
    the launch before (how far each launch's last task ends after the previous launch's)
    and the launches' mean task time (waits included); the programs' time between their
    tasks (the task loop)."""
    mk.run()
    mk.run()
    torch.cuda.synchronize()
    rows = mk.task_times()
    specs = [(launch, spec) for launch in step.launches for spec in launch.spec.chain()]
    g = step.plan.graph
    by: dict = {}
    per_launch: dict = {}
    for _, _, j, a, b in rows:
        per_launch.setdefault(j, []).append(b - a)
    for j, ds in per_launch.items():
        launch, spec = specs[j]
        key = (spec.archetype, spec.variant, str(list(g[launch.node].shape)))
        t, c = by.get(key, (0.0, 0))
        by[key] = (t + sum(ds) / len(ds), c + 1)
    # each launch's share of the run: how far its last task's end lies past the launch
    # before's (launches depend mostly in a chain, so these add up to the run)
    ends: dict = {}
    for _, _, j, _, b in rows:
        ends[j] = max(ends.get(j, 0.0), b)
    share: dict = {}
    last = 0.0
    for j in sorted(ends):
        launch, spec = specs[j]
        key = (spec.archetype, spec.variant, str(list(g[launch.node].shape)))
        share[key] = share.get(key, 0.0) + max(0.0, ends[j] - last)
        last = max(last, ends[j])
    gaps = 0.0
    for p in range(mk.schedule.programs):
        mine = sorted((a, b) for q, _, _, a, b in rows if q == p)
        gaps += sum(a2 - b1 for (_, b1), (a2, _) in zip(mine, mine[1:]))
    end = max(b for *_, b in rows)
    print(f"   timed run: {end:.1f} us from the first task's start to the last's end; "
          f"between tasks {gaps / mk.schedule.programs:.1f} us a program on average")
    print("   by kernel variant: the run's time past the launch before (sum), the launches' "
          "mean task time (sum, count, each)")
    for key, (t, c) in sorted(by.items(), key=lambda x: -share[x[0]])[:top]:
        arch, variant, shape = key
        print(f"   {share[key]:9.1f} us {t:9.1f} us {c:4d}x {t / c:8.2f} us  {arch:16} "
              f"{variant:50} {shape}")


if __name__ == "__main__":
    sys.exit(main())
