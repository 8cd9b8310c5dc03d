"""QK-norm + RoPE: one row-wise kernel normalizes a whole q (or k) row and rotates it.

rope(rms_norm(x, w)) reads x once and writes once instead of twice each.
"""

from egglog import f64, i64, rule, ruleset, union

from ..compiler.egraph import Tensor

qk_norm_rope = ruleset(name="qk_norm_rope")


@qk_norm_rope.register
def _(x: Tensor, w: Tensor, m: Tensor, eps: f64, theta: f64, hd: i64):
    # one pass over the row instead of two, one launch instead of two
    yield rule(m == x.rms_norm(w, eps).rope(theta, hd), name="qk-norm then rope as one row kernel"
               ).then(union(m).with_(x.norm_rope(w, eps, theta, hd)))
