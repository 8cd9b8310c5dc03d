"""CompiledModel: the plan's kernels bound to device buffers, run as one callable.

At load: weights go to the device in the plan dtype, load-time nodes (weight
concatenation, folded norm weights) are computed once, every intermediate buffer is
allocated once (reused by liveness), and each launch becomes a prepared call with
its tensors, strides and constexprs fixed. A call validates the token ids before any
kernel runs, copies them into the input buffer and launches the plan in order; on
CUDA the launches are captured once and replayed as one CUDA graph.

A call returns a copy of the logits, made under the model's lock, which the caller owns;
`copy=False` returns the output buffer itself, which the next call overwrites, as with any
CUDA-graph runtime. A forward's inputs share that memory (the token ids are read by the
first launch, the logits written by the last): pass inputs of their own, not views of a
previous uncopied result.
"""

from __future__ import annotations

import math
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from ..codegen import KernelSpec, Target, kernel_for
from ..codegen.cache import KernelCache
from ..compiler.kernels import input_bounds, updated_input
from ..compiler.ops import OPS
from ..compiler.plan import Plan
from ..errors import InputError, MeganeuraError, WeightsError
from .buffers import plan_buffers
from ..compiler.formulas import rope_frequencies
from .reference import check_float_input, check_token_ids, evaluate


@dataclass
class Launch:
    node: int
    spec: KernelSpec
    run: object  # zero-argument callable
    builds: list  # (kernel, zero-argument build of the kernel for this launch's arguments)


class CompiledModel:
    def __init__(self, plan: Plan, weights: dict, target: Target, cache: KernelCache,
                 cuda_graph: bool = True, state: dict | None = None,
                 time_launches: bool = False, inputs_apart: bool = False):
        """state: name -> tensor for the plan's state leaves (KV caches), used in place.
        time_launches: after the first call, each launch is timed on its own and printed
        (the `timing` debug channel). inputs_apart: the inputs in buffers of their own even
        for a forward (a benchmark replaying launches without copying the inputs in)."""
        t0 = time.perf_counter()
        self.plan, self.target, self.cache = plan, target, cache
        g = plan.graph
        self.inputs = g.inputs()
        self.bounds = _bounds_of_inputs(g)
        self.tensors: dict[int, torch.Tensor] = {}
        self._tables: dict[tuple, torch.Tensor] = {}
        self._scratches: dict[tuple, torch.Tensor] = {}
        self.specs = {nid: kernel_for(g[nid], g, target) for nid in plan.launches}
        if target.warps:
            for spec in self.specs.values():
                for k in spec.chain():
                    k.num_warps = target.warps
        # a forward's inputs share the arena (the logits' memory until the last product);
        # a plan with state keeps them apart: a step replayed without its input copy (a
        # benchmark) then still reads valid ids and positions
        in_arena = not g.states() and not inputs_apart
        buffers = plan_buffers(plan, torch.finfo(target.dtype).bits // 8, inputs=in_arena)
        check_memory(self._bytes_needed(buffers, in_arena), target.device)
        self._load_weights(weights)
        t1 = time.perf_counter()
        self.buffer_bytes = buffers.total
        self._inputs_in_arena = in_arena
        arena = buffers.allocate(target.device)
        wide = plan.fp32_stream
        for n in self.inputs:
            dtype = (torch.int64 if n.dtype == "u32" else torch.float32 if n.id in wide
                     else target.dtype)
            if in_arena:
                self.tensors[n.id] = buffers.view(arena, n.id, n.shape, dtype)
            else:
                self.tensors[n.id] = torch.zeros(n.shape, dtype=dtype, device=target.device)
        self._bind_state(state or {})
        for nid in sorted(plan.launches + plan.views):
            n = g[nid]
            a, base = n.attrs, self.tensors.get(n.inputs[0]) if n.inputs else None
            if n.op == "slice_cols":
                self.tensors[nid] = base[:, a["start"]:a["start"] + a["width"]]
            elif n.op == "slice_rows":
                self.tensors[nid] = base[a["start"]:a["start"] + a["count"]]
            elif updated_input(n) is not None:  # a cache write stands for the state it updates
                self.tensors[nid] = self.tensors[n.inputs[updated_input(n)]]
            else:
                self.tensors[nid] = buffers.view(arena, nid, n.shape, target.dtype)
        self.launches = [self._bind(nid) for nid in plan.launches]
        self.outputs = [self.tensors[o] for o in g.outputs]
        self.seconds = {"load": t1 - t0, "bind": time.perf_counter() - t1}
        self._graph = None
        self._built = False
        self.persistent = None  # the plan as one persistent kernel (use_persistent)
        self._use_cuda_graph = cuda_graph and target.device.type == "cuda"
        self._lock = threading.Lock()
        self.progress = None  # f(launches done, launches) after each launch run one by one
        self._time_launches = time_launches

    # ---- loading ------------------------------------------------------------------------

    def _bytes_needed(self, buffers, inputs_in_arena: bool) -> int:
        """Device bytes the model allocates beyond the weights: the buffer arena, the inputs
        (unless in the arena), the RoPE frequency tables and the constants made at load
        that a kernel reads."""
        g = self.plan.graph
        total = buffers.total
        total += 0 if inputs_in_arena else sum(8 * math.prod(n.shape) for n in self.inputs)
        tables = {x for spec in self._all_specs() for kind, x in spec.args if kind == "rope_freq"}
        total += sum(8 * (hd // 2 + 2) for hd, *_ in tables)
        scratch = {x for spec in self._all_specs() for kind, x in spec.args if kind == "scratch"}
        total += sum(self._scratch_dtype(dt).itemsize * math.prod(shape)
                     for _, shape, dt in scratch)
        read = {x for spec in self._all_specs() for kind, x in spec.args if kind == "node"}
        total += sum(8 * math.prod(g[i].shape) for i in self.plan.load_time
                     if OPS[g[i].op].kind == "constant" and i in read)
        return total

    def _bind_state(self, state: dict) -> None:
        """The state leaves (KV caches) bound to the caller's tensors, used in place."""
        dev, dt = self.target.device, self.target.dtype
        for n in self.plan.graph.states():
            t = state.get(n.name)
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != n.shape or t.dtype != dt \
                    or not _same_device(t.device, dev) or not t.is_contiguous():
                got = (f"{list(t.shape)} {t.dtype} on {t.device}" if isinstance(t, torch.Tensor)
                       else "nothing")
                raise InputError(f"state '{n.name}' must be a contiguous {list(n.shape)} {dt} "
                                 f"tensor on {dev}, got {got}")
            self.tensors[n.id] = t

    def _load_weights(self, weights: dict) -> None:
        """Weights onto the device; the load-time nodes a kernel reads (and only those:
        a matmul that reads its weights in parts needs no concatenated copy)."""
        g, dev, dt = self.plan.graph, self.target.device, self.target.dtype
        read = set()  # what the kernels (and views) read
        for spec in self._all_specs():
            for kind, x in spec.args:
                if kind in ("node", "stride"):
                    read.add(x)
                elif kind == "desc":
                    read.add(x[0])
        for nid in self.plan.views:
            read.update(g[nid].inputs)
        needed = set(read)
        for nid in reversed(self.plan.load_time):  # what the needed load-time nodes are made of
            if nid in needed:
                needed.update(self._concat_leaves(nid))
        for p in g.parameters():
            if p.name not in weights:
                raise WeightsError(f"weight '{p.name}' is missing")
            w = weights[p.name]
            if not isinstance(w, torch.Tensor):
                raise WeightsError(f"weight '{p.name}' must be a torch.Tensor, got "
                                   f"{type(w).__module__}.{type(w).__name__}")
            if tuple(w.shape) != p.shape:
                raise WeightsError(f"weight '{p.name}' has shape {list(w.shape)}, expected "
                                   f"{list(p.shape)}")
            if not w.is_floating_point():
                raise WeightsError(f"weight '{p.name}' must hold floats, got {w.dtype}")
            if not all_finite(w):
                raise WeightsError(f"weight '{p.name}' holds NaN or infinity")
            if p.id in needed:
                self.tensors[p.id] = w.to(device=dev, dtype=dt)
        for nid in self.plan.load_time:  # parameter-only subterms, once
            if nid in needed:
                n = g[nid]
                if n.op == "concat_cols":  # a whole tree in one copy: no partial concatenations
                    parts = [self.tensors[i] for i in self._concat_leaves(nid)]
                    self.tensors[nid] = torch.cat(parts, dim=1)
                else:
                    self.tensors[nid] = evaluate(n, *(self.tensors[i] for i in n.inputs)).to(dev)
        for nid in list(self.tensors):  # keep only what the kernels read
            if nid not in read:
                del self.tensors[nid]
        for nid, t in self.tensors.items():  # tensor descriptors need 16-byte aligned rows
            t = t.contiguous()
            self.tensors[nid] = t.clone() if t.data_ptr() % 16 else t

    def refresh_weights(self, weights: dict) -> None:
        """After the weights changed in place (a training step): each tensor the kernels read
        that is not the caller's own (a load-time concatenation or product of weights, or a
        weight moved to the plan's device or dtype) is computed again into its buffer, so
        the buffers, the bound launches and the arena stay as they are."""
        g, dev, dt = self.plan.graph, self.target.device, self.target.dtype

        def value(nid: int) -> torch.Tensor:  # a weight-only subterm, computed afresh
            n = g[nid]
            if n.op == "parameter":
                return weights[n.name].to(device=dev, dtype=dt)
            return evaluate(n, *(value(i) for i in n.inputs)).to(dev)

        for nid in [p.id for p in g.parameters()] + self.plan.load_time:
            held, n = self.tensors.get(nid), g[nid]
            if held is None or (n.op == "parameter" and held is weights[n.name]):
                continue  # not read, or read in place (it changed with the weights)
            if n.op == "parameter":
                held.copy_(weights[n.name])
            elif n.op == "concat_cols":  # straight into its buffer, part by part
                at = 0
                for i in self._concat_leaves(nid):
                    part = value(i)
                    held[:, at:at + part.shape[1]].copy_(part)
                    at += part.shape[1]
            else:
                held.copy_(value(nid))

    def _concat_leaves(self, nid: int) -> list[int]:
        """The operands of a load-time concat_cols tree, left to right (else the inputs)."""
        g = self.plan.graph
        if g[nid].op != "concat_cols":
            return list(g[nid].inputs)
        return [x for i in g[nid].inputs
                for x in (self._concat_leaves(i) if g[i].op == "concat_cols" else [i])]

    def _all_specs(self) -> list[KernelSpec]:
        return [k for spec in self.specs.values() for k in spec.chain()]

    def _bind(self, nid: int) -> Launch:
        prepared = [self._prepare(k) for k in self.specs[nid].chain()]
        runs = [run for run, _ in prepared]
        builds = [build for _, build in prepared]
        if len(runs) == 1:
            return Launch(nid, self.specs[nid], runs[0], builds)
        return Launch(nid, self.specs[nid], lambda: [run() for run in runs], builds)

    def _prepare(self, spec: KernelSpec):
        """The zero-argument launch of one kernel, its tensors, strides and constants fixed,
        and (kernel, zero-argument build for those arguments without a launch)."""
        g = self.plan.graph
        fn = self.cache.load(spec.source, spec.entry, self.target.interpreted)
        args = []
        for kind, x in spec.args:
            if kind == "node":
                t = self.tensors[x]
                if t.dim() == 2 and t.stride(1) != 1:
                    raise AssertionError(f"{g.label(x)}: kernels need unit column stride")
                args.append(t)
            elif kind == "stride":
                args.append(self.tensors[x].stride(0))
            elif kind == "desc":  # a tensor descriptor over the node's tensor, one tile's block
                args.append(_descriptor(self.tensors[x[0]], x[1], g.label(x[0])))
            elif kind == "rope_freq":
                args.append(self.rope_table(*x))
            elif kind == "scratch":  # zeroed once; kernels leave counters as they found them
                args.append(self.scratch(*x))
            else:
                args.append(x)
        launcher = fn[spec.grid]
        kw = dict(spec.constexprs, num_warps=spec.num_warps, num_stages=spec.num_stages)
        if spec.pdl:
            kw["launch_pdl"] = True
        if spec.zeroed is not None:  # a sum by atomics starts from zeros each run
            out = self.tensors[spec.zeroed]
            return (lambda: (out.zero_(), launcher(*args, **kw)),
                    (fn, lambda: fn.warmup(*args, grid=spec.grid, **kw)))
        return (lambda: launcher(*args, **kw),
                (fn, lambda: fn.warmup(*args, grid=spec.grid, **kw)))

    def scratch(self, name: str, shape: tuple, dtype: str) -> torch.Tensor:
        """A kernel's working buffer, shared by every launch that asks the same one (launches
        run in order)."""
        key = (name, shape, dtype)
        if key not in self._scratches:
            self._scratches[key] = torch.zeros(shape, dtype=self._scratch_dtype(dtype),
                                               device=self.target.device)
        return self._scratches[key]

    def _scratch_dtype(self, dtype: str) -> torch.dtype:
        """A scratch buffer's element type: fp32, i32, or the plan's ("plan")."""
        return {"fp32": torch.float32, "i32": torch.int32, "plan": self.target.dtype}[dtype]

    def rope_table(self, head_dim: int, theta: float, rotary: int, scaling) -> torch.Tensor:
        """The RoPE kernels' float64 frequencies (formulas.rope_frequencies), made once."""
        key = (head_dim, theta, rotary, scaling)
        if key not in self._tables:
            self._tables[key] = rope_frequencies(theta, head_dim, rotary, scaling).to(
                self.target.device)
        return self._tables[key]

    # ---- running ------------------------------------------------------------------------

    def check_inputs(self, *args) -> None:
        if len(args) != len(self.inputs):
            raise InputError(f"expected {len(self.inputs)} input(s) "
                             f"({', '.join(n.name for n in self.inputs)}), got {len(args)}")
        for n, x in zip(self.inputs, args):
            if n.dtype == "u32":
                check_token_ids(n, x, None)
            else:
                check_float_input(n, x)
            if not _same_device(x.device, self.target.device):
                raise InputError(f"input '{n.name}' is on {x.device}, the model runs on "
                                 f"{self.target.device}")
            if n.dtype == "u32" and x.numel() and n.id in self.bounds:
                lo, hi = torch.aminmax(x)  # one sync: no id may reach past a table it indexes
                lo, hi, (bound, what) = int(lo), int(hi), self.bounds[n.id]
                if lo < 0 or hi >= bound:
                    raise InputError(f"input '{n.name}' holds {what} {lo if lo < 0 else hi}, "
                                     f"outside [0, {bound})")

    def use_persistent(self, megakernel) -> None:
        """From now on the plan's kernels run as one persistent kernel (codegen/megakernel.py's
        Megakernel over this model's launches; None: the launches again); the CUDA graph is
        captured anew at the next call."""
        self.persistent = megakernel
        self._graph = None

    def run_kernels(self) -> None:
        if self.persistent is not None:
            self.persistent.run()
            return
        self.build_kernels()
        n = len(self.launches)
        for k, launch in enumerate(self.launches):
            launch.run()
            if self.progress is not None:
                self.progress(k + 1, n)

    def __call__(self, *args, copy: bool = True) -> torch.Tensor:
        """logits = model(token_ids), a tensor the caller owns: a copy of the output buffer,
        made before another call (from any thread) may start. copy=False is the no-copy fast
        path for loops and benchmarks: the result is the output buffer itself, which the
        next call overwrites. Calls from several threads run one at a time."""
        with self._lock:
            out = self._call(*args)
            if copy:
                out = out.clone() if isinstance(out, torch.Tensor) else tuple(o.clone()
                                                                              for o in out)
            return out

    def run_trusted(self, *args) -> torch.Tensor:
        """A call whose inputs the caller vouches for (the generation loop's own sampled ids
        and positions, already on the device): no value check, so no wait for the device."""
        with self._lock:
            return self._launch(args)

    def _call(self, *args) -> torch.Tensor:
        self.check_inputs(*args)
        if self._time_launches:
            self._time_launches = False
            self._launch(args)
            for line in self.launch_times(args):
                print(line)
        return self._launch(args)

    def launch_times(self, args) -> list[str]:
        """Each launch run and timed on its own after the inputs are copied in (a forward's
        ids share the arena with what later launches write), one line each."""
        lines = []
        g = self.plan.graph
        for launch in self.launches:
            self._copy_inputs(args)
            t = timed(launch.run, self.target.device)
            n = g[launch.node]
            lines.append(f"  timing {t * 1e3:8.3f} ms  estimated {self.plan.estimate[n.id] * 1e3:8.3f}"
                         f" ms  {launch.spec.archetype} {launch.spec.variant} {list(n.shape)}")
        return lines

    def load_inputs(self, *args) -> None:
        """Checks the inputs and copies them into the model's input buffers, running nothing:
        what timing one launch on its own needs first (a forward's token ids share the arena
        with buffers that later launches write)."""
        with self._lock:
            self.check_inputs(*args)
            self._copy_inputs(args)

    def _copy_inputs(self, args) -> None:
        for n, x in zip(self.inputs, args):
            self.tensors[n.id].copy_(x)

    def _launch(self, args) -> torch.Tensor:
        if self._use_cuda_graph and self._graph is None and self._inputs_in_arena:
            # the capture's warm-up run reads the call's inputs (the arena's bytes before
            # them are no token ids or labels: an index past its table faults) and may
            # overwrite them (a forward's token ids share the arena with the logits): they
            # are copied in again below. A plan with state captures after the copy: its
            # warm-up run writes the caches, at the call's positions
            self._copy_inputs(args)
            self._capture()
        self._copy_inputs(args)
        if self._use_cuda_graph:
            if self._graph is None:
                self._capture()
            self._graph.replay()
        else:
            self.run_kernels()
        return self.outputs[0] if len(self.outputs) == 1 else tuple(self.outputs)

    def build_kernels(self, threads: int | None = None) -> None:
        """Builds every kernel of the plan for CUDA before the first launch, several at once
        (Triton's compiler passes and ptxas leave the interpreter lock): a cold start waits
        for the slowest thread, not for the sum. Each kernel's variants build on one thread;
        a build that fails here is left to its launch, which reports it."""
        if self.target.interpreted or self.target.device.type != "cuda" or self._built:
            return
        self._built = True
        per_kernel: dict[int, list] = {}
        for launch in self.launches:
            for fn, build in launch.builds:
                per_kernel.setdefault(id(fn), []).append(build)
        if len(per_kernel) < 2:
            return
        device = self.target.device.index
        if device is None:
            device = torch.cuda.current_device()

        def build_all(builds):
            with torch.cuda.device(device):
                for build in builds:
                    try:
                        build()
                    except Exception:  # noqa: BLE001 - the launch reports it
                        continue

        from triton.runtime import driver  # made here, not first by several threads at once
        driver.active.get_current_device()

        workers = threads or min(len(per_kernel), max(1, (os.cpu_count() or 2)))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(build_all, per_kernel.values()))

    def _capture(self) -> None:
        self.build_kernels()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self.run_kernels()  # every kernel built and run once before capture
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.run_kernels()
        self._graph = graph

    def kernel_sources(self) -> list[str]:
        return [k.source for launch in self.launches for k in launch.spec.chain()]


def timed(fn, device: torch.device) -> float:
    """Seconds of one call, the device synchronized after it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def check_memory(needed: int, device: torch.device,
                 what: str = "the plan needs {} for its buffers, tables and inputs") -> None:
    """MeganeuraError when `needed` bytes exceed what the device has free (the host's
    available memory for the CPU), before anything is allocated. `what` says who needs them
    ({} is replaced by the amount)."""
    free = free_bytes(device)
    if free is not None and needed > free:
        raise MeganeuraError(what.format(f"{needed / 2**30:.2f} GiB of {device.type} memory")
                             + f"; {free / 2**30:.2f} GiB is free")


def free_bytes(device: torch.device) -> int | None:
    """Bytes a plan may still allocate on `device`: free on the GPU plus what torch's
    allocator holds unused; the host's available memory for the CPU (None: unknown)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device) - \
            torch.cuda.memory_allocated(device)
    return _host_available()


def _host_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def all_finite(t: torch.Tensor, chunk: int = 1 << 26) -> bool:
    """No NaN or infinity in t, checked a chunk at a time (no full-size temporary)."""
    flat = t.reshape(-1)
    return all(bool(torch.isfinite(flat[i:i + chunk]).all()) for i in range(0, flat.numel(), chunk))


def _same_device(a: torch.device, b: torch.device) -> bool:
    if a.type != b.type:
        return False
    if a.type != "cuda":
        return True
    current = torch.cuda.current_device()
    return (a.index if a.index is not None else current) == (b.index if b.index is not None
                                                              else current)


def _bounds_of_inputs(g) -> dict[int, tuple[int, str]]:
    """Integer inputs -> (exclusive bound, what they are): token ids index every table they
    gather from; positions stay below the model's `limit` where RoPE reads them. A cache write
    takes any position."""
    bounds: dict[int, tuple[int, str]] = {}
    inputs = {n.id for n in g.inputs()}
    for node in g.nodes:
        for pos, b in input_bounds(g, node).items():
            i = node.inputs[pos]
            if i in inputs and (i not in bounds or b[0] < bounds[i][0]):
                bounds[i] = b
    return bounds


def _descriptor(t: torch.Tensor, block: tuple[int, ...], label: str):
    from triton.tools.tensor_descriptor import TensorDescriptor

    if t.data_ptr() % 16 or t.stride(-1) != 1 or any(
            (st * t.element_size()) % 16 for st in t.stride()[:-1]):
        raise AssertionError(f"{label}: a tensor descriptor needs 16-byte aligned rows")
    return TensorDescriptor(t, list(t.shape), list(t.stride()), list(block))
