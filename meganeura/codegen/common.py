"""What every archetype shares: the target, the kernel spec, block-size helpers.

A `KernelSpec` is emitted source text plus how to launch it: the grid, the
argument list (tensors by plan node, integers, floats) and the constexprs. No
string from user data (tensor names, config values) is pasted into source:
shapes, eps and theta travel as arguments, and block sizes as constexprs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

HEADER = "import triton\nimport triton.language as tl\n\n\n"


@dataclass(frozen=True)
class Target:
    device: torch.device
    dtype: torch.dtype  # activations and weights
    sms: int | None = None  # SM count; None: asked of the device (set it to build without one)
    # programmatic dependent launch (Hopper): each kernel may be launched while the one
    # before it finishes, and waits for it (griddepcontrol.wait) before touching memory
    pdl: bool = False
    # on the interpreter, split a product's K and a decode row's keys among programs as a GPU
    # would (the kernel tests cover those paths so); a model run there does not, as every
    # program costs there what a whole kernel costs on a GPU
    interpreter_splits: bool = False
    # a decode step's expert kernels share K (and the weighted sum its k experts) among
    # programs; False keeps a program per column tile (benchmarks/moe_sweep.py compares)
    expert_splits: bool = True
    # every kernel launched with this many warps (None: each its own): as the persistent
    # kernel runs them (codegen/megakernel.py's WARPS), so that the launches reduce each row
    # in the same order and a difference between the two is not the sums' order
    warps: int | None = None

    @property
    def interpreted(self) -> bool:
        return self.device.type == "cpu"

    @property
    def sm_count(self) -> int:
        """Streaming multiprocessors of the device (tile counts are weighed against it)."""
        if self.sms is not None:  # as set (tests set it on the interpreter too)
            return self.sms
        if self.interpreted:
            return 1
        return torch.cuda.get_device_properties(self.device).multi_processor_count

    @property
    def dot_precision(self) -> str:
        # fp32 plans keep exact fp32 products (no tf32) so they meet the fp32 tolerance
        return "ieee" if self.dtype == torch.float32 else "tf32"


@dataclass
class KernelSpec:
    archetype: str  # e.g. "matmul"
    variant: str  # e.g. "rmsnorm-prologue+swiglu-epilogue"
    source: str
    entry: str
    grid: tuple[int, ...]
    args: list  # ("node", id) | ("stride", id) | ("desc", (id, block)) | ("value", number) | ...
    constexprs: dict = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 2
    then: "KernelSpec | None" = None  # a second kernel the node launches right after
    pdl: bool = False  # launched as a programmatic dependent of the kernel before it
    zeroed: int | None = None  # a node whose buffer is zeroed before each launch (sums by atomics)
    # the weights a program streams, where they are contiguous: program p (grid axis 0) of
    # `streams[0]` columns reads, of each (arg position, first column, end column, bytes a
    # column, first row), the rows [p * cols, (p + 1) * cols) within its columns (a
    # persistent kernel asks L2 for a task's before it waits: codegen/megakernel.py)
    streams: tuple | None = None

    def chain(self) -> list["KernelSpec"]:
        """This kernel and those launched after it, in order."""
        return [self] + (self.then.chain() if self.then is not None else [])


SHARED_MEMORY = 200 * 1024  # bytes a program may stage on Hopper (232448 max, some headroom)


def part_branches(parts: int, col: str, k_loop) -> str:
    """A product whose B is `parts` weights side by side: one K loop per part, each under
    its own `if` on the tile's first column col0 (independent ifs, not if/elif: exactly one
    holds, and Triton then shares the loops' stage buffers). k_loop(i, c) gives part i's
    loop for its columns c, `col` less the part's start."""
    bounds = ["0"] + [f"end_{i}" for i in range(parts - 1)]
    branches = []
    for i in range(parts):
        conds = [f"(col0 >= {bounds[i]})"] if i else []
        conds += [f"(col0 < {bounds[i + 1]})"] if i < parts - 1 else []
        c = col + (f" - {bounds[i]}" if i else "")
        branches.append(f"if {' & '.join(conds)}:\n" + indent(k_loop(i, c), 4))
    return "col0 = pid_n * BLOCK_N\n" + "\n".join(branches)


def fit_stages(per_stage: int, fixed: int, want: int) -> int:
    """The most pipeline stages (<= want, >= 1) whose buffers fit in shared memory."""
    stages = want
    while stages > 1 and fixed + stages * per_stage > SHARED_MEMORY:
        stages -= 1
    return stages


def activation(act: str, x: str) -> str:
    """Triton expression of act(x) in fp32 (x a variable name), from exp only (the interpreter
    has no libdevice): silu(x) = x sigmoid(x); gelu_tanh(x) = x sigmoid(2u), u = sqrt(2/pi)
    (x + 0.044715 x^3), which equals 0.5 x (1 + tanh(u)). The exponent is clamped at 80
    (exp stays finite; x / (1 + e^80) is 0 in fp32 all the same)."""
    if act == "silu":
        return f"{x} / (1.0 + tl.exp(tl.minimum(-{x}, 80.0)))"
    if act == "gelu_tanh":
        return (f"{x} / (1.0 + tl.exp(tl.minimum(-1.5957691216057308 * "
                f"({x} + 0.044715 * {x} * {x} * {x}), 80.0)))")
    raise ValueError(f"no kernel expression for activation {act!r}")




def softcap_lines(x: str, cap: str) -> list[str]:
    """Lines that replace x by cap * tanh(x / cap) in fp32. tanh(y) = (1 - e) / (1 + e) with
    e = exp(-2|y|), odd in y; below |y| = 1/16 its series (error < 1e-9 relative), where
    1 - e would lose digits."""
    return [f"sc_y = {x} / {cap}",
            "sc_a = tl.abs(sc_y)",
            "sc_e = tl.exp(-2.0 * sc_a)",
            "sc_t = (1.0 - sc_e) / (1.0 + sc_e)",
            "sc_y2 = sc_y * sc_y",
            "sc_s = sc_a * (1.0 - sc_y2 * (1.0 / 3.0 - sc_y2 * (2.0 / 15.0 - sc_y2 * (17.0 / 315.0))))",
            "sc_t = tl.where(sc_a < 0.0625, sc_s, sc_t)",
            f"{x} = tl.where(sc_y < 0.0, -sc_t, sc_t) * {cap}"]


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def indent(code: str, spaces: int) -> str:
    pad = " " * spaces
    return "\n".join(pad + line if line.strip() else line for line in code.strip("\n").split("\n"))


# Where a kernel that reads something before the dependent-launch gate (weights) puts it;
# elsewhere the gate opens the kernel. A comment: kernels launched normally ignore it.
GATE = "# dependent-launch gate"


def dependent_launch(spec: KernelSpec) -> KernelSpec:
    """The kernel (and those chained after it) as programmatic dependents: each program
    waits until the kernel before it has finished and its writes are visible before it
    touches anything that kernel may write (every activation read and every write come
    after, so reused buffers are safe too; only weights may be read before, at the GATE
    marker); it then lets the next kernel be launched, whose programs fill SMs as this
    one's last ones run."""
    wait = ["tl.extra.cuda.gdc_wait()", "tl.extra.cuda.gdc_launch_dependents()"]
    if GATE in spec.source:  # in place of each marker (one per path a program can take)
        lines = []
        for line in spec.source.split("\n"):
            pad = line[:len(line) - len(line.lstrip())]
            lines += [pad + w for w in wait] if line.strip() == GATE else [line]
        source = "\n".join(lines)
    else:
        head, _, body = spec.source.partition(f"def {spec.entry}(")
        params, _, rest = body.partition("):\n")
        source = f"{head}def {spec.entry}({params}):\n" + "".join(f"    {w}\n" for w in wait) + rest
    then = dependent_launch(spec.then) if spec.then is not None else None
    return dataclasses.replace(spec, source=source, then=then, pdl=True)
