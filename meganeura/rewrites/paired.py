"""Two products of one input, combined by a binary op (SwiGLU, GeGLU: act(h Wg) * (h Wu)),
become one product over both weights that combines its two column halves in the epilogue.

    f(product(h, Wg; P, none), product(h, Wu; P, none))  =  product(h, [Wg | Wu]; P, f.pair)

for every op declared to pair. Each program computes a G tile and the U tile beside it
and writes only f(G, U): neither product is stored, and h is read once. The weights are
read in place (the concatenation is never made unless a kernel cannot read the parts).
"""

from egglog import rule, ruleset, union

from ..compiler.egraph import Stage, Stages, Tensor
from ..compiler.kernels import ARCHETYPES
from ..compiler.ops import OPS
from .analysis import weight
from .terms import apply, attr_vars, kernel, stage_lists, tensors

paired = ruleset(name="paired")


def _rules():
    arch = ARCHETYPES["product"]
    for spec in OPS.values():
        if not spec.pairs:
            continue
        h, g, u = tensors("h", 1)[0], *tensors("w", 2)
        pro, _ = stage_lists()
        attrs = attr_vars(spec)
        m = tensors("m", 1)[0]
        halves = [kernel(arch, [h, w], pro, Stages.none()) for w in (g, u)]
        both: Tensor = g.concat_cols(u)
        yield rule(m == apply(spec, halves, attrs), weight(g), weight(u),
                   name=f"{spec.name} of two products on one input: one product, paired").then(
            union(m).with_(kernel(arch, [h, both], pro,
                                  Stages.none().then(getattr(Stage, f"{spec.name}_pair")(*attrs)))))


paired.register(*_rules())
