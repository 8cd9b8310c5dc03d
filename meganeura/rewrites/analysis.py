"""Analysis: facts about terms that the rewrites read; they saturate before any rewrite runs.

- `cols(t)`: the column count of every tensor. Every encoded term gets it when a block is
  encoded; these rules carry it through the terms the rewrites build.
- `weight(t)`: t is computed from parameters alone (a weight, its transpose, a
  concatenation or a constant multiple of weights), so it can be read in place or made
  once at load time. Fusions that concatenate operands require it: a concatenation of
  run-time tensors has no kernel.
- `wslot(t)`: the parameter slot of a weight read as stored or transposed; merged
  matmuls concatenate weights in slot order only.
"""

from egglog import f64, i64, relation, rule, ruleset, set_

from ..compiler.egraph import Tensor, cols, wslot

weight = relation("weight", Tensor)
analysis = ruleset(name="analysis")


@analysis.register
def _(a: Tensor, b: Tensor, m: Tensor, na: i64, nb: i64, s: i64, w: i64, c: f64):
    # a concatenation is as wide as its parts together
    yield rule(m == a.concat_cols(b), cols(a) == na, cols(b) == nb,
               name="cols of concat_cols").then(set_(cols(m)).to(na + nb))
    # a product is as wide as its right operand
    yield rule(m == a.matmul(b), cols(b) == nb, name="cols of matmul").then(set_(cols(m)).to(nb))
    # a slice is as wide as it says
    yield rule(m == a.slice_cols(s, w), name="cols of slice_cols").then(set_(cols(m)).to(w))
    # constant multiples of weights keep their width
    yield rule(m == a.scale(c), cols(a) == na, name="cols of scale").then(set_(cols(m)).to(na))
    # what is made of parameters alone is a weight
    yield rule(m == Tensor.parameter(s), name="a parameter is a weight").then(weight(m), set_(wslot(m)).to(s))
    yield rule(m == Tensor.parameter(s).transpose(), name="a transposed parameter is a weight").then(
        weight(m), set_(wslot(m)).to(s))
    yield rule(m == a.concat_cols(b), weight(a), weight(b), name="a concatenation of weights").then(
        weight(m))
    yield rule(m == a.scale(c), weight(a), name="a constant multiple of a weight").then(weight(m))
