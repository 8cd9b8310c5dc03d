"""Element ops as Triton expressions: what any kernel writes for one of them as a stage.

Each op of locality "element" (compiler/ops.py) has an entry here: given its operand
values in declared order (fp32 expressions: the kernel's running value, loaded tiles or
scalars), its attributes (a float or int as the name of the kernel argument that carries
it, a string as declared) and a prefix for any temporaries, it returns (lines,
expression): the lines computing temporaries, then the value. Every archetype that takes element stages (a product's epilogue, a row
kernel, a pointwise kernel, a gather) applies them through `apply`, so a new element op is
its declaration, its entry here and its test case.

    add       a + b
    glu       act(gate) * up                        (silu, gelu_tanh: common.activation)
    scale     x * factor
    scale_by  x * s                                 (s: the scalar s[0], loaded)
    softcap   cap * tanh(x / cap)                   (common.softcap_lines)
"""

from __future__ import annotations

from .common import activation, softcap_lines


def _softcap(v, a, tmp):
    lines = [x.replace("sc_", f"{tmp}sc_") for x in softcap_lines("sc_x", a["cap"])]
    lines[0] = f"{tmp}sc_y = {v[0]} / {a['cap']}"  # the value read once, not named
    return lines[:-1], lines[-1].split(" = ", 1)[1]


# (operand values, attribute texts, a prefix for temporaries) -> (lines, expression)
EXPRESSIONS = {
    "add": lambda v, a, tmp: ([], f"{v[0]} + {v[1]}"),
    "glu": lambda v, a, tmp: ([], f"({activation(a['act'], v[0])}) * {v[1]}"),
    "scale": lambda v, a, tmp: ([], f"{v[0]} * {a['factor']}"),
    "scale_by": lambda v, a, tmp: ([], f"{v[0]} * {v[1]}"),
    "softcap": _softcap,
}
# operands an expression reads more than once: the kernel names them first
REPEATED = {"glu": (0,)}


def apply(op: str, values: list[str], attrs: dict, target: str, temp: str,
          prefix: str = "") -> list[str]:
    """Lines that set `target` to op(values); an operand read more than once that is not a
    plain name is bound to `temp` first. prefix: of the temporaries an expression needs (a
    kernel whose stages run in two scopes gives each its own)."""
    lines = []
    values = list(values)
    for i in REPEATED.get(op, ()):
        if not values[i].isidentifier():
            lines.append(f"{temp} = {values[i]}")
            values[i] = temp
    more, expr = EXPRESSIONS[op](values, attrs, prefix)
    return lines + more + [f"{target} = {expr}"]
