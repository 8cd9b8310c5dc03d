"""The pipeline, one function per stage: a graph -> an optimized plan -> kernels bound to weights.

    graph = models.build(config, seq_len)              models/
    plan, report = optimize_graph(graph, setup)        compiler/ and rewrites/: the e-graph
    model = bind(plan, report, weights, setup)         codegen/ and runtime/: the kernels

`compile_graph` runs the last two; `meganeura.compile`, `from_pretrained`, generation and the
command line all come through these functions. A `Setup` holds what every stage needs: the
device, the plan dtype, the cost profile the extractor prices with, the kernel cache and the
debug channels (`egraph`, `plan`, `kernels`, `timing`), which print what each stage made.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import __version__, rewrites
from .codegen import Target, kernel_for
from .codegen.cache import KernelCache, interpreter_active, interpreter_mismatch
from .compiler.cost import CPU_INTERPRETER, H200, PROFILES, CostModel, DeviceProfile
from .compiler.graph import Graph
from .compiler.optimize import OptimizeReport, optimize
from .compiler.plan import Plan
from .compiler.report import plan_text
from .errors import MeganeuraError, WeightsError
from .runtime.compiled import CompiledModel

DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16"}
DTYPES = {name: dtype for dtype, name in DTYPE_NAMES.items()}
DEBUG_CHANNELS = ("egraph", "plan", "kernels", "timing")


@dataclass(frozen=True)
class Setup:
    """Where and how a plan is made and run."""

    device: torch.device
    dtype: torch.dtype
    profile: DeviceProfile
    cache_dir: Path | None = None  # kernel sources (default: ~/.cache/meganeura/kernels)
    debug: frozenset = frozenset()  # of DEBUG_CHANNELS
    memory_price: float = 0.0  # seconds per byte stored (CostModel.memory_price); training's
    fp32_products: bool = False  # CostModel.fp32_products; training's

    @property
    def dtype_name(self) -> str:
        return DTYPE_NAMES[self.dtype]

    @property
    def cost(self) -> CostModel:
        return CostModel(self.profile, self.dtype_name, self.memory_price,
                         self.fp32_products)

    def kernel_cache(self) -> KernelCache:
        return KernelCache(self.cache_dir, f"meganeura {__version__}")


@dataclass
class CompileReport:
    optimize: OptimizeReport
    plan: Plan
    profile: DeviceProfile
    seconds: dict = field(default_factory=dict)
    kernels: list = field(default_factory=list)  # (node id, archetype, variant) per launch


def setup(device=None, dtype=None, profile=None, cache_dir=None, debug=None,
          run: bool = True) -> Setup:
    """Fills in defaults and checks each: device cuda (when available) or cpu; dtype bf16 on
    cuda, fp32 on cpu; the profile a DeviceProfile or its name (default h200 on cuda, the
    interpreter's on cpu); debug a set of channels or their comma-separated names. Left out,
    cache_dir and debug are read from MEGANEURA_CACHE_DIR and MEGANEURA_DEBUG, for the
    library and the command line alike.

    run: the plans will run here, so what running needs is checked now, before any work:
    the device exists, the CPU has Triton's interpreter (TRITON_INTERPRET=1 before triton
    was imported) and CUDA has not, the kernel cache is a directory (read-only is fine).
    run=False makes plans to inspect or emit, for any device on any machine: the device
    defaults to cuda when the dtype is bf16 or the profile a GPU's."""
    if isinstance(profile, str):
        if profile not in PROFILES:
            raise MeganeuraError(f"unknown profile {profile!r} (known: {', '.join(PROFILES)})")
        profile = PROFILES[profile]
    if profile is not None and not isinstance(profile, DeviceProfile):
        raise MeganeuraError(f"profile must be a DeviceProfile or one of {', '.join(PROFILES)}, "
                             f"got {type(profile).__name__}")
    if isinstance(dtype, str):
        dtype = DTYPES.get(dtype, dtype)
    if device is None:
        gpu_plan = not run and (dtype == torch.bfloat16 or
                                (profile is not None and profile is not CPU_INTERPRETER))
        device = "cuda" if torch.cuda.is_available() or gpu_plan else "cpu"
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise MeganeuraError(f"device must be cuda or cpu, got {device!r}") from None
    if device.type not in ("cuda", "cpu"):
        raise MeganeuraError(f"device must be cuda or cpu, got {device}")
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if dtype not in DTYPE_NAMES:
        raise MeganeuraError(f"dtype must be torch.float32 or torch.bfloat16, got {dtype}")
    profile = profile or (H200 if device.type == "cuda" else CPU_INTERPRETER)
    if cache_dir is None and os.environ.get("MEGANEURA_CACHE_DIR"):
        cache_dir = os.environ["MEGANEURA_CACHE_DIR"]
    if debug is None and os.environ.get("MEGANEURA_DEBUG"):
        chosen = debug_channels(os.environ["MEGANEURA_DEBUG"], "MEGANEURA_DEBUG")
    else:
        chosen = debug_channels(debug)
    s = Setup(device, dtype, profile, Path(cache_dir) if cache_dir else None, chosen)
    if run:
        check_runnable(s)
    return s


def check_runnable(s: Setup) -> None:
    """What running plans on s.device needs, checked before any work (MeganeuraError)."""
    if s.device.type == "cuda" and not torch.cuda.is_available():
        raise MeganeuraError("device cuda: CUDA is not available on this machine")
    if s.device.type == "cuda" and s.device.index is not None and \
            s.device.index >= torch.cuda.device_count():
        raise MeganeuraError(f"device {s.device}: this machine has {torch.cuda.device_count()} "
                             f"CUDA device(s)")
    if s.device.type == "cpu" and s.dtype != torch.float32:
        # Triton's interpreter computes bf16 dot products wrong (near-uniform logits, no error)
        raise MeganeuraError("bf16 runs on CUDA only: on the CPU, Triton's interpreter computes "
                             "bf16 matrix products wrong; use fp32 there (the default)")
    interpreted = s.device.type == "cpu"
    if interpreted != interpreter_active():
        raise MeganeuraError(interpreter_mismatch(interpreted))
    s.kernel_cache().check()


def debug_channels(debug, source: str = "debug") -> frozenset:
    """A set of debug channels from None, a comma-separated string or an iterable of names
    (`source`: where they were given, for the message naming an unknown one)."""
    if not debug:
        return frozenset()
    names = debug.split(",") if isinstance(debug, str) else list(debug)
    chosen = frozenset(n.strip() for n in names if isinstance(n, str) and n.strip())
    unknown = sorted(chosen - set(DEBUG_CHANNELS)) + [repr(n) for n in names
                                                      if not isinstance(n, str)]
    if unknown:
        raise MeganeuraError(f"unknown debug channel {unknown[0]} in {source} (known: "
                             f"{', '.join(DEBUG_CHANNELS)})")
    return chosen


def optimize_graph(graph: Graph, s: Setup | CostModel, families=None, keep_egglog: bool = False,
                   local_search: bool = True) -> tuple[Plan, OptimizeReport]:
    """The e-graph stage: blocks -> saturation with the rewrite families (default: all) ->
    cost-based extraction -> plan, priced by the Setup's cost model (or the CostModel given).
    Prints the egglog programs and the plan on those debug channels."""
    if not isinstance(graph, Graph):
        raise MeganeuraError(f"graph must be a meganeura Graph, got {type(graph).__name__}")
    cost, debug = (s, frozenset()) if isinstance(s, CostModel) else (s.cost, s.debug)
    plan, report = optimize(graph, cost, rewrites.schedule(families),
                            keep_egglog=keep_egglog or "egraph" in debug,
                            local_search=local_search)
    if "egraph" in debug:
        for k, t in enumerate(report.templates):
            print(f"--- egglog program of template {k}\n{t.egglog}")
    if "plan" in debug:
        print("--- plan\n" + plan_text(plan))
    return plan, report


def bind(plan: Plan, report: OptimizeReport, weights: dict, s: Setup, cuda_graph: bool = True,
         optimize_s: float = 0.0, state: dict | None = None,
         dependent_launches: bool = False) -> CompiledModel:
    """The kernel stage: generates the plan's kernels and binds them to weights, state (KV
    caches) and buffers on the device. dependent_launches: on a Hopper (or later) GPU, each
    kernel is launched while the one before it finishes (see codegen.common.dependent_launch)."""
    check_weights_dict(weights)
    t1 = time.perf_counter()
    cache = s.kernel_cache()
    cache.check()
    pdl = dependent_launches and s.device.type == "cuda" and \
        torch.cuda.get_device_capability(s.device)[0] >= 9
    model = CompiledModel(plan, weights, Target(s.device, s.dtype, pdl=pdl), cache, cuda_graph,
                          state, time_launches="timing" in s.debug)
    t2 = time.perf_counter()
    model.report = CompileReport(
        report, plan, s.profile,
        {"optimize": optimize_s, "load+codegen": t2 - t1, **model.seconds},
        [(launch.node, launch.spec.archetype, launch.spec.variant) for launch in model.launches])
    if "kernels" in s.debug:
        for src in dict.fromkeys(model.kernel_sources()):
            print("--- kernel\n" + src)
    return model


def compile_graph(graph: Graph, weights: dict, s: Setup, cuda_graph: bool = True,
                  state: dict | None = None, dependent_launches: bool = False,
                  families=None, keep_plan: bool = False) -> CompiledModel:
    """optimize_graph, then bind: a graph and its weights (graph layout) as a compiled model.
    keep_plan: the extracted plan is kept in the kernel cache directory and read from there
    by the next process that optimizes the same graph (see cached_plan)."""
    check_weights_dict(weights)
    t0 = time.perf_counter()
    if keep_plan and families is None:
        plan, report = cached_plan(graph, s)
    else:
        plan, report = optimize_graph(graph, s, families)
    return bind(plan, report, weights, s, cuda_graph, time.perf_counter() - t0, state,
                dependent_launches)


_CODE_HASH: list[str] = []


def _code_hash() -> str:
    """A hash of meganeura's own sources: a plan made by other code is not reused."""
    if not _CODE_HASH:
        h = hashlib.sha256()
        root = Path(__file__).resolve().parent
        for path in sorted(root.rglob("*.py")):
            h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
        _CODE_HASH.append(h.hexdigest())
    return _CODE_HASH[0]


def plan_key(graph: Graph, s: Setup) -> str:
    """What an extracted plan depends on: the graph (ops, wiring, attributes, shapes, names),
    the cost model (profile, dtype, memory price, fp32 products), and the code that
    optimizes it."""
    import sys

    import egglog

    versions = (__version__, getattr(egglog, "__version__", "?"), torch.__version__,
                sys.version.split()[0])
    h = hashlib.sha256(f"{versions}\n{_code_hash()}\n{s.profile!r}\n{s.dtype_name}\n"
                       f"{s.memory_price!r}\n{s.fp32_products}\n".encode())
    for n in graph.nodes:
        h.update(f"{n.op}|{n.inputs}|{n.attrs!r}|{n.shape}|{n.dtype}|{n.name}|{n.block}\n"
                 .encode())
    h.update(f"{graph.outputs}|{graph.effects}".encode())
    return h.hexdigest()[:40]


def cached_plan(graph: Graph, s: Setup) -> tuple[Plan, OptimizeReport]:
    """optimize_graph, its plan kept in the kernel cache directory (`p_<key>.bin`, written
    atomically after its hash): a later process making the same graph with the same code
    and cost model reads the plan instead of saturating the e-graph again (a generation's
    plans, in a fresh process: seconds to milliseconds). The report of a plan read so has
    no e-graph statistics. A plan is unpickled: only a file of this user that no one else
    may write is read (a shared cache's plans from others are made again)."""
    cache = s.kernel_cache()
    key = plan_key(graph, s)
    if "egraph" not in s.debug:
        t = time.perf_counter()
        blob = cache.get_blob(key, owned=True)
        if blob is not None:
            try:
                plan = pickle.loads(blob)  # noqa: S301 (this user's own file, see above)
            except Exception:  # noqa: BLE001 (an unreadable plan is made again)
                plan = None
            if isinstance(plan, Plan):
                if "plan" in s.debug:
                    print("--- plan\n" + plan_text(plan))
                return plan, OptimizeReport([], {"read": time.perf_counter() - t},
                                            plan.estimated_time, plan.estimated_time)
    plan, report = optimize_graph(graph, s)
    cache.put_blob(key, pickle.dumps(plan))
    return plan, report


def check_weights_dict(weights) -> None:
    if not isinstance(weights, dict):
        raise WeightsError(f"weights must be a dict of parameter name -> torch.Tensor, got "
                           f"{type(weights).__name__}")


def kernel_sources(plan: Plan, s: Setup) -> list[str]:
    """The source of every kernel the plan launches, without touching weights (nor a GPU:
    a CUDA plan inspected on a machine without one takes its SM count from the profile)."""
    sms = None
    if s.device.type == "cuda" and not torch.cuda.is_available():
        sms = s.profile.sms or H200.sms
    target = Target(s.device, s.dtype, sms=sms)
    return [k.source for i in plan.launches
            for k in kernel_for(plan.graph[i], plan.graph, target).chain()]
