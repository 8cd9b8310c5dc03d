"""RMSNorm + MatMul: the norm becomes the matmul's prologue.

rms_norm(x, w) @ B = rstd(x) * ((x * w) @ B): the kernel gathers sum(x^2) from the A tiles
it loads anyway and scales them by the norm weight on the way to the matrix units, so the
normalized activations are never written and no weight is copied.
"""

from egglog import f64, rule, ruleset, union

from ..compiler.egraph import Tensor

rmsnorm_matmul = ruleset(name="rmsnorm_matmul")


@rmsnorm_matmul.register
def _(x: Tensor, w: Tensor, b: Tensor, m: Tensor, eps: f64):
    # saves writing and re-reading the normalized rows, and one launch
    yield rule(m == x.rms_norm(w, eps).matmul(b), name="rms_norm as matmul prologue").then(
        union(m).with_(x.norm_matmul(b, w, eps)))
