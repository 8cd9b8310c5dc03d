"""Algebraic clean-ups, each sound for any tensor: slices of slices and of concatenations."""

from egglog import i64, rule, ruleset, union

from ..compiler.egraph import Tensor, cols

algebra = ruleset(name="algebra")


@algebra.register
def _(t: Tensor, a: Tensor, b: Tensor, m: Tensor, s1: i64, w1: i64, s2: i64, w2: i64, n: i64):
    # a slice of a slice is one slice: later slices read the merged product directly
    yield rule(m == t.slice_cols(s1, w1).slice_cols(s2, w2), name="slice of slice").then(
        union(m).with_(t.slice_cols(s1 + s2, w2)))
    # the parts of a concatenation are its operands
    yield rule(m == a.concat_cols(b).slice_cols(0, n), cols(a) == n,
               name="left part of concat").then(union(m).with_(a))
    yield rule(m == a.concat_cols(b).slice_cols(n, w2), cols(a) == n, cols(b) == w2,
               name="right part of concat").then(union(m).with_(b))
    # a full-width slice is the tensor itself
    yield rule(m == t.slice_cols(0, n), cols(t) == n, name="full-width slice").then(union(m).with_(t))
