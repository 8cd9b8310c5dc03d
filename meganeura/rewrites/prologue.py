"""The RMSNorm of a product's A joins the product as its prologue (the norm statistics are
gathered from the A tiles the K loop loads anyway; the norm weight scales them on the way
to the matrix units).

    product(f(x, others), b; none, E)  =  product(x, b; f(others), E)

for every op a product's prologue takes. The normalized rows are never written and read
back; but every column tile recomputes the norm, which can lose to materializing it once
(a wide product, a slow vector unit): the cost model decides.
"""

from egglog import rule, ruleset, union

from ..compiler.egraph import Stages
from ..compiler.kernels import ARCHETYPES
from ..compiler.ops import OPS
from .terms import apply, attr_vars, kernel, stage, stage_lists, tensors

prologue = ruleset(name="prologue")


def _rules():
    for arch in ARCHETYPES.values():
        for name in sorted(arch.prologue):
            spec = OPS[name]
            x, rest = tensors("x", 1)[0], tensors("k", len(arch.main) - 1)
            others, attrs = tensors("o", spec.arity - 1), attr_vars(spec)
            _, epi = stage_lists()
            m = tensors("m", 1)[0]
            made = apply(spec, [x] + others, attrs)
            yield rule(m == kernel(arch, [made] + rest, Stages.none(), epi),
                       name=f"{arch.name}({name}(_), _) takes the {name} as its prologue").then(
                union(m).with_(kernel(arch, [x] + rest,
                                      Stages.none().then(stage(spec, 0, others, attrs)), epi)))


prologue.register(*_rules())
