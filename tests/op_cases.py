"""A case per op of the vocabulary: how to give it operands (odd shapes, fresh random values).

An op that may run as a stage of another kernel has a sample here: given the running value's
shape, it makes the op's other operands and attributes (a residual tile, a norm weight,
positions below a limit ...), under each variant worth testing (both activations of glu,
RoPE rotating every frequency, a quarter of them, or llama3-scaled). The kernel tests derive
their cases from these and from the archetypes' declarations: every op as a stage of every
archetype that takes it (`stage_cases`). Ops that only run as their own kernel (products,
gathers, attention) have a case in `kernel_cases.py`. test_op_table.py checks that every op
has one or the other.
"""

from __future__ import annotations

import torch

from meganeura.compiler.graph import Graph
from meganeura.compiler.kernels import ARCHETYPES, stage
from meganeura.compiler.ops import OPS


class Case:
    """A graph under construction with the values of its inputs, weights and state."""

    def __init__(self, seed: int, head_dim: int | None = None, limit: int | None = None):
        self.gen = torch.Generator().manual_seed(seed)
        self.limit = limit  # positions are drawn below it (default 3 rows + 5)
        self.positions: int | None = None  # the rows' positions, once made (or given)
        self.g = Graph()
        self.weights: dict[str, torch.Tensor] = {}
        self.inputs: dict[str, torch.Tensor] = {}
        self.state: dict[str, torch.Tensor] = {}
        self.head_dim = head_dim  # the heads a row's stages see (None: the whole row)

    def rand(self, *shape, scale=1.0):
        return torch.randn(*shape, generator=self.gen) * scale

    def _name(self, stem: str, taken) -> str:
        name, k = stem, 1
        while name in taken:
            name, k = f"{stem}{k}", k + 1
        return name

    def input(self, stem: str, shape, values=None, fp32: bool = False) -> int:
        """fp32: held in fp32 in a bf16 plan too (as a LoRA plan's fp32 sums reach kernels)."""
        name = self._name(stem, self.inputs)
        self.inputs[name] = self.rand(*shape) if values is None else values
        return self.g.input_f32(name, tuple(shape), fp32=fp32)

    def ids(self, stem: str, values: torch.Tensor) -> int:
        name = self._name(stem, self.inputs)
        self.inputs[name] = values
        return self.g.input_u32(name, tuple(values.shape))

    def weight(self, stem: str, values: torch.Tensor) -> int:
        name = self._name(stem, self.weights)
        self.weights[name] = values
        return self.g.parameter(name, tuple(values.shape))

    def cache(self, stem: str, shape) -> int:
        name = self._name(stem, self.state)
        self.state[name] = self.rand(*shape)
        return self.g.state(name, tuple(shape))

    def case(self, out: int):
        """(graph, weights, inputs in the graph's input order), the output `out`."""
        self.g.set_outputs([out])
        return self.g, self.weights, [self.inputs[n.name] for n in self.g.inputs()]


def _positions(c: Case, rows: int) -> tuple[int, int]:
    """Positions of the rows at run time, scattered below a limit (a decode step's are),
    made once a case."""
    limit = c.limit or 3 * rows + 5
    if c.positions is None:
        c.positions = c.ids("positions", torch.randperm(limit, generator=c.gen)[:rows])
    return c.positions, limit


def _rope(c: Case, shape, variant):
    hd = c.head_dim or shape[1]
    pos, limit = _positions(c, shape[0])
    if variant == "partial":  # the published model's full layers: a quarter rotates, theta 1e6
        return [pos], dict(theta=1e6, head_dim=hd, rotary=hd // 8, limit=limit)
    attrs = dict(theta=10000.0, head_dim=hd, rotary=hd // 2, limit=limit)
    if variant == "llama3":  # its three bands inside the head (wavelengths 6 to ~1.4e4)
        attrs.update(scale_factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                     original_limit=512)
    return [pos], attrs


# op -> {variant: f(case, running shape, variant) -> (other operands, attributes)}
SAMPLES = {
    "add": {"": lambda c, s, v: ([c.input("r", s)], {})},
    "glu": {act: (lambda c, s, v: ([c.input("r", s)], {"act": v})) for act in ("silu", "gelu_tanh")},
    "scale": {"": lambda c, s, v: ([], {"factor": 0.37})},
    "scale_by": {"": lambda c, s, v: ([c.weight("s", torch.tensor([1.7]))], {})},
    "softcap": {"": lambda c, s, v: ([], {"cap": 1.5})},  # a small cap: the tanh bends
    "rms_norm": {"": lambda c, s, v: ([c.weight("w", 1.0 + 0.1 * c.rand(s[1]))], {"eps": 1e-6})},
    "head_rms_norm": {"": lambda c, s, v: ([c.weight("w", 1.0 + 0.1 * c.rand(c.head_dim or s[1]))],
                                           {"eps": 1e-6, "head_dim": c.head_dim or s[1]})},
    "unit_rms_norm": {"": lambda c, s, v: ([], {"eps": 1e-6, "head_dim": c.head_dim or s[1]})},
    "rope": {v: _rope for v in ("", "partial", "llama3")},
    "rope_grad": {v: _rope for v in ("", "partial", "llama3")},
    # gradients: the running value is dy
    "softcap_grad": {"": lambda c, s, v: ([c.input("x", s)], {"cap": 1.5})},
    "glu_grad_up": {act: (lambda c, s, v: ([c.input("g", s)], {"act": v}))
                    for act in ("silu", "gelu_tanh")},
    "glu_grad_gate": {act: (lambda c, s, v: ([c.input("g", s), c.input("u", s)], {"act": v}))
                      for act in ("silu", "gelu_tanh")},
}


def stage_of(c: Case, name: str, shape) -> object:
    """The stage a case name gives (`op[@at|.pair][-variant]`), its operands made in c."""
    head, _, variant = name.partition("-")
    pair = head.endswith(".pair")
    op, _, at = head.removesuffix(".pair").partition("@")
    if pair:  # the running value is [rows, 2 n]: the op of its halves
        _, attrs = SAMPLES[op][variant](c, (shape[0], shape[1] // 2), variant)
        return stage(op, pair=True, **attrs)
    operands, attrs = SAMPLES[op][variant](c, shape, variant)
    return stage(op, *operands, at=int(at or 0), **attrs)


def stage_cases(archetype: str, pairs: bool = False) -> list[str]:
    """Every stage the archetype's epilogue takes, as case names: each op it takes, at each
    operand the running value may be, under each sample variant (paired forms: pairs). Ops
    that update state (cache writes) have cases of their own."""
    out = []
    for op in sorted(ARCHETYPES[archetype].epilogue):
        spec = OPS[op]
        if spec.inplace or op not in SAMPLES:  # an op without a sample: test_op_table says so
            continue
        for at in spec.through:
            if spec.commutative and at:
                continue  # the same stage (the decoder keeps one)
            out += [op + (f"@{at}" if at else "") + (f"-{v}" if v else "") for v in SAMPLES[op]]
        if pairs and spec.pairs:
            out += [f"{op}.pair" + (f"-{v}" if v else "") for v in SAMPLES[op]]
    return out
