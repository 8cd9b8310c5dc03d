"""Tile sweep of the one-row (matrix-vector) matmul kernel on the GPU: bandwidth reached per
column tile, K step, warps and stages, on the decode step's product shapes.

    python benchmarks/matvec_sweep.py                  # every shape below
    python benchmarks/matvec_sweep.py --shapes e4b-down seed-down

Each configuration runs the generated kernel (codegen/matvec.py) on random operands,
replayed 50 times in one CUDA graph (prefill.graph_time); the table gives microseconds per launch and the
bandwidth of the bytes the product must read (B, a, the output). The best tile per shape
is what `matvec.tiles` should choose.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile

from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prefill import graph_time  # noqa: E402

from meganeura.codegen.cache import KernelCache  # noqa: E402
from meganeura.codegen.matvec import emit, k_slices  # noqa: E402
from meganeura.codegen.stages import Stages  # noqa: E402
from meganeura.compiler.kernels import Stage  # noqa: E402

# name: (N, K, variant flags, B stored [N, K]); the variants of the decode plans
SHAPES = {
    "e4b-gate-up": (10240, 2560, dict(norm=True, act="gelu_tanh", parts=2), True),
    "e4b-gate-up-bf16": (10240, 2560, dict(act="gelu_tanh", parts=2), True),  # no norm prologue
    "e4b-down": (2560, 10240, dict(), True),
    "e4b-qkv": (3072, 2560, dict(norm=True, parts=3), True),
    "e4b-o": (2560, 2048, dict(), True),
    "e4b-ple-up": (2560, 256, dict(), True),
    "e4b-lm-head": (262144, 2560, dict(softcap=True), True),
    "31b-gate-up": (21504, 5376, dict(norm=True, act="gelu_tanh", parts=2), True),
    "31b-down": (5376, 21504, dict(), True),
    "31b-qkv": (16384, 5376, dict(norm=True, parts=3, widths=[8192, 4096, 4096]), True),
    "31b-qk-full": (18432, 5376, dict(norm=True, parts=2, widths=[16384, 2048]), True),
    "31b-o": (5376, 8192, dict(), True),
    "31b-o-full": (5376, 16384, dict(), True),
    "seed-gate-up": (10240, 2560, dict(norm=True, act="silu", parts=2), False),
    "seed-down": (2560, 10240, dict(), False),
    "seed-qkv": (5120, 2560, dict(norm=True, parts=3, widths=[2560, 1280, 1280]), False),
    "seed-o": (2560, 2560, dict(), False),
    "seed-lm-head": (262144, 2560, dict(norm=True), False),
}


def part_widths(n, flags):
    """Widths of the weights B is read from (e4b's q | k | v by default for three parts)."""
    parts = flags.get("parts", 1)
    paired = flags.get("act") is not None
    return flags.get("widths") or ([n, n] if paired and parts == 2 else (
        [n * 2] if paired else ([n - 1024, 512, 512] if parts == 3 else [n])))


def launch_args(n, k, flags, b_trans, dev, split: tuple | None = None, rows: int = 1):
    """The kernel's arguments on random operands, and the bytes it must move. split:
    (K_SPLIT, SPLIT_K) for the split-K variant (its zeroed workspace, a row per slice and
    row, and counters made here); rows > 1: the few-row form's arguments."""
    parts = flags.get("parts", 1)
    paired = flags.get("act") is not None
    widths = part_widths(n, flags)
    a = torch.randn(rows, k, device=dev,
                    dtype=torch.float32 if flags.get("norm") else torch.bfloat16)
    bs = [torch.randn(*((w, k) if b_trans else (k, w)), device=dev, dtype=torch.bfloat16) * k ** -0.5
          for w in widths]
    c = torch.empty(rows, n, device=dev, dtype=torch.bfloat16)
    args = [a, *bs, c]
    args += [torch.ones(k, device=dev)] if flags.get("norm") else []
    if split is not None:
        args += [torch.zeros(split[1] * rows * (2 if paired else 1) * n, device=dev),
                 torch.zeros(n, dtype=torch.int32, device=dev), *split]
    args += ([rows] if rows > 1 else []) + [n, k, a.stride(0)]
    args += [b.stride(0) if b_trans else 1 for b in bs] + [1 if b_trans else b.stride(0) for b in bs]
    args += [c.stride(0)]
    if parts > 1 and not paired:
        args += list(itertools.accumulate(widths))[:-1]
    args += [1e-6] if flags.get("norm") else []
    args += [30.0] if flags.get("softcap") else []
    nbytes = sum(b.numel() * 2 for b in bs) + a.numel() * a.element_size() + c.numel() * 2
    return args, nbytes


def cold_time(fn, reps: int = 30) -> float:
    """Milliseconds of one fn() call with its operands out of L2, as in a decode step (whose
    weights never fit): each call follows a read of 256 MB, whose own time is subtracted."""
    big = torch.empty(1 << 26, device="cuda")
    total = torch.empty((), device="cuda")

    def flushed():
        torch.sum(big, dim=0, out=total)
        fn()

    return graph_time(flushed, reps) - graph_time(lambda: torch.sum(big, dim=0, out=total), reps)


def time_config(results: list, fn, shape: str, label: str, cold: bool = False) -> None:
    """Appends (microseconds of one graph-replayed fn() call, label) to results, or prints
    why a configuration of `shape` that does not compile or run failed. cold: B out of L2
    (cold_time): products of less than ~50 MB otherwise read it from L2 when replayed."""
    try:
        results.append((1e3 * (cold_time(fn) if cold else graph_time(fn, 50)), label))
    except Exception as e:  # noqa: BLE001 - a configuration that fails is reported
        print(f"{shape} {label}: {type(e).__name__}: {str(e)[:120]}")


def print_best(title: str, results: list[tuple[float, str]], nbytes: int, best: int = 8) -> None:
    """The fastest configurations: microseconds, the bandwidth of `nbytes`, the label."""
    print(f"\n== {title}")
    for us, label in sorted(results)[:best]:
        print(f"  {us:8.2f} us {nbytes / us / 1e3:7.0f} GB/s  {label}", flush=True)


def sweep_device():
    """(the CUDA device, a fresh kernel cache) for a sweep, or None (said why) without a GPU."""
    if not torch.cuda.is_available():
        print("the sweep needs a CUDA GPU", file=sys.stderr)
        return None
    return torch.device("cuda"), KernelCache(tempfile.mkdtemp())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--warps", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--stages", type=int, nargs="+", default=[1, 3])
    ap.add_argument("--rows", type=int, default=1, help="rows of A (2-16: the few-row form, "
                    "a batched decode step's; B stored [N, K] shapes)")
    args = ap.parse_args(argv)
    if (setup := sweep_device()) is None:
        return 2
    dev, cache = setup
    for name in args.shapes:
        n, k, flags, b_trans = SHAPES[name]
        if args.rows > 1:
            sweep_rows(cache, name, n, k, flags, args, dev)
        elif b_trans:
            sweep_n_k(cache, name, n, k, flags, args, dev)
        else:
            sweep_k_n(cache, name, n, k, flags, args, dev)
    return 0


def sweep_n_k(cache, name, n, k, flags, args, dev) -> None:
    """B stored [N, K]: column tiles of 1-16, K steps of 256-1024, warm L2 (B >= 50 MB)."""
    src = emit(epilogue(flags), flags.get("norm", False), flags.get("parts", 1))
    fn = cache.load(src, "matvec_kernel", False)
    run_args, nbytes = launch_args(n, k, flags, True, dev)
    results = []
    for bn, bk, w, st in itertools.product((1, 2, 4, 8, 16), (256, 512, 1024), args.warps,
                                           args.stages):
        if bk > max(k, 32) * 2 or not fits(n, flags, bn):
            continue
        grid = (-(-n // bn), 1)
        label = f"BLOCK_N={bn:<4} BLOCK_K={bk:<5} warps={w} stages={st}"
        time_config(results, lambda: fn[grid](*run_args, BLOCK_N=bn, BLOCK_K=bk,
                                               num_warps=w, num_stages=st), name, label)
    print_best(f"{name}: N={n} K={k} {flags} B stored [N, K], {nbytes / 1e6:.1f} MB", results,
               nbytes)


def sweep_rows(cache, name, n, k, flags, args, dev) -> None:
    """The few-row form (every row in each program, on the matrix units), B stored [N, K]:
    column tiles of 16-64, K steps of 64-256, warps, K shared by 1-4 programs."""
    emit_args = (epilogue(flags), flags.get("norm", False), flags.get("parts", 1))
    kernels = {split: cache.load(emit(*emit_args, True, split, None, True, "tf32"),
                                 "matvec_kernel", False) for split in (False, True)}
    configs = []
    for bn, bk, w, split in itertools.product((16, 32, 64), (64, 128, 256), args.warps,
                                              (1, 2, 4)):
        k_split, splits = k_slices(k, split, bk)
        if not fits(n, flags, bn) or splits != split:
            continue
        fargs, nbytes = launch_args(n, k, flags, True, dev,
                                    (k_split, splits) if splits > 1 else None, args.rows)
        consts = dict(BLOCK_M=16, BLOCK_N=bn, BLOCK_K=bk)
        consts |= dict(BLOCK_S=splits) if splits > 1 else {}
        configs.append((f"BLOCK_N={bn:<3} BLOCK_K={bk:<4} warps={w} SPLIT_K={splits}",
                        kernels[splits > 1], (-(-n // bn), 1, splits), fargs, consts, w))
    from concurrent.futures import ThreadPoolExecutor

    def build(c):  # every configuration compiled on a thread pool before any is timed
        _, fn, grid, fargs, consts, w = c
        try:
            fn.warmup(*fargs, grid=grid, **consts, num_warps=w, num_stages=3)
        except Exception:  # noqa: BLE001 - the timing reports it
            pass
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(build, configs))
    results = []
    for label, fn, grid, fargs, consts, w in configs:
        time_config(results, lambda: fn[grid](*fargs, **consts, num_warps=w, num_stages=3),
                    name, label, cold=True)
    print_best(f"{name}: {args.rows} rows, N={n} K={k} {flags} B stored [N, K], "
               f"{nbytes / 1e6:.1f} MB, cold", results, nbytes, best=10)


def sweep_k_n(cache, name, n, k, flags, args, dev) -> None:
    """B stored [K, N] (the seed's layout), timed cold: the kernel as it was (16-32 columns,
    K steps of 128-1024, one program a column tile) against the split-K variant (32-128
    columns, K steps of 32-128, K shared by 1-16 programs, the last finishing the tile)."""
    emit_args = (epilogue(flags), flags.get("norm", False), flags.get("parts", 1))
    whole = cache.load(emit(*emit_args), "matvec_kernel", False)
    shared = cache.load(emit(*emit_args, True, True), "matvec_kernel", False)
    run_args, nbytes = launch_args(n, k, flags, False, dev)
    configs = []  # (label, kernel, grid, args, constexprs, warps)
    for bn, bk in itertools.product((16, 32), (128, 256, 1024)):
        if fits(n, flags, bn):
            configs.append((f"whole   BLOCK_N={bn:<4} BLOCK_K={bk:<5}", whole, (-(-n // bn), 1),
                            run_args, bn, bk, 8 if bk >= 1024 else 4))
    for bn, bk, w, split in itertools.product((32, 64, 128), (32, 64, 128), args.warps,
                                              (1, 2, 4, 8, 16)):
        k_split, splits = k_slices(k, split, bk)
        if not fits(n, flags, bn) or splits != split:
            continue
        split_args, _ = launch_args(n, k, flags, False, dev, (k_split, splits))
        configs.append((f"split-K BLOCK_N={bn:<4} BLOCK_K={bk:<5} warps={w} SPLIT_K={splits}",
                        shared, (-(-n // bn), 1, splits), split_args, bn, bk, w))
    build_all(configs)
    results = []
    for label, fn, grid, fargs, bn, bk, w in configs:
        time_config(results, lambda: fn[grid](*fargs, BLOCK_N=bn, BLOCK_K=bk, num_warps=w,
                                               num_stages=3), name, label, cold=True)
    print_best(f"{name}: N={n} K={k} {flags} B stored [K, N], {nbytes / 1e6:.1f} MB, cold",
               results, nbytes, best=12)


def epilogue(flags) -> Stages:
    """The epilogue stages the flags ask for, named as a plan's product names them: act(G) * U
    of paired halves, then cap * tanh(x / cap)."""
    stages, attrs, values = [], [], []
    if flags.get("act"):
        stages.append(Stage("glu", (), (("act", flags["act"]),), 0, True))
        attrs.append({"act": flags["act"]})
    if flags.get("softcap"):
        stages.append(Stage("softcap", (), (("cap", 30.0),)))
        attrs.append({"cap": "cap"})
        values.append(("cap", 30.0))
    return Stages(stages, {}, values, attrs)


def fits(n, flags, bn) -> bool:
    """A column tile of a product read in parts lies in one part."""
    return flags.get("act") is not None or not any(w % bn for w in part_widths(n, flags)[:-1])


def build_all(configs) -> None:
    """Compiles the configurations' kernels on a thread pool (one thread per kernel object
    and tile) before any is timed."""
    from concurrent.futures import ThreadPoolExecutor

    seen = {}
    for _, fn, grid, fargs, bn, bk, w in configs:
        seen.setdefault((id(fn), bn, bk, w), (fn, grid, fargs, bn, bk, w))

    def build(c):
        fn, grid, fargs, bn, bk, w = c
        try:
            fn.warmup(*fargs, grid=grid, BLOCK_N=bn, BLOCK_K=bk, num_warps=w, num_stages=3)
        except Exception:  # noqa: BLE001 - the timing reports it
            pass

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(build, seen.values()))


if __name__ == "__main__":
    sys.exit(main())
