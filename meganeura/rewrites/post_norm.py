"""Post-norm + residual add (+ the layer scalar): one row kernel.

r + rms_norm(y, w) reads y and r once and writes the new residual stream once, instead
of writing the normalized y and reading it back; a layer scalar that multiplies the
result joins the same pass.

At one row (a decode step) the pass can also end the product that makes y: the product's
column tiles leave y in a workspace and the last of them to finish normalizes the whole
row, so neither y nor the launch of the row kernel remains. The cost model prices that
form only at one row (a tiled product's rows would wait on a whole row of tiles).
"""

from egglog import f64, rule, ruleset, union

from ..compiler.egraph import Tensor

post_norm_residual = ruleset(name="post_norm_residual")


@post_norm_residual.register
def _(y: Tensor, w: Tensor, r: Tensor, s: Tensor, m: Tensor, a: Tensor, b: Tensor, eps: f64):
    # the normalized branch is never written
    yield rule(m == r.add(y.rms_norm(w, eps)), name="residual + post-norm as one row kernel").then(
        union(m).with_(y.norm_add(w, r, eps)))
    yield rule(m == y.rms_norm(w, eps).add(r), name="post-norm + residual as one row kernel").then(
        union(m).with_(y.norm_add(w, r, eps)))
    # the scaled stream is written once, not twice
    yield rule(m == y.norm_add(w, r, eps).scale_by(s), name="layer scalar joins the post-norm row"
               ).then(union(m).with_(y.norm_add_scale(w, r, s, eps)))
    # the product that makes y ends with the post-norm row (one launch fewer, y never stored)
    yield rule(m == y.norm_add(w, r, eps), y == a.matmul(b),
               name="post-norm row as the product's epilogue").then(
        union(m).with_(a.matmul_norm_add(b, w, r, eps)))
    yield rule(m == y.norm_add_scale(w, r, s, eps), y == a.matmul(b),
               name="scaled post-norm row as the product's epilogue").then(
        union(m).with_(a.matmul_norm_add_scale(b, w, r, s, eps)))
