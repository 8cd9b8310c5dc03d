"""QK-norm + RoPE: one row kernel normalizes a q (or k) row and rotates it.

rope(rms_norm(x, w)) reads x once and writes once instead of twice each; the seed's norm
spans the whole row, the published model's each head (one weight shared by the heads).
"""

from egglog import f64, i64, rule, ruleset, union

from ..compiler.egraph import Tensor

qk_norm_rope = ruleset(name="qk_norm_rope")


@qk_norm_rope.register
def _(x: Tensor, w: Tensor, pos: Tensor, m: Tensor, eps: f64, theta: f64, hd: i64, rot: i64,
      limit: i64):
    # one pass over the row instead of two, one launch instead of two
    yield rule(m == x.rms_norm(w, eps).rope(pos, theta, hd, rot, limit),
               name="qk-norm then rope as one row kernel").then(
        union(m).with_(x.norm_rope(w, pos, eps, theta, hd, rot, limit)))
    yield rule(m == x.head_rms_norm(w, eps, hd).rope(pos, theta, hd, rot, limit),
               name="per-head qk-norm then rope as one row kernel").then(
        union(m).with_(x.head_norm_rope(w, pos, eps, hd, theta, rot, limit)))
