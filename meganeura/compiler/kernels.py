"""Kernels as structure: an archetype, and the ops it runs before and after its own work.

A fused kernel in a plan is a node of one of the archetype ops

    product(a, b, ...)        C = epilogue(prologue(A) @ B)    tiled, or one row: matrix-vector
    rows(x, ...)              y = epilogue(x)                  a row at a time (norms, RoPE,
                                                               a cache write)
    pointwise(x, ...)         y = epilogue(x)                  element by element
    gather(ids, table, ...)   y = epilogue(table[ids])         embedding rows

whose attributes `prologue` and `epilogue` are tuples of Stage: an op of the vocabulary
applied to the kernel's running value (a tile, a row), its other operands inputs of the
node, its attributes as declared. `rms_norm(x, w) @ B + r` is `product(x, B, w, r)` with
prologue (rms_norm(w),) and epilogue (add(r),). Nothing is a name per combination: the
rewrite rules build stages op by op (rewrites/epilogue.py), and codegen, the cost model,
the report and the reference executor read the stages. A base op is its archetype with
one stage (or none), so `kernel_of` reads every launch the same way.

Which stages an archetype takes comes from the op table: each op declares its locality
("element": one value at a time, "row": the whole row); a product's epilogue takes element
ops (and, at one row, a row's RMSNorm: the last column tile finishes the row), its prologue
the RMSNorm of A's rows; rows kernels take element and row ops; pointwise kernels and
gathers element ops.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .ops import FLOAT, OPS, OpSpec, _Mismatch, _need


@dataclass(frozen=True)
class Stage:
    """One op applied to a kernel's running value."""

    op: str
    operands: tuple[int, ...] = ()  # the op's other tensor operands: positions in node.inputs
    attrs: tuple[tuple[str, object], ...] = ()  # every declared attribute, in declared order
    at: int = 0  # which of the op's operands the running value is
    pair: bool = False  # the op of the running value's two column halves (B = [G | U])

    @property
    def attr(self) -> dict:
        return dict(self.attrs)

    def args(self, running, values: list) -> list:
        """The op's operands in declared order: the running value at `at` (both halves of it
        when paired), the others from `values` (by node-input position)."""
        if self.pair:
            n = running.shape[-1] // 2
            return [running[..., :n], running[..., n:]]
        others = [values[i] for i in self.operands]
        return others[:self.at] + [running] + others[self.at:]

    def text(self, names) -> str:
        """e.g. add(%9), glu.pair(act=silu); names: node-input position -> text. Attributes
        at their declared constant defaults are left out."""
        args = [names(i) for i in self.operands]
        defaults = OPS[self.op].defaults
        attrs = [f"{k}={v}" for k, v in self.attrs if callable(defaults.get(k, len)) or
                 k not in defaults or defaults[k] != v]
        where = f"@{self.at}" if self.at else ""
        return f"{self.op}{'.pair' if self.pair else where}({', '.join(args + attrs)})"


@dataclass(frozen=True)
class Archetype:
    """A kernel template: the inputs it reads itself, and the stages it accepts."""

    name: str
    main: tuple[str, ...]  # roles of its own inputs (the first node inputs)
    prologue: frozenset  # ops its prologue takes
    epilogue: frozenset  # ops its epilogue takes
    base: str | None  # the base op it is with no stage (matmul, embedding)
    doc: str = ""


def _local(*kinds: str) -> frozenset:
    return frozenset(name for name, spec in OPS.items() if spec.locality in kinds)


ARCHETYPES: dict[str, Archetype] = {a.name: a for a in (
    Archetype("product", ("a", "b"), frozenset({"rms_norm"}), _local("element") | {"rms_norm"},
              "matmul", "epilogue(prologue(a) @ b): the RMSNorm of A's rows as prologue; "
              "element ops, and at one row the row's RMSNorm, as epilogue"),
    Archetype("rows", ("x",), frozenset(), _local("element", "row"), None,
              "epilogue(x) a row at a time: norms, RoPE, element ops, a cache write last"),
    Archetype("pointwise", ("x",), frozenset(), _local("element"), None,
              "epilogue(x) element by element"),
    Archetype("gather", ("ids", "table"), frozenset(), _local("element"), "embedding",
              "epilogue(table[ids]): embedding rows"),
)}


@dataclass(frozen=True)
class Kernel:
    """What a launch computes: its archetype, the node inputs the archetype reads, its stages."""

    archetype: str
    main: tuple[int, ...]
    prologue: tuple[Stage, ...] = ()
    epilogue: tuple[Stage, ...] = ()

    @property
    def stages(self) -> tuple[Stage, ...]:
        return self.prologue + self.epilogue

    @property
    def paired(self) -> bool:
        return bool(self.epilogue) and self.epilogue[0].pair

    def updates(self) -> int | None:
        """The node input a last, in-place stage writes (a cache write's cache), or None."""
        if self.epilogue and OPS[self.epilogue[-1].op].inplace:
            last = self.epilogue[-1]
            return last.operands[0] if last.at else None  # cache_write(cache, x, pos): x at 1
        return None


STRUCTURED = frozenset(ARCHETYPES)  # the archetype ops of the vocabulary


def kernel_of(op: str, attrs: dict, arity: int) -> Kernel | None:
    """The kernel of a node (op, attrs, its number of inputs); None for ops that launch
    nothing or run an archetype without stages (attention, cache writes)."""
    if op in STRUCTURED:
        return Kernel(op, tuple(range(len(ARCHETYPES[op].main))), attrs["prologue"],
                      attrs["epilogue"])
    spec = OPS[op]
    arch = ARCHETYPES.get(spec.archetype)
    if arch is None:
        return None
    if arch.base == op:
        return Kernel(arch.name, tuple(range(arity)))
    stage = Stage(op, tuple(range(1, arity)), tuple((a, attrs[a]) for a in spec.attr_names))
    return Kernel(arch.name, (0,), (), (stage,))


def node_kernel(node) -> Kernel | None:
    return kernel_of(node.op, node.attrs, len(node.inputs))


def holds_stream(op: str, attrs: dict) -> bool:
    """The node's output is held in fp32 (the residual stream): its op is declared so, or
    its kernel's last stage's op is (a product ending in a residual add)."""
    if op not in STRUCTURED:
        return OPS[op].stream
    if attrs["epilogue"]:
        return OPS[attrs["epilogue"][-1].op].stream
    base = ARCHETYPES[op].base
    return base is not None and OPS[base].stream


def updated_input(node) -> int | None:
    """The node input whose buffer the node updates in place (state), or None."""
    spec = OPS[node.op]
    if node.op not in STRUCTURED:
        return 0 if spec.inplace else None
    return node_kernel(node).updates()


def index_inputs(op: str, attrs: dict, arity: int) -> dict[int, list[tuple[OpSpec, str, dict]]]:
    """Node-input positions that hold integer indices -> every (op reading them, its role
    there, that op's attributes): token ids of a gather, positions of RoPE or a cache write
    (a row kernel's RoPE and cache write read the same positions)."""
    out: dict[int, list[tuple[OpSpec, str, dict]]] = {}
    if op not in STRUCTURED:
        spec = OPS[op]
        for pos, role in enumerate(spec.inputs[:arity]):
            if role in spec.indices:
                out.setdefault(pos, []).append((spec, role, attrs))
        return out
    arch = ARCHETYPES[op]
    base = OPS[arch.base] if arch.base else None
    for pos, role in enumerate(arch.main):
        if base is not None and role in base.indices:
            out.setdefault(pos, []).append((base, role, {}))
    for st in attrs["prologue"] + attrs["epilogue"]:
        spec = OPS[st.op]
        roles = [r for k, r in enumerate(spec.inputs) if k != st.at] if not st.pair else []
        for pos, role in zip(st.operands, roles):
            if role in spec.indices:
                out.setdefault(pos, []).append((spec, role, st.attr))
    return out


def input_bounds(graph, node) -> dict[int, tuple[int, str]]:
    """Node-input position -> (exclusive bound, what) for the integer inputs the node indexes
    with: token ids below the rows of the table a gather reads, positions below the `limit`
    of every RoPE that reads them (a cache write takes any position)."""
    out = {}
    for pos, readers in index_inputs(node.op, node.attrs, len(node.inputs)).items():
        for spec, role, attrs in readers:
            if role == "ids":  # the table is the gather's next operand
                bound = (graph[node.inputs[pos + 1]].shape[0], "token id")
            elif "limit" in attrs:
                bound = (attrs["limit"], "position")
            else:
                continue
            if pos not in out or bound[0] < out[pos][0]:
                out[pos] = bound
    return out


def unrunnable(kernel: Kernel) -> str | None:
    """Why no kernel of its archetype runs these stages (None: one does). The cost model
    prices such a node out and codegen refuses it: a product takes at most one prologue
    stage and one row stage in its epilogue; a row kernel's stages see one head width and
    read one set of positions."""
    if kernel.archetype == "product":
        if len(kernel.prologue) > 1:
            return "a product takes one prologue stage"
        if sum(OPS[st.op].locality == "row" for st in kernel.epilogue) > 1:
            return "a product's epilogue takes one row stage"
    if kernel.archetype == "rows":
        dims = {st.attr["head_dim"] for st in kernel.epilogue if "head_dim" in st.attr}
        if len(dims) > 1:
            return f"a row kernel's stages see one head width, not {sorted(dims)}"
        if len(index_inputs("rows", {"prologue": (), "epilogue": kernel.epilogue}, 0)) > 1:
            return "a row kernel reads one set of positions"
    return None


# ---- building and checking structured nodes --------------------------------------------------


@dataclass(frozen=True)
class StageSpec:
    """A stage as a graph builder gives it: operands by node id (Graph.kernel)."""

    op: str
    operands: tuple[int, ...] = ()
    attrs: dict = field(default_factory=dict)
    at: int = 0
    pair: bool = False


def stage(op: str, *operands: int, at: int = 0, pair: bool = False, **attrs) -> StageSpec:
    """A stage for Graph.kernel: op's other operands (node ids) and attributes."""
    return StageSpec(op, tuple(operands), attrs, at, pair)


def check_stages(arch: Archetype, prologue, epilogue, arity: int) -> None:
    """Raises _Mismatch unless every stage is one the archetype takes, well formed."""
    for where, stages, allowed in (("prologue", prologue, arch.prologue),
                                   ("epilogue", epilogue, arch.epilogue)):
        if not isinstance(stages, tuple) or not all(isinstance(s, Stage) for s in stages):
            raise _Mismatch(f"{where} must be a tuple of Stage, got {stages!r}")
        for k, st in enumerate(stages):
            spec = OPS.get(st.op)
            _need(st.op in allowed, f"a {arch.name} kernel's {where} does not take {st.op!r} "
                                    f"(it takes {', '.join(sorted(allowed)) or 'nothing'})")
            _need(all(isinstance(i, int) and len(arch.main) <= i < arity for i in st.operands),
                  f"{st.op} stage reads inputs {list(st.operands)}, not operands of the node")
            _need(tuple(a for a, _ in st.attrs) == spec.attr_names,
                  f"{st.op} stage must give the attributes {list(spec.attr_names)} in order")
            if st.pair:
                _need(spec.pairs and where == "epilogue" and k == 0 and arch.name == "product"
                      and not st.operands, f"{st.op} runs on a product's column halves only as "
                      f"its first epilogue stage, without operands")
            else:
                _need(st.at in spec.through, f"{st.op} stage: the running value cannot be "
                                             f"operand {st.at} ({', '.join(spec.inputs)})")
                _need(len(st.operands) == spec.arity - 1,
                      f"{st.op} stage needs {spec.arity - 1} other operands")
            if spec.inplace:
                _need(where == "epilogue" and k == len(stages) - 1,
                      f"{st.op} writes its state in place: it can only be the last stage")


def _apply_shape(st: Stage, running: tuple, shapes: list, dtypes: list) -> tuple:
    spec = OPS[st.op]
    if st.pair:
        _need(running[-1] % 2 == 0, f"{st.op} of column halves needs an even width, "
                                    f"got {list(running)}")
        half = running[:-1] + (running[-1] // 2,)
        ins, ds = [half, half], [FLOAT, FLOAT]
    else:
        ins = [shapes[i] for i in st.operands]
        ds = [dtypes[i] for i in st.operands]
        ins.insert(st.at, running)
        ds.insert(st.at, FLOAT)
    return tuple(spec.shape(ins, ds, st.attr))


def kernel_shape(arch: Archetype, shapes: list, dtypes: list, attrs: dict) -> tuple:
    """Output shape of a structured node: the archetype's own work between its stages."""
    check_stages(arch, attrs["prologue"], attrs["epilogue"], len(shapes))
    main = list(shapes[:len(arch.main)])
    for st in attrs["prologue"]:
        main[0] = _apply_shape(st, main[0], shapes, dtypes)
    if arch.base:
        running = tuple(OPS[arch.base].shape(main, dtypes[:len(main)], {}))
    else:
        running = main[0]
    for st in attrs["epilogue"]:
        running = _apply_shape(st, running, shapes, dtypes)
    return running


def run_kernel(arch: Archetype, attrs: dict, values: list):
    """The node's value in plain PyTorch: the stages' formulas around the archetype's own."""
    main = list(values[:len(arch.main)])
    for st in attrs["prologue"]:
        main[0] = OPS[st.op].reference(st.attr, *st.args(main[0], values))
    running = OPS[arch.base].reference({}, *main) if arch.base else main[0]
    for st in attrs["epilogue"]:
        running = OPS[st.op].reference(st.attr, *st.args(running, values))
    return running


def archetype_specs() -> list[OpSpec]:
    """The archetype ops' declarations (added to the vocabulary below)."""
    out = []
    for arch in ARCHETYPES.values():
        out.append(OpSpec(
            arch.name, arch.main, (), lambda s, d, a, arch=arch: kernel_shape(arch, s, d, a),
            lambda a, *xs, arch=arch: run_kernel(arch, a, list(xs)), arch.doc,
            archetype=arch.name, variadic=True,
            indices=OPS[arch.base].indices if arch.base else ()))
    return out


def stage_count(op: str, attrs: dict) -> int:
    return len(attrs["prologue"]) + len(attrs["epilogue"]) if op in STRUCTURED else 0


def summary(op: str, attrs: dict) -> str:
    """A kernel's name for reports: the op, or archetype[prologue | epilogue] of stage ops."""
    if op not in STRUCTURED:
        return op

    def names(stages):
        return ", ".join(st.op + (".pair" if st.pair else "") for st in stages)
    pro, epi = attrs["prologue"], attrs["epilogue"]
    inside = f"{names(pro)} | {names(epi)}" if pro else names(epi)
    return f"{op}[{inside}]"




OPS.update({spec.name: spec for spec in archetype_specs()})
