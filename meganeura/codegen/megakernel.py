"""A compiled plan as one persistent kernel: every launch's kernel a device function, run by
P programs that walk the task lists of a schedule (compiler/schedule.py).

    mk = Megakernel(model, schedule.build(schedule.works_of(model), programs))
    model.load_inputs(*args); mk.run()       # model.outputs hold the plan's results
    model.use_persistent(mk)                 # or: every call of the model runs it

Generation uses it for one-sequence decode steps when `model.generator.megakernel` is set
(a program count; 0: one per SM).

Each distinct kernel (its source, tile constants and argument types) becomes a device
function `task_<k>`: its `tl.program_id(axis)` and `tl.num_programs(axis)` become arguments,
so a task runs a range of the launch's programs one after another. A launch's runtime
arguments come from a table row of 64-bit words (tensor addresses, strides, sizes; floats
from a second, fp32 table), so launches of one kernel share its code. The megakernel:

    for each task of this program's list:
        run the launch's programs first .. first + count - 1 through its kind's function;
            the first waits until every launch the task waits for has counted all its
            tasks (acquire), where the kernel would wait for the kernel before it: after
            asking for the first weights it reads (its dependent-launch gate), else first
        count the task in its launch's counter (release, after a barrier of the program)

The counters are zeroed before each run. Waits are spin loops on acquire reads, so the
programs must all be resident at once: the kernel is refused where its registers and shared
memory would not let the SMs hold them all (check_resident), and on Triton's interpreter,
which runs programs one after another, where a wait would not be met by a program before.
Tensor descriptors are not taken: a one-row decode step's kernels read through pointers,
but a batch's step has tiled products (a norm prologue's gate | up) that read through them.
"""

from __future__ import annotations

import re

import torch

from ..errors import MeganeuraError
from .common import GATE, HEADER, indent

_TYPES = {torch.bfloat16: "tl.bfloat16", torch.float32: "tl.float32", torch.float16: "tl.float16",
          torch.float64: "tl.float64", torch.int64: "tl.int64", torch.int32: "tl.int32"}
ENTRY = "megakernel"
PARAMS = ("table_ptr", "ftable_ptr", "tasks_ptr", "lists_ptr", "starts_ptr", "waits_ptr",
          "counters_ptr")
SPANS = 3  # a task's row: launch, first program, programs, waits' first, waits' end,
# then SPANS spans of weights (address, bytes) it asks L2 for before it waits (prefetch)
TASK_COLS = 5 + 2 * SPANS
TIMES = """    tl.store(times_ptr + 2 * i, t_start)
    tl.store(times_ptr + 2 * i + 1, _clock_(prog))"""
GRID_COLS = 4  # a launch's row starts: kind, grid (3)
WARPS = 4


PREFETCH = "".join(f"    _prefetch_(tl.load(row + {5 + 2 * i}), tl.load(row + {6 + 2 * i}))\n"
                   for i in range(SPANS))
WAIT = "_wait_(mk_waits_, mk_counters_, mk_w_lo_, mk_w_hi_)"
WAIT_FUNCTION = """@triton.jit
def _wait_(waits_ptr, counters_ptr, w_lo, w_hi):
    # until each launch waited for has counted all its tasks (acquire: what they wrote is
    # seen from here on), then every thread of the program after it
    for w in range(w_lo, w_hi):
        dep = tl.load(waits_ptr + 2 * w)
        need = tl.load(waits_ptr + 2 * w + 1).to(tl.int32)
        seen = tl.atomic_add(counters_ptr + dep, 0, sem="acquire", scope="gpu")
        while seen < need:
            seen = tl.atomic_add(counters_ptr + dep, 0, sem="acquire", scope="gpu")
    tl.debug_barrier()
"""


def task_function(spec, name: str) -> tuple[str, list[str], list[str]]:
    """The kernel of `spec` as a device function `name`; (source, its runtime parameters,
    its constexpr parameters), both in order. The task's wait goes where the kernel waits
    for the kernel before it (its dependent-launch gate: weights it reads first are asked
    for before), else first."""
    src = spec.source[len(HEADER):] if spec.source.startswith(HEADER) else spec.source
    head = re.search(rf"def {re.escape(spec.entry)}\((.*?)\):\n", src)
    if head is None:
        raise MeganeuraError(f"{spec.archetype} {spec.variant}: no `def {spec.entry}(...)`")
    params = [p.strip() for p in head.group(1).split(",") if p.strip()]
    runtime = [p for p in params if ":" not in p]
    consts = [p.split(":")[0].strip() for p in params if ":" in p]
    lines = []
    for line in src[head.end():].split("\n"):
        pad = line[:len(line) - len(line.lstrip())]
        if line.strip() in (GATE, "tl.extra.cuda.gdc_wait()"):
            lines.append(pad + WAIT)
        elif "gdc_" not in line:
            lines.append(line)
    if not any(WAIT in line for line in lines):
        lines.insert(0, "    " + WAIT)
    body = re.sub(r"tl\.program_id\((\d)\)", r"pid_\1_", "\n".join(lines))
    body = re.sub(r"tl\.num_programs\((\d)\)", r"np_\1_", body)
    extra = ["pid_0_", "pid_1_", "pid_2_", "np_0_", "np_1_", "np_2_", "mk_waits_",
             "mk_counters_", "mk_w_lo_", "mk_w_hi_"]
    sig = ", ".join(runtime + extra + [f"{c}: tl.constexpr" for c in consts])
    return f"@triton.jit\ndef {name}({sig}):\n{body}", runtime, consts


def arg_type(base: str, value: int) -> str:
    """A table argument's type as the kernel is told it, the way Triton specializes a
    launch's arguments: a pointer (`base` its element type) or an "int" that is a multiple
    of 16 gets ":16" (tl.multiple_of: aligned, vector loads), an int of 1 ":1" (the
    literal: a unit stride makes a tile's loads contiguous)."""
    if base == "int" and value == 1:
        return "int:1"
    return f"{base}:16" if value % 16 == 0 else base


def distinct_kernels(specs: list, types: list[list[str]]) -> tuple[list, list[int]]:
    """The distinct kernels of the launches `specs` (their runtime arguments' types: a
    pointer's element type, "int" or "float", with arg_type's hints): [(kind, device
    function source, types, constexprs)], and each launch's kind."""
    kinds: dict = {}
    of = []
    for spec, ts in zip(specs, types):
        key = (spec.source, tuple(sorted(spec.constexprs.items())), tuple(ts))
        if key not in kinds:
            src, runtime, consts = task_function(spec, f"task_{len(kinds)}")
            if len(runtime) != len(ts):
                raise MeganeuraError(f"{spec.archetype} {spec.variant}: {len(runtime)} "
                                     f"parameters, {len(ts)} arguments")
            kinds[key] = (len(kinds), src, list(ts), {c: spec.constexprs[c] for c in consts})
        of.append(kinds[key][0])
    return list(kinds.values()), of


PREFETCH_FUNCTION = f"""@triton.jit
def _prefetch_(addr, nbytes):
    # asks L2 for the bytes [addr, addr + nbytes) (16-byte multiples), each thread a share
    # in one bulk request: they stream while the task waits for the launches before it
    if nbytes > 0:
        share = ((nbytes + {WARPS * 32 - 1}) // {WARPS * 32} + 15) // 16 * 16
        lo = tl.arange(0, {WARPS * 32}).to(tl.int64) * share
        n = tl.minimum(share, nbytes - lo)
        tl.inline_asm_elementwise(
            "{{ .reg .pred p; setp.gt.s64 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], $3; "
            "mov.u32 $0, 0; }}", "=r,l,l,r", [addr + lo, n, n.to(tl.int32)], dtype=tl.int32,
            is_pure=False, pack=1)
"""


CLOCK_FUNCTION = """@triton.jit
def _clock_(x):
    # the GPU's global timer in nanoseconds (x: any value, for the elementwise form)
    return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l,r", [x], dtype=tl.int64,
                                     is_pure=False, pack=1)
"""


def source(kinds: list, width: int, timed: bool = False, prefetch: bool = False) -> str:
    """The megakernel's source: the kinds' device functions (distinct_kernels) and the loop
    over a program's tasks; `width`: 64-bit words of a launch's table row. timed: each
    task's start and end on the GPU's global timer go to `times_ptr` (two words a task, at
    its place in the lists): the instrumented build. prefetch: each task first asks L2 for
    its row's spans of weights. Both CUDA only (inline PTX)."""
    funcs = "\n\n".join([WAIT_FUNCTION] + ([CLOCK_FUNCTION] if timed else []) +
                        ([PREFETCH_FUNCTION] if prefetch else []) +
                        [src for _, src, _, _ in kinds])
    branches = []
    for k, _, types, consts in kinds:
        args = []
        for j, t in enumerate(types):
            at = GRID_COLS + j
            base, _, hint = t.partition(":")
            if base == "int" and hint == "1":  # a unit stride: what makes a tile contiguous
                args.append("1")
            elif base == "int":
                arg = f"tl.load(args + {at})"
                args.append(f"tl.multiple_of({arg}, 16)" if hint else arg)
            elif base == "float":
                args.append(f"tl.load(fargs + {at})")
            else:
                arg = f"tl.load(args + {at}).to(tl.pointer_type({base}))"
                args.append(f"tl.multiple_of({arg}, 16)" if hint else arg)
        args += ["p % g0", "(p // g0) % g1", "p // (g0 * g1)", "g0", "g1", "g2", "waits_ptr",
                 "counters_ptr", "tl.where(p == first, w_lo, w_hi)", "w_hi"]
        args += [repr(v) for v in consts.values()]
        call = f"task_{k}({', '.join(args)})"
        branches.append(f"if kind == {k}:\n    for p in range(first, first + count):\n"
                        f"        {call}")
    body = f"""
prog = tl.program_id(0)
lo = tl.load(starts_ptr + prog)
hi = tl.load(starts_ptr + prog + 1)
for i in range(lo, hi):
{"    t_start = _clock_(prog)" if timed else ""}
    row = tasks_ptr + tl.load(lists_ptr + i) * {TASK_COLS}
    launch = tl.load(row)
    first = tl.load(row + 1)
    count = tl.load(row + 2)
    w_lo = tl.load(row + 3)  # its waits, which the first of its programs makes
    w_hi = tl.load(row + 4)
{PREFETCH if prefetch else ""}    args = table_ptr + launch * {width}
    fargs = ftable_ptr + launch * {width}
    kind = tl.load(args)
    g0 = tl.load(args + 1)
    g1 = tl.load(args + 2)
    g2 = tl.load(args + 3)
{indent(chr(10).join(branches), 4)}
    tl.debug_barrier()  # the task's every store before it is counted
    tl.atomic_add(counters_ptr + launch, 1, sem="release", scope="gpu")
{TIMES if timed else ""}
"""
    head = f"def {ENTRY}({', '.join(PARAMS + (('times_ptr',) if timed else ()))}):\n"
    return HEADER + funcs + "\n\n\n" + head + indent(body, 4) + "\n"


def weight_spans(spec, tensors: dict, first: int, count: int, budget: int) -> list:
    """The weights that programs first .. first + count - 1 of a launch of `spec` read (its
    KernelSpec.streams; `tensors`: node id -> its tensor), as (address, bytes)
    spans on 16-byte boundaries (at most SPANS), `budget` bytes in all, from each span's
    start."""
    if budget <= 0 or spec.streams is None or spec.grid[1:] not in ((), (1,)):
        return []
    cols, parts = spec.streams
    c0, c1 = first * cols, (first + count) * cols
    spans = []
    for arg, lo, hi, size, row0 in parts:
        a, b = max(c0, lo), min(c1, hi)
        if a < b:
            spans.append((tensors[spec.args[arg][1]].data_ptr() + (row0 + a - lo) * size,
                          (b - a) * size))
    spans, out = spans[:SPANS], []
    for addr, n in spans:
        start = addr // 16 * 16
        n = min(n + addr - start, budget // len(spans)) // 16 * 16
        out += [(start, n)] if n > 0 else []
    return out


class Megakernel:
    """The persistent kernel of a compiled model (runtime.compiled.CompiledModel) under a
    schedule whose works are the model's launches, each chained kernel its own
    (schedule.works_of). timed: the instrumented build (CUDA only), whose runs leave each
    task's start and end on the GPU's timer for task_times."""

    def __init__(self, model, schedule, timed: bool = False, registers: int | None = None,
                 stages: int = 1, prefetch: int = 0):
        if timed and model.target.interpreted:
            raise MeganeuraError("the timed megakernel reads the GPU's timer: CUDA only")
        self.model, self.schedule, self.timed = model, schedule, timed
        # registers: a thread's at most (ptxas spills the rest), so that more programs fit
        # an SM; stages: the tasks' loops pipelined through shared memory (1: loads go to
        # registers; more stages multiply the shared memory, which the programs share)
        # prefetch: bytes of its weights a task asks L2 for before it waits (0: none; the
        # kernels' own streams, KernelSpec.streams; CUDA only)
        self.prefetch = 0 if model.target.interpreted else prefetch
        self.options = dict(num_warps=WARPS, num_stages=stages)
        if registers is not None:
            self.options["maxnreg"] = registers
        specs = [spec for launch in model.launches for spec in launch.spec.chain()]
        for spec in specs:
            if spec.zeroed is not None:  # (a launch zeroes that output before it runs)
                raise MeganeuraError(f"{spec.archetype} {spec.variant}: a sum by atomics into "
                                     f"a zeroed output is not taken by the megakernel")
        if len(specs) != len(schedule.tasks_of):
            raise MeganeuraError(f"the schedule has {len(schedule.tasks_of)} launches, the "
                                 f"model {len(specs)}")
        args = [self._arguments(spec) for spec in specs]
        kinds, launch_kind = distinct_kernels(specs, [types for _, types in args])
        rows, frows = [], []
        for spec, (values, types), k in zip(specs, args, launch_kind):
            grid = tuple(spec.grid) + (1,) * (3 - len(spec.grid))
            rows.append([k, *grid] + [v if t != "float" else 0 for v, t in zip(values, types)])
            frows.append([0.0] * GRID_COLS + [v if t == "float" else 0.0
                                              for v, t in zip(values, types)])
        width = max(len(r) for r in rows)
        dev = model.target.device
        self.table = torch.tensor([r + [0] * (width - len(r)) for r in rows], dtype=torch.int64,
                                  device=dev)
        self.ftable = torch.tensor([r + [0.0] * (width - len(r)) for r in frows],
                                   dtype=torch.float32, device=dev)
        s = schedule
        waits, task_rows = [], []
        for t in s.tasks:
            lo = len(waits) // 2
            for i in t.waits:
                waits += [i, s.tasks_of[i]]
            spans = weight_spans(specs[t.launch], model.tensors, t.first, t.count,
                                 self.prefetch) + [(0, 0)] * SPANS
            task_rows.append([t.launch, t.first, t.count, lo, len(waits) // 2] +
                             [x for span in spans[:SPANS] for x in span])
        self.tasks = torch.tensor(task_rows, dtype=torch.int64, device=dev)
        self.waits = torch.tensor(waits or [0, 0], dtype=torch.int64, device=dev)
        self.lists = torch.tensor([t for lst in s.lists for t in lst] or [0], dtype=torch.int64,
                                  device=dev)
        starts = [0]
        for lst in s.lists:
            starts.append(starts[-1] + len(lst))
        self.starts = torch.tensor(starts, dtype=torch.int64, device=dev)
        self.counters = torch.zeros(len(specs), dtype=torch.int32, device=dev)
        self.kinds, self.width = kinds, width
        self.source = source(kinds, width, timed, self.prefetch > 0)
        self.times = torch.zeros(2 * len(s.tasks), dtype=torch.int64, device=dev) if timed \
            else None
        self.kernels = len(kinds)
        self.fn = model.cache.load(self.source, ENTRY, model.target.interpreted)
        self.check_resident()  # (on a GPU this compiles it: before any graph capture)

    def _arguments(self, spec) -> tuple[list, list[str]]:
        """A kernel's runtime arguments for the table, and their types (arg_type)."""
        m = self.model
        values, types = [], []
        for kind, x in spec.args:
            if kind in ("node", "scratch", "rope_freq"):
                t = (m.tensors[x] if kind == "node" else m.scratch(*x) if kind == "scratch"
                     else m.rope_table(*x))
                values.append(t.data_ptr())
                types.append(arg_type(_TYPES[t.dtype], t.data_ptr()))
            elif kind == "stride":
                values.append(int(m.tensors[x].stride(0)))
                types.append(arg_type("int", values[-1]))
            elif kind == "value" and isinstance(x, float):
                values.append(float(x))
                types.append("float")
            elif kind == "value":
                values.append(int(x))
                types.append(arg_type("int", values[-1]))
            else:
                raise MeganeuraError(f"{spec.archetype} {spec.variant}: the megakernel does "
                                     f"not take {kind} arguments")
        return values, types

    def _args(self) -> tuple:
        return (self.table, self.ftable, self.tasks, self.lists, self.starts, self.waits,
                self.counters) + ((self.times,) if self.timed else ())

    def task_times(self) -> list[tuple[int, int, int, float, float]]:
        """After a run of the timed build: (program, task, launch, start, end) of every task,
        in microseconds from the run's first start."""
        t = self.times.view(-1, 2).tolist()
        t0 = min(a for a, _ in t)
        out, at = [], 0
        for p, lst in enumerate(self.schedule.lists):
            for k in lst:
                a, b = t[at]
                out.append((p, k, self.schedule.tasks[k].launch, (a - t0) / 1e3, (b - t0) / 1e3))
                at += 1
        return out

    def check_resident(self) -> None:
        """Refuses a schedule whose programs could not all run at once: a program spinning
        on a counter would then hold the place the program it waits for needs. On a GPU,
        the programs against the SMs times the blocks an SM holds at the kernel's registers
        and shared memory; on the interpreter, which runs programs one after another,
        every wait must be met by a program before (schedule.in_program_order)."""
        from ..compiler.schedule import in_program_order

        p = self.schedule.programs
        if self.model.target.interpreted:
            if not in_program_order(self.schedule):
                raise MeganeuraError(f"a megakernel of {p} programs waits across programs "
                                     f"in an order the interpreter cannot run")
            return
        k = self.fn.warmup(*self._args(), grid=(p,), **self.options)
        k._init_handles()  # loads the module: its registers a thread are known from then
        props = torch.cuda.get_device_properties(self.model.target.device)
        regs = max(1, k.n_regs) * 32 * WARPS
        per_sm = min(getattr(props, "regs_per_multiprocessor", 65536) // regs,
                     props.shared_memory_per_multiprocessor // max(1, k.metadata.shared),
                     props.max_threads_per_multi_processor // (32 * WARPS), 32)
        if p > per_sm * props.multi_processor_count:
            raise MeganeuraError(f"a megakernel of {p} programs cannot be resident at once: "
                                 f"{props.multi_processor_count} SMs hold {per_sm} each "
                                 f"({k.n_regs} registers a thread, {k.metadata.shared} bytes "
                                 f"of shared memory a program)")

    def run(self) -> None:
        """One run of the plan's kernels (its inputs already in place: model.load_inputs)."""
        self.counters.zero_()
        self.fn[(self.schedule.programs,)](*self._args(), **self.options)


__all__ = ["ENTRY", "PARAMS", "Megakernel", "arg_type", "distinct_kernels", "source",
           "task_function", "weight_spans"]
