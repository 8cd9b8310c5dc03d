"""Compiles every distinct kernel of a plan for sm_90 on this machine (no GPU needed).

    python tools/compile_check.py --model gemma4-4b --seq-len 2048
    python tools/compile_check.py --model gemma4-4b gemma4-12b gemma4-27b
    python tools/compile_check.py --persistent --model gemma4-e4b   # the decode megakernel

Triton lowers each kernel to PTX and ptxas assembles it for Hopper; the registers,
shared memory and spills it reports are printed, so a kernel that does not compile,
or spills, is found before any GPU time is spent. Several models: a kernel they share
(the same source, types, tile constants and warps) is compiled and printed once.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime.jit import JITFunction

from meganeura.codegen import Target, kernel_for
from meganeura.compiler.cost import MEMORY_PRICE, PROFILES, CostModel
from meganeura.models import MODEL_NAMES, PRESETS, build
from meganeura.models.kv import Generation
from meganeura.compiler.plan import holds_fp32
from meganeura.pipeline import optimize_graph as optimize

TYPES = {torch.bfloat16: "*bf16", torch.float32: "*fp32", torch.int64: "*i64"}


def signature(spec, graph, dtype):
    """Triton type strings of the kernel's runtime arguments, in order."""
    fn_args = []
    for kind, x in spec.args:
        if kind == "node":
            wide = holds_fp32(graph, x)  # the fp32 residual stream
            sig_t = "*i64" if graph[x].dtype == "u32" else TYPES[torch.float32 if wide else dtype]
        elif kind == "desc":  # a host tensor descriptor: element type and block shape
            nid, block = x
            elem = TYPES[torch.float32 if holds_fp32(graph, nid) else dtype][1:]
            sig_t = f"tensordesc<{elem}[{', '.join(map(str, block))}]>"
        elif kind == "rope_freq":
            sig_t = "*fp64"
        elif kind == "scratch":
            sig_t = {"fp32": "*fp32", "i32": "*i32", "plan": TYPES[dtype]}[x[2]]
        elif isinstance(x, float):
            sig_t = "fp32"
        else:
            sig_t = "i32"
        fn_args.append(sig_t)
    return fn_args


SHARED_LIMIT = 232448  # bytes of shared memory a block may use on sm_90


def train_graph(config, graph, recompute_products: bool = False):
    """The Trainer's joint graph of a model graph: every trained weight but the embeddings."""
    from meganeura.models import family
    from meganeura.training.trainer import training_graph

    names = [n for n, w in family(config).weight_specs(config).items()
             if w.trained and "embed_tokens" not in n]
    return training_graph(graph, names, config, recompute_products)


def check(model: str, seq_len: int, dtype_name: str = "bf16", profile: str = "h200",
          sms: int = 132, capacity: int = 0, seen: set | None = None, chunk: bool = False,
          sequences: int = 1, train: bool = False, fp32_products: bool = False) -> list[dict]:
    """Compiles every distinct kernel of the plan for sm_90; one dict per kernel (none for
    those whose keys are in `seen`, which takes the new ones' keys)."""
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    # capacity > 0: the generation plans over KV caches (seq_len 1: the decode step; chunk:
    # a prefill chunk of seq_len rows; sequences > 1: a batched step of that many rows)
    step = seq_len == 1 or chunk or sequences > 1
    logits = "row" if chunk else ("all" if sequences > 1 else "last")
    generation = Generation(capacity, step, sequences, min(2048, capacity),
                            logits) if capacity else None
    seq_len = sequences if sequences > 1 else seq_len
    config = PRESETS[MODEL_NAMES[model]]
    graph = build(config, seq_len, generation)
    if train:
        graph = train_graph(config, graph)
    # a training plan is priced with the Trainer's exchange rate of memory for time
    price = MEMORY_PRICE if train else 0.0
    plan, _ = optimize(graph, CostModel(PROFILES[profile], dtype_name, memory_price=price,
                                        fp32_products=train and fp32_products))
    # the decode step's kernels are launched as programmatic dependents (generation.py)
    target = Target(torch.device("cuda"), dtype, sms=sms,
                    pdl=bool(capacity) and (seq_len == 1 or sequences > 1))
    return compile_launches(plan.graph, plan.launches, target, seen)


def _row_stride(graph, nid: int) -> int:
    """Elements between rows of the node's tensor: its width, or the width of the tensor a
    view (of columns or of rows) reads."""
    node = graph[nid]
    while node.op in ("slice_cols", "slice_rows"):
        node = graph[node.inputs[0]]
    return node.shape[-1] if node.shape else 1


def _offset(graph, nid: int) -> int:
    """Elements from the start of the tensor a view reads to the view's first element."""
    node, off = graph[nid], 0
    while node.op in ("slice_cols", "slice_rows"):
        start = node.attrs["start"]
        off += start if node.op == "slice_cols" else start * _row_stride(graph, node.id)
        node = graph[node.inputs[0]]
    return off


def divisible(spec, graph, arg_names, names, types) -> dict:
    """The arguments the runtime would specialize as multiples of 16 (Triton does so for
    every pointer and integer argument that is one; pipelining pointer loads hangs on it):
    pointers (the arena places tensors on 256-byte boundaries; a view at its offset) and
    integers whose values the plan knows (tile counts, widths, row strides)."""
    attrs = {}
    for (kind, x), name, sig_t in zip(spec.args, names, types):
        if kind == "desc":
            continue
        if kind == "stride":
            value = _row_stride(graph, x)
        elif kind == "value" and isinstance(x, int) and not isinstance(x, bool):
            value = x
        elif kind == "node" and sig_t.startswith("*"):
            elem = 8 if sig_t == "*i64" else 4 if sig_t == "*fp32" else 2
            value = 16 if _offset(graph, x) * elem % 16 == 0 else 1
        else:
            value = 16 if sig_t.startswith("*") else 1
        if value % 16 == 0:
            attrs[(arg_names.index(name),)] = [["tt.divisibility", 16]]
    return attrs


def compile_launches(graph, launches, target, seen: set | None = None) -> list[dict]:
    """Compiles the kernels of the graph's launches for sm_90, each distinct one once."""
    dtype = target.dtype
    seen = set() if seen is None else seen
    tmp = Path(tempfile.mkdtemp())
    out = []
    specs = [k for nid in launches for k in kernel_for(graph[nid], graph, target).chain()]
    for spec in specs:
        types = signature(spec, graph, dtype)
        key = (spec.source, tuple(types), tuple(sorted(spec.constexprs.items())), spec.num_warps)
        if key in seen:
            continue
        seen.add(key)
        path = tmp / f"k{len(out)}.py"
        path.write_text(spec.source)
        s = importlib.util.spec_from_file_location(path.stem, path)
        mod = importlib.util.module_from_spec(s)
        s.loader.exec_module(mod)
        fn = JITFunction(getattr(mod, spec.entry))  # compiled, also with the interpreter on
        names = [n for n in fn.arg_names if n not in spec.constexprs]
        sig = dict(zip(names, types))
        sig.update({k: "constexpr" for k in spec.constexprs})
        src = triton.compiler.ASTSource(fn, sig, dict(spec.constexprs),
                                        divisible(spec, graph, fn.arg_names, names, types))
        k = triton.compile(src, target=GPUTarget("cuda", 90, 128),
                           options=dict(num_warps=spec.num_warps, num_stages=spec.num_stages))
        ptx = k.asm["ptx"]
        out.append(dict(spec=spec, shared=k.metadata.shared, wgmma=ptx.count("wgmma.mma_async"),
                        local_memory="ld.local" in ptx or "st.local" in ptx))
    return out


def compile_megakernel(path: str) -> dict:
    """Compiles a megakernel source file (codegen/megakernel.py's Megakernel.source) for
    sm_90: its shared memory, whether it spills, and its acquire reads and release bumps."""
    from meganeura.codegen.megakernel import ENTRY, PARAMS

    s = importlib.util.spec_from_file_location("megakernel_check", path)
    mod = importlib.util.module_from_spec(s)
    s.loader.exec_module(mod)
    fn = JITFunction(getattr(mod, ENTRY))
    sig = dict(zip(PARAMS, ("*i64", "*fp32", "*i64", "*i64", "*i64", "*i64", "*i32")))
    if "times_ptr" in fn.arg_names:  # the instrumented build
        sig["times_ptr"] = "*i64"
    k = triton.compile(triton.compiler.ASTSource(fn, sig, {}), target=GPUTarget("cuda", 90, 128),
                       options=dict(num_warps=4, num_stages=1))
    ptx = k.asm["ptx"]
    loads = [line for line in ptx.splitlines() if "ld.global" in line]
    return dict(shared=k.metadata.shared, local_memory="ld.local" in ptx or "st.local" in ptx,
                wide_loads=sum(".v4." in line or ".v2." in line for line in loads),
                loads=len(loads),
                acquire=ptx.count("ld.global.gpu.acquire"),
                release=ptx.count("red.global.gpu.release") + ptx.count("atom.global.gpu.release"))


# compile_check's signature types as the megakernel's table types
TABLE_TYPES = {"*bf16": "tl.bfloat16", "*fp32": "tl.float32", "*i64": "tl.int64",
               "*i32": "tl.int32", "*fp64": "tl.float64", "i32": "int", "fp32": "float"}


def persistent(model: str, capacity: int, profile: str = "h200", sms: int = 132,
               prefetch: bool = False) -> dict:
    """The one-row decode step of `model` (caches of `capacity` positions) as one persistent
    kernel (codegen/megakernel.py), compiled for sm_90: its distinct kernels, launches and
    compile seconds besides compile_megakernel's figures. No weights are made: the table's
    types come from the plan, as the other checks' signatures do."""
    import time

    from meganeura.codegen.megakernel import GRID_COLS, arg_type, distinct_kernels, source

    config = PRESETS[MODEL_NAMES[model]]
    graph = build(config, 1, Generation(capacity, True, 1, min(2048, capacity), "last"))
    plan, _ = optimize(graph, CostModel(PROFILES[profile], "bf16"))
    target = Target(torch.device("cuda"), torch.bfloat16, sms=sms, pdl=True)
    g = plan.graph
    specs = [k for nid in plan.launches for k in kernel_for(g[nid], g, target).chain()]
    types = []
    for spec in specs:
        sig = signature(spec, g, torch.bfloat16)
        if any(t not in TABLE_TYPES for t in sig):
            raise SystemExit(f"{spec.archetype} {spec.variant}: arguments the megakernel does "
                             f"not take ({sig})")
        hinted = []  # what the runtime's table would tell (megakernel.arg_type)
        for (kind, x), t in zip(spec.args, sig):
            base = TABLE_TYPES[t]
            if base == "int":
                hinted.append(arg_type("int", _row_stride(g, x) if kind == "stride" else x))
            elif base == "float":
                hinted.append(base)
            else:  # the arena's tensors on 256-byte boundaries, a view at its offset
                elem = 8 if t == "*i64" else 4 if t in ("*fp32", "*i32") else 2
                off = _offset(g, x) * elem if kind == "node" else 0
                hinted.append(arg_type(base, 16 if off % 16 == 0 else 1))
        types.append(hinted)
    kinds, _ = distinct_kernels(specs, types)
    path = Path(tempfile.mkdtemp()) / "megakernel.py"
    path.write_text(source(kinds, GRID_COLS + max(map(len, types)), prefetch=prefetch))
    t0 = time.perf_counter()
    r = compile_megakernel(str(path))
    return dict(r, kinds=len(kinds), launches=len(specs), seconds=time.perf_counter() - t0)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", nargs="+", default=["gemma4-4b"], choices=sorted(MODEL_NAMES))
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"))
    ap.add_argument("--profile", default="h200", choices=sorted(PROFILES))
    ap.add_argument("--sms", type=int, default=132, help="SMs of the target GPU (H200: 132)")
    ap.add_argument("--capacity", type=int, default=0, help="the generation plans with KV caches "
                    "of this many positions: the prefill of --seq-len tokens, or the decode step "
                    "with --seq-len 1")
    ap.add_argument("--chunk", action="store_true", help="with --capacity: a prefill chunk of "
                    "--seq-len rows at run-time positions")
    ap.add_argument("--sequences", type=int, default=1, help="with --capacity: a decode step "
                    "of this many sequences")
    ap.add_argument("--train", action="store_true", help="the training graph (forward, loss "
                    "and backward; every weight but the embeddings trained) of --seq-len tokens")
    ap.add_argument("--fp32-products", action="store_true", help="with --train: the forward "
                    "products' outputs held in fp32 (Trainer(fp32_products=True))")
    ap.add_argument("--megakernel", metavar="FILE", help="instead: compile this megakernel "
                    "source (codegen/megakernel.py) for sm_90")
    ap.add_argument("--persistent", action="store_true", help="instead: the one-row decode "
                    "step (caches of --capacity positions, default 4096) as one persistent "
                    "kernel, compiled for sm_90")
    ap.add_argument("--prefetch", action="store_true", help="with --persistent: the build whose "
                    "tasks ask L2 for their weights before they wait")
    a = ap.parse_args()
    if a.megakernel or a.persistent:
        results = ([dict(compile_megakernel(a.megakernel), model=a.megakernel)] if a.megakernel
                   else [dict(persistent(m, a.capacity or 4096, a.profile, a.sms, a.prefetch),
                              model=m)
                         for m in a.model])
        for r in results:
            more = (f" ({r['kinds']} kernels for {r['launches']} launches, compiled in "
                    f"{r['seconds']:.1f} s)" if "kinds" in r else "")
            print(f"megakernel {r['model']}: smem {r['shared']} local-mem {r['local_memory']} "
                  f"acquire {r['acquire']} release {r['release']} global loads {r['loads']} "
                  f"({r['wide_loads']} of 8 or 16 bytes){more}")
        return 1 if any(r["shared"] > SHARED_LIMIT for r in results) else 0
    over, seen = 0, set()
    results = [r for m in a.model
               for r in check(m, a.seq_len, a.dtype, a.profile, a.sms, a.capacity, seen,
                              a.chunk, a.sequences, a.train, a.fp32_products)]
    for r in results:
        spec = r["spec"]
        over += r["shared"] > SHARED_LIMIT
        print(f"{spec.archetype:10} {spec.variant:34} {str(spec.constexprs):70} "
              f"smem {r['shared']:6} wgmma {r['wgmma']:3} local-mem {r['local_memory']}"
              f"{'  OVER SHARED MEMORY' if r['shared'] > SHARED_LIMIT else ''}")
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main())
