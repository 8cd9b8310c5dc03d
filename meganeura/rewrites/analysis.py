"""Analysis: the column count of every tensor term, which the merge and slice rules read.

Leaves get `cols` when a block is encoded; these rules carry it through the ops
whose width the rewrites need. They saturate before any rewrite runs.
"""

from egglog import i64, rule, ruleset, set_

from ..compiler.egraph import Tensor, cols

analysis = ruleset(name="analysis")


@analysis.register
def _(a: Tensor, b: Tensor, m: Tensor, na: i64, nb: i64, s: i64, w: i64):
    # a concatenation is as wide as its parts together
    yield rule(m == a.concat_cols(b), cols(a) == na, cols(b) == nb,
               name="cols of concat_cols").then(set_(cols(m)).to(na + nb))
    # a product is as wide as its right operand
    yield rule(m == a.matmul(b), cols(b) == nb, name="cols of matmul").then(set_(cols(m)).to(nb))
    # folding a norm weight into a matrix keeps its width
    yield rule(m == a.scale_rows(b), cols(a) == na,
               name="cols of scale_rows").then(set_(cols(m)).to(na))
    # a slice is as wide as it says
    yield rule(m == a.slice_cols(s, w), name="cols of slice_cols").then(set_(cols(m)).to(w))
