"""Matmuls that share an input merge into one over column-concatenated weights (Q/K/V).

h @ Wa and h @ Wb are column slices of h @ [Wa | Wb]: one launch reads h once.
Weights (stored or transposed parameters) concatenate in slot order only (a < b, then
chains extended by a later slot), so n matmuls on one input give at most 2^n sorted
groups, not n! orders. The concatenation is parameter-only: the matmul reads its parts in
place, or the plan makes it once at load time.
"""

from egglog import i64, rule, ruleset, union

from ..compiler.egraph import Tensor, cols, wslot

shared_input_merge = ruleset(name="shared_input_merge")


@shared_input_merge.register
def _(h: Tensor, w: Tensor, wa: Tensor, wb: Tensor, ma: Tensor, mb: Tensor, a: i64, b: i64,
      na: i64, nb: i64):
    # two weights of this block, in slot order
    yield rule(ma == h.matmul(wa), mb == h.matmul(wb), wslot(wa) == a, wslot(wb) == b, a < b,
               cols(wa) == na, cols(wb) == nb, name="merge two matmuls on one input").then(
        union(ma).with_(h.matmul(wa.concat_cols(wb)).slice_cols(0, na)),
        union(mb).with_(h.matmul(wa.concat_cols(wb)).slice_cols(na, nb)))
    # extend a merged group by a weight of a later slot
    group = w.concat_cols(wa)
    yield rule(ma == h.matmul(group), mb == h.matmul(wb), wslot(wa) == a, wslot(wb) == b, a < b,
               cols(group) == na, cols(wb) == nb,
               name="extend a merged matmul by one more weight").then(
        union(ma).with_(h.matmul(group.concat_cols(wb)).slice_cols(0, na)),
        union(mb).with_(h.matmul(group.concat_cols(wb)).slice_cols(na, nb)))
