"""The lm_head's product, its soft-cap and the cross-entropy are one op, forward and
backward: the [rows, vocab] logits and their gradient are never stored.

    cross_entropy(softcap(x @ w^T, cap), labels)          =  linear_cross_entropy(x, w, labels, cap)
    d z = softcap_grad(cross_entropy_grad(softcap(z), labels, d), z)  with z = x @ w^T
    d z @ w                                              =  linear_cross_entropy_grad_h(x, w, labels, d, cap)
    matmul_tn(d z, x)                                    =  linear_cross_entropy_grad_w(x, w, labels, d, cap)

and the same without the soft-cap (cap 0). The gradient forms are the ones autodiff writes
for the loss (compiler/ops.py's VJPs of matmul, softcap and cross_entropy), so a training
graph built from the plain loss offers both plans; the fused kernels recompute the logits
in chunks of rows (two passes for a gradient), the plain ones write and read them: the
cost model decides.
"""

from egglog import f64, rule, ruleset, union

from ..compiler.egraph import Tensor

fused_loss = ruleset(name="fused_loss")


@fused_loss.register
def _(x: Tensor, w: Tensor, labels: Tensor, d: Tensor, m: Tensor, cap: f64):
    z = x.matmul(w.transpose())
    capped = z.softcap(cap)
    forms = ((capped, cap, capped.cross_entropy_grad(labels, d).softcap_grad(z, cap), "soft-capped"),
             (z, f64(0.0), z.cross_entropy_grad(labels, d), "plain"))
    for logits, c, dz, what in forms:
        yield rule(m == logits.cross_entropy(labels),
                   name=f"the {what} lm_head and its loss are one op").then(
            union(m).with_(x.linear_cross_entropy(w, labels, c)))
        yield rule(m == dz.matmul(w), name=f"d rows of the {what} lm_head's loss: one op").then(
            union(m).with_(x.linear_cross_entropy_grad_h(w, labels, d, c)))
        yield rule(m == dz.matmul_tn(x), name=f"d weight of the {what} lm_head's loss: one op").then(
            union(m).with_(x.linear_cross_entropy_grad_w(w, labels, d, c)))
