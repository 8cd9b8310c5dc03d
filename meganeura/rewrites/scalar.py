"""Constant scales folded away: into norm weights (at load time), into norm epsilons, into
one another, and through sums (a scale of a gather joins its epilogue: rewrites/epilogue.py).

Each rule is exact algebra for a positive constant c:
    (x * c) * c2                 = x * (c c2)
    (a + b) * c                  = a * c + b * c
    rms_norm(y, w, eps) * c      = rms_norm(y, w * c, eps)          (w * c made at load time)
    rms_norm(y * c, w, eps)      = rms_norm(y, w, eps / c^2)        (rsqrt(c^2 m + eps) c = rsqrt(m + eps/c^2))
"""

from egglog import f64, i64, rule, ruleset, union

from ..compiler.egraph import Tensor
from .analysis import weight

scalar_fold = ruleset(name="scalar_fold")


@scalar_fold.register
def _(x: Tensor, y: Tensor, a: Tensor, b: Tensor, w: Tensor, m: Tensor, c: f64, c2: f64,
      eps: f64, hd: i64):
    yield rule(m == x.scale(c).scale(c2), name="scale of a scale").then(union(m).with_(x.scale(c * c2)))
    yield rule(m == a.add(b).scale(c), name="scale through a sum").then(
        union(m).with_(a.scale(c).add(b.scale(c))))
    yield rule(m == y.rms_norm(w, eps).scale(c), weight(w), name="scale into a norm weight").then(
        union(m).with_(y.rms_norm(w.scale(c), eps)))
    yield rule(m == y.head_rms_norm(w, eps, hd).scale(c), weight(w),
               name="scale into a per-head norm weight").then(
        union(m).with_(y.head_rms_norm(w.scale(c), eps, hd)))
    yield rule(m == y.scale(c).rms_norm(w, eps), name="scale before a norm into its eps").then(
        union(m).with_(y.rms_norm(w, eps / (c * c))))
    yield rule(m == y.scale(c).head_rms_norm(w, eps, hd),
               name="scale before a per-head norm into its eps").then(
        union(m).with_(y.head_rms_norm(w, eps / (c * c), hd)))
