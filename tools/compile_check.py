"""Compiles every distinct kernel of a plan for sm_90 on this machine (no GPU needed).

    python tools/compile_check.py --model gemma4-4b --seq-len 2048

Triton lowers each kernel to PTX and ptxas assembles it for Hopper; the registers,
shared memory and spills it reports are printed, so a kernel that does not compile,
or spills, is found before any GPU time is spent.
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

from meganeura.codegen import Target, kernel_for
from meganeura.compiler.cost import PROFILES, CostModel
from meganeura.models import MODEL_NAMES, PRESETS, build
from meganeura.compiler.plan import RESIDUAL_OPS
from meganeura.optimize import optimize

TYPES = {torch.bfloat16: "*bf16", torch.float32: "*fp32", torch.int64: "*i64"}


def signature(spec, graph, dtype):
    """Triton type strings of the kernel's runtime arguments, in order."""
    fn_args = []
    for kind, x in spec.args:
        if kind == "node":
            wide = graph[x].op in RESIDUAL_OPS  # the fp32 residual stream
            sig_t = "*i64" if graph[x].dtype == "u32" else TYPES[torch.float32 if wide else dtype]
        elif kind in ("rope_cos", "rope_sin"):
            sig_t = "*fp32"
        elif isinstance(x, float):
            sig_t = "fp32"
        else:
            sig_t = "i32"
        fn_args.append(sig_t)
    return fn_args


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="gemma4-4b")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--profile", default="h200")
    a = ap.parse_args()
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[a.dtype]
    graph = build(PRESETS[MODEL_NAMES[a.model]], a.seq_len)
    plan, _ = optimize(graph, CostModel(PROFILES[a.profile], a.dtype))
    target = Target(torch.device("cuda"), dtype)
    seen = set()
    tmp = Path(tempfile.mkdtemp())
    for nid in plan.launches:
        spec = kernel_for(plan.graph[nid], plan.graph, target)
        types = signature(spec, plan.graph, dtype)
        key = (spec.source, tuple(types), tuple(sorted(spec.constexprs.items())), spec.num_warps)
        if key in seen:
            continue
        seen.add(key)
        path = tmp / f"k{len(seen)}.py"
        path.write_text(spec.source)
        s = importlib.util.spec_from_file_location(path.stem, path)
        mod = importlib.util.module_from_spec(s)
        s.loader.exec_module(mod)
        fn = triton.jit(getattr(mod, spec.entry))
        names = [n for n in fn.arg_names if n not in spec.constexprs]
        sig = dict(zip(names, types))
        sig.update({k: "constexpr" for k in spec.constexprs})
        src = triton.compiler.ASTSource(fn, sig, dict(spec.constexprs))
        k = triton.compile(src, target=GPUTarget("cuda", 90, 128),
                           options=dict(num_warps=spec.num_warps, num_stages=spec.num_stages))
        md = k.metadata
        ptx = k.asm["ptx"]
        print(f"{spec.archetype:10} {spec.variant:34} {str(spec.constexprs):70} "
              f"smem {md.shared:6} wgmma {ptx.count('wgmma.mma_async'):3} "
              f"local-mem {'ld.local' in ptx or 'st.local' in ptx}"
              f"{'  OVER SHARED MEMORY' if md.shared > 232448 else ''}")


if __name__ == "__main__":
    sys.exit(main())
