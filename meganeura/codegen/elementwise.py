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
    the gradients (the running value is dy):
    softcap_grad   dy * (1 - tanh(x / cap)^2)
    glu_grad_up    dy * act(gate)
    glu_grad_gate  dy * up * act'(gate)             silu' = s (1 + g (1 - s)), s = sigmoid(g);
                                                    gelu_tanh' = s + g s (1 - s) 2c (1 + 3 a g^2),
                                                    s = sigmoid(2u), u = c (g + a g^3)
"""

from __future__ import annotations

from .common import activation, softcap_lines


def _softcap(v, a, tmp):
    lines = [x.replace("sc_", f"{tmp}sc_") for x in softcap_lines("sc_x", a["cap"])]
    lines[0] = f"{tmp}sc_y = {v[0]} / {a['cap']}"  # the value read once, not named
    return lines[:-1], lines[-1].split(" = ", 1)[1]


def _softcap_grad(v, a, tmp):
    t = f"{tmp}sg_"
    lines = [f"{t}a = tl.abs({v[1]} / {a['cap']})",
             f"{t}e = tl.exp(-2.0 * {t}a)",
             f"{t}y2 = {t}a * {t}a",
             f"{t}t = tl.where({t}a < 0.0625, {t}a * (1.0 - {t}y2 * (1.0 / 3.0 - {t}y2 * "
             f"(2.0 / 15.0 - {t}y2 * (17.0 / 315.0)))), (1.0 - {t}e) / (1.0 + {t}e))"]
    return lines, f"{v[0]} * (1.0 - {t}t * {t}t)"


def _glu_grad_gate(v, a, tmp):
    dy, g, u = v
    s = f"{tmp}gg_s"
    if a["act"] == "silu":
        return ([f"{s} = 1.0 / (1.0 + tl.exp(tl.minimum(-{g}, 80.0)))"],
                f"{dy} * {u} * ({s} * (1.0 + {g} * (1.0 - {s})))")
    if a["act"] == "gelu_tanh":  # 2c = 1.5957691216057308, 3a = 0.134145
        return ([f"{s} = 1.0 / (1.0 + tl.exp(tl.minimum(-1.5957691216057308 * "
                 f"({g} + 0.044715 * {g} * {g} * {g}), 80.0)))"],
                f"{dy} * {u} * ({s} + {g} * {s} * (1.0 - {s}) * 1.5957691216057308 * "
                f"(1.0 + 0.134145 * {g} * {g}))")
    raise ValueError(f"no kernel expression for activation {a['act']!r}")


# (operand values, attribute texts, a prefix for temporaries) -> (lines, expression)
EXPRESSIONS = {
    "add": lambda v, a, tmp: ([], f"{v[0]} + {v[1]}"),
    "glu": lambda v, a, tmp: ([], f"({activation(a['act'], v[0])}) * {v[1]}"),
    "scale": lambda v, a, tmp: ([], f"{v[0]} * {a['factor']}"),
    "scale_by": lambda v, a, tmp: ([], f"{v[0]} * {v[1]}"),
    "softcap": _softcap,
    "softcap_grad": _softcap_grad,
    "glu_grad_up": lambda v, a, tmp: ([], f"{v[0]} * ({activation(a['act'], v[1])})"),
    "glu_grad_gate": _glu_grad_gate,
}
# operands an expression reads more than once: the kernel names them first
REPEATED = {"glu": (0,), "glu_grad_up": (1,), "glu_grad_gate": (1,)}


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
