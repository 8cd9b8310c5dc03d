"""How an archetype reads its element stages: their operands and attributes become kernel
arguments with names of their role, and each stage becomes lines on the running value.

An operand of an element stage is a tile (one value per element of the running value: a
residual, a gating tensor) or a scalar (`[1]`, read once: a layer scalar). Tiles are named
r, r1, r2 ... and scalars s, s1 ...; float and int attributes travel as arguments named as
the attribute (cap, factor ...), strings choose code (an activation). The archetype says
how a tile is loaded where it runs (a [BLOCK_M, BLOCK_N] tile, a row segment, a row).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..compiler.kernels import Stage
from ..compiler.ops import OPS
from . import elementwise


class Names:
    """Unique parameter stems: `take("r")` gives r, then r1, r2 ..."""

    def __init__(self, taken=()):
        self.taken = set(taken)

    def take(self, stem: str) -> str:
        name, k = stem, 1
        while name in self.taken:
            name, k = f"{stem}{k}", k + 1
        self.taken.add(name)
        return name


@dataclass
class Operand:
    input: int  # node-input position
    kind: str  # tile | scalar
    name: str  # parameter stem: its pointer is {name}_ptr


@dataclass
class Stages:
    """A run of element stages of one kernel, their operands and arguments named."""

    stages: list[Stage]
    operands: dict[int, Operand] = field(default_factory=dict)  # node-input position ->
    values: list[tuple[str, object]] = field(default_factory=list)  # (argument, value)
    attrs: list[dict] = field(default_factory=list)  # per stage: attribute -> text in source
    prefix: str = ""  # of the expressions' temporaries (stages of another scope of a kernel)

    @property
    def tiles(self) -> list[Operand]:
        return [o for o in self.operands.values() if o.kind == "tile"]

    @property
    def scalars(self) -> list[Operand]:
        return [o for o in self.operands.values() if o.kind == "scalar"]

    def lines(self, k: int, running: str, value, other: str | None = None) -> list[str]:
        """Stage k on `running`: value(operand) gives (lines, expression) of a loaded operand;
        other is the second accumulator of a paired product (its stage has no operands)."""
        st = self.stages[k]
        out: list[str] = []
        if st.pair:
            values = [running, other]
        else:
            values = []
            for i in st.operands:
                more, expr = value(self.operands[i])
                out += more
                values.append(expr)
            values.insert(st.at, running)
        return out + elementwise.apply(st.op, values, self.attrs[k], running, f"{running}_in",
                                       self.prefix)


def load_once(tile_address: str, mask: str):
    """An epilogue operand's loader for Stages.lines: each operand loaded once into a
    variable of its name, a scalar from its pointer, a tile at `tile_address` (formatted
    with the operand's name as {x}) under `mask`."""
    loaded: set[str] = set()

    def value(x):
        if x.name in loaded:
            return [], x.name
        loaded.add(x.name)
        if x.kind == "scalar":
            return [f"{x.name} = tl.load({x.name}_ptr).to(tl.float32)"], x.name
        return [f"{x.name} = tl.load({tile_address.format(x=x.name)}, mask={mask}, "
                f"other=0.0).to(tl.float32)"], x.name
    return value


def element_stages(stages, node, graph, names: Names, running_shape: tuple) -> Stages:
    """Names the operands and attribute arguments of element stages (in the order they are
    first read). An operand of the running value's shape is a tile, one of shape [1] a
    scalar."""
    out = Stages(list(stages))
    for st in stages:
        spec = OPS[st.op]
        for i in st.operands:
            if i in out.operands:
                continue
            shape = graph[node.inputs[i]].shape
            kind = "scalar" if shape == (1,) else "tile"
            if kind == "tile" and shape != tuple(running_shape):
                raise ValueError(f"{st.op} stage reads {list(shape)} beside a running value of "
                                 f"{list(running_shape)}")
            out.operands[i] = Operand(i, kind, names.take("s" if kind == "scalar" else "r"))
        shown = {}
        for (a, kind), (_, v) in zip(spec.attrs, st.attrs):
            if kind is str:
                shown[a] = v
            else:
                shown[a] = names.take(a)
                out.values.append((shown[a], v))
        out.attrs.append(shown)
    return out


def variant(prologue, epilogue) -> str:
    """A kernel's stages in its variant name: prologue ops | epilogue ops."""
    def ops(stages):
        return ",".join(st.op + (".pair" if st.pair else "") for st in stages)
    if prologue:
        return f"{ops(prologue)}|{ops(epilogue)}"
    return ops(epilogue)
