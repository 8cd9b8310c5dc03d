"""Post-norm + residual add (+ the layer scalar): one row kernel.

r + rms_norm(y, w) reads y and r once and writes the new residual stream once, instead
of writing the normalized y and reading it back; a layer scalar that multiplies the
result joins the same pass.
"""

from egglog import f64, rule, ruleset, union

from ..compiler.egraph import Tensor

post_norm_residual = ruleset(name="post_norm_residual")


@post_norm_residual.register
def _(y: Tensor, w: Tensor, r: Tensor, s: Tensor, m: Tensor, eps: f64):
    # the normalized branch is never written
    yield rule(m == r.add(y.rms_norm(w, eps)), name="residual + post-norm as one row kernel").then(
        union(m).with_(y.norm_add(w, r, eps)))
    yield rule(m == y.rms_norm(w, eps).add(r), name="post-norm + residual as one row kernel").then(
        union(m).with_(y.norm_add(w, r, eps)))
    # the scaled stream is written once, not twice
    yield rule(m == y.norm_add(w, r, eps).scale_by(s), name="layer scalar joins the post-norm row"
               ).then(union(m).with_(y.norm_add_scale(w, r, s, eps)))
