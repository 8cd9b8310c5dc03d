"""Every op that launches a kernel is a kernel of its archetype: the normal form the fusion
rules match.

    matmul(a, b)       = product(a, b; prologue none, epilogue none)
    embedding(ids, t)  = gather(ids, t; none)
    rms_norm(x, w)     = rows(x; rms_norm(w))          (every row op, with its attributes)
    add(x, r)          = pointwise(x; add(r))          (every element op)

Each is the same kernel written two ways, so extraction weighs them alike (a structured
node with nothing more than its op is never preferred); the fusion families then extend
the structured form stage by stage, and the extractor picks the cheapest kernel per class.
"""

from egglog import rule, ruleset, union

from ..compiler.egraph import Stages
from ..compiler.kernels import ARCHETYPES
from ..compiler.ops import OPS
from .terms import apply, attr_vars, kernel, stage, tensors

archetypes = ruleset(name="archetypes")


def _rules():
    for spec in OPS.values():
        arch = ARCHETYPES.get(spec.archetype)
        if arch is None or spec.variadic:
            continue
        xs, attrs = tensors("x", spec.arity), attr_vars(spec)
        m = tensors("m", 1)[0]
        if arch.base == spec.name:  # the archetype with no stage
            lists = [Stages.none()] * 2
            yield rule(m == apply(spec, xs, attrs), name=f"{spec.name} is a {arch.name} kernel").then(
                union(m).with_(kernel(arch, xs, *lists)))
        elif spec.name in arch.epilogue and 0 in spec.through:
            one = Stages.none().then(stage(spec, 0, xs[1:], attrs))
            yield rule(m == apply(spec, xs, attrs), name=f"{spec.name} is a {arch.name} kernel").then(
                union(m).with_(kernel(arch, xs[:1], Stages.none(), one)))


archetypes.register(*_rules())
