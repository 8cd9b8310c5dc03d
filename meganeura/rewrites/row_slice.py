"""Row slices move before row-local ops: a prefill that keeps only its last row computes
the ops after the slice on that row alone.

    slice_rows(op(a, ..., w), s, c) = op(slice_rows(a, s, c), ..., w)

for every op whose output row i reads row i of its row-aligned operands only (declared as
`rows` in compiler/ops.py: norms, sums, products by a weight, ...), the other operands
(weights, scalars) as they are. One rule per such op, generated from the declarations.
"""

from egglog import String, f64, i64, rule, ruleset, union, var

from ..compiler.egraph import Tensor
from ..compiler.ops import OPS

row_slice = ruleset(name="row_slice")
_LITERAL = {float: f64, int: i64, str: String}


def _rule(spec):
    operands = [var(f"x{k}", Tensor) for k in range(spec.arity)]
    attrs = [var(f"a{k}", _LITERAL[kind]) for k, (_, kind) in enumerate(spec.attrs)]
    s, c, m = var("s", i64), var("c", i64), var("m", Tensor)
    term = getattr(operands[0], spec.name)(*operands[1:], *attrs)
    moved = [x.slice_rows(s, c) if k in spec.rows else x for k, x in enumerate(operands)]
    return rule(m == term.slice_rows(s, c), name=f"row slice before {spec.name}").then(
        union(m).with_(getattr(moved[0], spec.name)(*moved[1:], *attrs)))


row_slice.register(*(_rule(spec) for spec in OPS.values() if spec.rows))
