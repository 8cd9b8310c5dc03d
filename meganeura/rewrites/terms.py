"""Pattern terms built from the op table, for the rule families that fuse by structure.

Each rule of those families is generated, not written per op: from an op's declaration
(its operands, attributes, locality, the operands a kernel's running value may take) and
from an archetype's (its own operands, the stages it takes).
"""

from egglog import String, f64, i64, var

from ..compiler.egraph import Stage, Stages, Tensor
from ..compiler.kernels import Archetype
from ..compiler.ops import OpSpec

LITERAL = {float: f64, int: i64, str: String}


def tensors(prefix: str, n: int) -> list:
    return [var(f"{prefix}{k}", Tensor) for k in range(n)]


def attr_vars(spec: OpSpec) -> list:
    """A pattern variable per attribute of the op, of its literal type."""
    return [var(f"{spec.name}_{a}", LITERAL[kind]) for a, kind in spec.attrs]


def apply(spec: OpSpec, operands: list, attrs: list):
    """The op's Tensor term over its operands and attributes."""
    return getattr(operands[0], spec.name)(*operands[1:], *attrs)


def kernel(arch: Archetype, main: list, prologue, epilogue):
    """The archetype's Tensor term (a prologue only where it takes one)."""
    lists = ([prologue] if arch.prologue else []) + [epilogue]
    return getattr(main[0], arch.name)(*main[1:], *lists)


def stage(spec: OpSpec, at: int, others: list, attrs: list):
    """The Stage term of the op with the running value as operand `at`."""
    return getattr(Stage, f"{spec.name}_{at}")(*others, *attrs)


def stage_lists() -> tuple:
    return var("prologue", Stages), var("epilogue", Stages)
